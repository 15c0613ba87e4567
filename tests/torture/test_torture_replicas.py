"""The short torture run with replicas: three ``saga serve`` processes share one
PostgreSQL database under 2 s leases while the nemesis SIGKILLs one replica at a time, at least
30 times (every crash point 3 times, and random instants, some in the middle of recovery), and
pauses others at least 3 times for longer than their lease (about 2 minutes on 2 cores);
participants are killed and the network is broken, the client moves to the next replica when
one refuses or is down, and a change-feed consumer follows one replica and moves when it is
down. Every figure of the offline checker must be 0. Random in schedule (a fresh seed each run,
printed; ``TORTURE_SEED=N`` replays one), deterministic in outcome. ``make torture-replicas``
runs the long one; ``TORTURE_REPLICAS=2`` runs this one with two replicas (where a takeover
always falls to the one survivor)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from rich.console import Console

from coordinator.crashpoints import CrashPoint
from tests.torture.harness import TortureSettings, new_seed, run_torture
from tests.torture.report import print_report

KILLS = int(os.environ.get("TORTURE_REPLICA_KILLS", "30"))
MIN_PER_CRASH_POINT = 3
PAUSES = 3
MIN_SAGAS = 150
REPLICAS = int(os.environ.get("TORTURE_REPLICAS", "3"))


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_short_torture_run_with_replicas_on_postgresql_keeps_every_guarantee(
    tmp_path: Path, postgres_url: str
) -> None:
    replicas = REPLICAS
    seed = int(os.environ.get("TORTURE_SEED") or new_seed())
    replay = (
        f"seed {seed}: replay with "
        f"`python scripts/torture.py --replicas {replicas} --postgresql --seed {seed}`"
    )
    print(f"torture seed {seed} with {replicas} replicas ({replay})")
    settings = TortureSettings(
        seed=seed,
        workdir=tmp_path / "run",
        kills=KILLS,
        min_per_crash_point=MIN_PER_CRASH_POINT,
        min_sagas=MIN_SAGAS,
        max_fault_seconds=300.0,
        replicas=replicas,
        database_url=postgres_url,
        min_pauses=PAUSES,
        progress=print,
    )

    report = await run_torture(settings)

    print_report(report, Console(width=120, force_terminal=False))
    (tmp_path / "report.json").write_text(json.dumps(report.to_json(), indent=2))
    broken = {name: count for name, count in report.figures.items() if count}
    assert not broken, f"{replay}; broken: {broken}; examples: {dict(report.check.examples)}"
    stats = report.stats
    assert stats.coordinator_kills >= KILLS, replay
    for point in CrashPoint:
        assert stats.crash_point_kills[point.value] >= MIN_PER_CRASH_POINT, (point, replay)
    assert stats.pauses >= PAUSES, replay
    assert stats.lease_lapses >= 1, f"no paused replica found its lease run out: {replay}"
    assert stats.sagas_claimed_again > 0, f"no saga changed hands: {replay}"
    assert report.check.info["sagas_acknowledged"] >= MIN_SAGAS, replay
    feed = report.check.info["feed"]
    assert stats.feed_consumer_kills >= 10, replay
    assert feed["consumer_lives"] >= 5, replay  # lives that delivered changes
    assert feed["changes_delivered"] >= feed["changes_stored"] > MIN_SAGAS, replay
