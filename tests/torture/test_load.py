"""The small load run of ``make test`` (``make load`` runs 10,000 sagas): 500 sagas in flight
at once against slow participants all end; the coordinator never has more calls in flight to a
participant than configured; its memory and file descriptors stay bounded."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.torture.load import LoadSettings, run_load

MAX_CALLS = 8


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_five_hundred_sagas_in_flight_end_and_calls_in_flight_stay_bounded(
    tmp_path: Path,
) -> None:
    report = await run_load(
        LoadSettings(
            sagas=500,
            workdir=tmp_path,
            delay_ms=(20, 60),
            max_calls_per_participant=MAX_CALLS,
            timeout=240,
        )
    )

    assert report.states == {"SUCCEEDED": 500}, report
    assert report.peak_in_flight_sagas == 500, "the sagas were not all in flight together"
    for name, peak in report.participant_peak_calls.items():
        assert peak <= MAX_CALLS, f"{name} saw {peak} calls at once, the bound is {MAX_CALLS}"
    assert max(report.participant_peak_calls.values()) == MAX_CALLS, (
        "no participant was saturated: the bound was not exercised"
    )
    assert report.peak_fds < 100, f"{report.peak_fds} open file descriptors"
    assert report.vm_hwm_mb < 400, f"{report.vm_hwm_mb:.0f} MB resident at the peak"
    assert report.coordinator_exit_code == 0
