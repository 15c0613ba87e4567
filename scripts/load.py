"""Load and backpressure: 10,000 sagas in flight at once against slow participants; prints the
coordinator's peak memory and file descriptors, and the most calls each participant saw at once.

    python scripts/load.py                              # 10,000 sagas (make load)
    python scripts/load.py --sagas 2000 --max-calls 16  # smaller, tighter bound

Exit code 1 when a saga did not succeed or a participant saw more calls than the bound.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console
from rich.table import Table

from tests.torture.load import LoadSettings, run_load


def main() -> int:
    """Run once and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sagas", type=int, default=10_000)
    parser.add_argument("--max-calls", type=int, default=64, help="max_calls_per_participant")
    parser.add_argument("--delay-ms", default="500:1500", help="participant delay LOW:HIGH ms")
    parser.add_argument("--json-out", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the run's files")
    args = parser.parse_args()
    low, _, high = args.delay_ms.partition(":")
    workdir = Path(tempfile.mkdtemp(prefix="saga-load-"))
    console = Console()
    settings = LoadSettings(
        sagas=args.sagas,
        workdir=workdir,
        delay_ms=(int(low), int(high or low)),
        max_calls_per_participant=args.max_calls,
        progress=lambda line: console.print(line, markup=False),
    )
    console.print(
        f"load: {args.sagas} sagas of 4 steps, participants slowed {args.delay_ms} ms per call, "
        f"at most {args.max_calls} calls in flight per participant; files in {workdir}"
    )
    report = asyncio.run(run_load(settings))
    table = Table(title="Load and backpressure", title_justify="left")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for name, value in (
        ("sagas", report.sagas),
        ("ended / by state", f"{report.ended} / {report.states}"),
        ("submitted all in (s)", f"{report.submit_seconds:.1f}"),
        ("all ended in (s)", f"{report.total_seconds:.1f}"),
        ("sagas per second", f"{report.sagas / max(report.total_seconds, 1e-9):.1f}"),
        ("peak sagas in flight", report.peak_in_flight_sagas),
        ("coordinator peak RSS / VmHWM (MB)", f"{report.peak_rss_mb:.0f} / {report.vm_hwm_mb:.0f}"),
        ("coordinator RSS at the end (MB)", f"{report.final_rss_mb:.0f}"),
        ("coordinator peak / final open fds", f"{report.peak_fds} / {report.final_fds}"),
        ("max calls per participant (configured)", report.max_calls_per_participant),
        ("peak calls in flight seen by participants", report.participant_peak_calls),
        ("CreateSaga retries", report.create_retries),
        ("coordinator exit code on SIGTERM", report.coordinator_exit_code),
    ):
        table.add_row(name, str(value))
    console.print(table)
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    for problem in report.problems:
        console.print(f"[red]problem[/]: {problem}")
    if not args.keep and not report.problems:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
