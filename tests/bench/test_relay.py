"""The relay floor end to end: real processes, its figures, and the calls it made verified."""

from __future__ import annotations

import json
import subprocess
import sys

CONCURRENCY = (1, 4)


def test_the_relay_floor_measures_both_sides_of_verified_sagas() -> None:
    done = subprocess.run(
        [
            sys.executable,
            *("-m", "coordinator.bench.relay", "--sagas", "25"),
            *("--concurrency", ",".join(map(str, CONCURRENCY)), "--output", "json"),
        ],
        capture_output=True,
        timeout=120,
        check=False,
    )

    # It exits non-zero when the participants did not count four Executes per saga.
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    report = json.loads(done.stdout)
    assert report["sagas"] == 25
    assert [case["concurrency"] for case in report["cases"]] == list(CONCURRENCY)
    for case in report["cases"]:
        for name, value in case.items():
            assert isinstance(value, int | float), name
            assert value > 0, (name, value)
        ratio = case["relay_cpu_ms"] / case["direct_client_cpu_ms"]
        assert abs(case["relay_cpu_over_direct_cpu"] - ratio) < 0.01 * ratio + 0.01


def test_the_relay_floor_refuses_bad_options() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "coordinator.bench.relay", "--concurrency", "1,x"],
        capture_output=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 2
    assert b"--concurrency: expected C,C,... of whole numbers, got 1,x" in done.stderr
