"""The short torture run of ``make test``: at least 200 SIGKILLs of a real coordinator, over TLS
on both hops (mTLS from the client and the feed consumer, mTLS to the participants through the
fault-injecting proxies), while at least 1,000 sagas run, every crash point hit at least 3
times, participants killed, the network broken, a change-feed consumer killed at random instants
and resumed from its stored position, and every figure of the offline checker at zero. Random
in schedule (a fresh seed each run, printed on failure; ``TORTURE_SEED=N`` replays one),
deterministic in outcome. The run with replicas (``test_torture_replicas``) is in plaintext."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from rich.console import Console

from coordinator.crashpoints import CrashPoint
from tests.torture.harness import TortureSettings, new_seed, run_torture
from tests.torture.report import print_report

KILLS = int(os.environ.get("TORTURE_KILLS", "200"))
MIN_PER_CRASH_POINT = 3
MIN_SAGAS = int(os.environ.get("TORTURE_SAGAS", "1000"))


@pytest.mark.slow
@pytest.mark.timeout(1100)
async def test_short_torture_run_keeps_every_guarantee(tmp_path: Path) -> None:
    seed = int(os.environ.get("TORTURE_SEED") or new_seed())
    print(f"torture seed {seed} (replay: python scripts/torture.py --tls --seed {seed})")
    settings = TortureSettings(
        seed=seed,
        workdir=tmp_path / "run",
        kills=KILLS,
        min_per_crash_point=MIN_PER_CRASH_POINT,
        min_sagas=MIN_SAGAS,
        # On 2 quiet cores the kills are reached in about 6 minutes; the cap is for a loaded
        # machine, where every TLS handshake of every restart costs more.
        max_fault_seconds=600.0,
        tls=True,
        progress=print,
    )

    report = await run_torture(settings)

    print_report(report, Console(width=120, force_terminal=False))
    (tmp_path / "report.json").write_text(json.dumps(report.to_json(), indent=2))
    replay = f"seed {seed}: replay with `python scripts/torture.py --tls --seed {seed}`"
    broken = {name: count for name, count in report.figures.items() if count}
    assert not broken, f"{replay}; broken: {broken}; examples: {dict(report.check.examples)}"
    assert report.tls, replay
    assert report.stats.coordinator_kills >= KILLS, replay
    for point in CrashPoint:
        assert report.stats.crash_point_kills[point.value] >= MIN_PER_CRASH_POINT, (point, replay)
    assert report.check.info["sagas_acknowledged"] >= MIN_SAGAS, replay
    feed = report.check.info["feed"]
    assert report.stats.feed_consumer_kills >= 10, replay
    assert feed["consumer_lives"] >= 5, replay  # lives that delivered changes
    assert feed["changes_delivered"] >= feed["changes_stored"] > MIN_SAGAS, replay
