"""``saga bench`` end to end: real processes, every case and figure, verified calls."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from typing import Any

import pytest

CONCURRENCY = (1, 4)
VARIANTS = ("succeeding", "compensating")


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    """One short bench run, as JSON."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "coordinator.cli",
            "bench",
            "--sagas",
            "20",
            "--concurrency",
            ",".join(map(str, CONCURRENCY)),
            # A shorter warm-up than the default keeps the test short; it still warms each side.
            "--warmup",
            "10",
            "--output",
            "json",
        ],
        capture_output=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    document: dict[str, Any] = json.loads(done.stdout)
    return document


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and value > 0


def _check_figures(figures: dict[str, Any], *, through_coordinator: bool) -> None:
    assert figures["verified"] is True
    assert figures["wrong_endings"] == 0
    assert _positive(figures["sagas_per_second"])
    assert _positive(figures["elapsed_s"])
    latency = figures["latency_ms"]
    assert all(_positive(latency[q]) for q in ("p50", "p95", "p99", "mean", "max"))
    assert latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
    cpu = figures["cpu_ms_per_saga"]
    assert _positive(cpu["client"])
    assert _positive(cpu["participants"])
    if through_coordinator:
        assert _positive(cpu["coordinator"])
        assert _positive(figures["commits_per_saga"])
        assert figures["writes_per_saga"] >= figures["commits_per_saga"]
        if shutil.which("strace"):
            assert _positive(figures["fsyncs_per_saga"])
        else:
            assert figures["fsyncs_per_saga"] is None
    else:
        assert cpu["coordinator"] is None
        assert figures["commits_per_saga"] is None
        assert figures["fsyncs_per_saga"] is None


def test_every_case_is_reported_and_verified(report: dict[str, Any]) -> None:
    assert report["verified"] is True
    assert report["mismatches"] == []
    assert report["machine"]["cores"] >= 1
    assert report["settings"]["sagas"] == 20
    assert report["settings"]["synchronous"] == "FULL"
    cases = {(case["concurrency"], case["variant"]) for case in report["cases"]}
    assert cases == {(c, v) for c in CONCURRENCY for v in VARIANTS}
    assert len(report["cases"]) == len(cases)


def test_without_postgresql_no_replicas_are_measured_or_reported(report: dict[str, Any]) -> None:
    assert "postgresql" not in report["settings"]
    assert all("postgresql" not in case for case in report["cases"])


def test_every_case_has_every_figure(report: dict[str, Any]) -> None:
    for case in report["cases"]:
        _check_figures(case["coordinator"], through_coordinator=True)
        _check_figures(case["direct"], through_coordinator=False)
        _check_figures(case["durable"], through_coordinator=False)
        assert "coordinator_otlp" not in case
        ratios = case["ratios"]
        assert set(ratios) == {
            "coordinator_over_direct",
            "coordinator_over_durable",
            "coordinator_cpu_over_direct_client_cpu",
        }
        assert all(_positive(value) for value in ratios.values())


def test_a_compensating_saga_commits_more_than_a_succeeding_one(report: dict[str, Any]) -> None:
    # Sequential sagas share no commit: each of the two extra calls costs commits of its own.
    by_variant = {
        case["variant"]: case["coordinator"]["commits_per_saga"]
        for case in report["cases"]
        if case["concurrency"] == 1
    }
    assert by_variant["compensating"] > by_variant["succeeding"]
