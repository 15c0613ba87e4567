"""``scripts/torture.py``: run the torture harness and print its report."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from rich.console import Console

from tests.support.postgres import postgres_server
from tests.torture.harness import TortureSettings, new_seed, run_torture, temporary_workdir
from tests.torture.report import print_report


def main(argv: Sequence[str] | None = None) -> int:
    """Run once; exit 0 when every guarantee held, 1 otherwise."""
    parser = argparse.ArgumentParser(
        prog="torture", description="Crash, kill and fault the coordinator; check every guarantee."
    )
    parser.add_argument("--seed", type=int, default=None, help="replay a run (default: random)")
    parser.add_argument("--kills", type=int, default=200, help="coordinator kills (default 200)")
    parser.add_argument(
        "--min-per-crash-point", type=int, default=3, help="kills at each crash point at least"
    )
    parser.add_argument(
        "--min-sagas", type=int, default=1000, help="sagas submitted before the faults stop"
    )
    parser.add_argument("--max-minutes", type=float, default=60.0, help="cap on the fault period")
    parser.add_argument(
        "--replicas", type=int, default=1, help="coordinators sharing the store (default 1)"
    )
    store = parser.add_mutually_exclusive_group()
    store.add_argument(
        "--postgresql",
        action="store_true",
        help="share a throw-away PostgreSQL server started for the run (default: a SQLite file)",
    )
    store.add_argument("--database-url", help="share this PostgreSQL database (it must be empty)")
    parser.add_argument(
        "--lease", default="2s", help="each replica's lease, with several (default 2s)"
    )
    parser.add_argument(
        "--min-pauses",
        type=int,
        default=3,
        help="replica pauses past the lease before the faults stop, with several (default 3)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="TLS on both hops: mTLS to the coordinators and from them to the participants",
    )
    parser.add_argument("--json-out", type=Path, help="also write the report as JSON here")
    parser.add_argument("--workdir", type=Path, help="keep the run's files here")
    parser.add_argument(
        "--keep", action="store_true", help="keep the run's files even when it passes"
    )
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else new_seed()
    workdir = args.workdir or temporary_workdir(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    console = Console(width=max(Console().width, 110))
    console.print(f"torture run: seed {seed}, files in {workdir}")
    with _database(args) as database_url:
        settings = TortureSettings(
            seed=seed,
            min_sagas=args.min_sagas,
            workdir=workdir,
            kills=args.kills,
            min_per_crash_point=args.min_per_crash_point,
            max_fault_seconds=args.max_minutes * 60,
            replicas=args.replicas,
            database_url=database_url,
            lease=args.lease,
            min_pauses=args.min_pauses,
            tls=args.tls,
            progress=lambda line: console.print(line, markup=False),
        )
        report = asyncio.run(run_torture(settings))
    print_report(report, console)
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(report.to_json(), indent=2) + "\n")
        console.print(f"report written to {args.json_out}")
    if report.ok and not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    elif not report.ok:
        replay = report.to_json()["replay"]
        console.print(f"[red]failed[/]: files kept in {workdir}; replay with {replay}")
    return 0 if report.ok else 1


@contextlib.contextmanager
def _database(args: argparse.Namespace) -> Iterator[str | None]:
    """The store's URL: the one given, a throw-away PostgreSQL server's (removed at the end),
    or None for a SQLite file in the run's directory."""
    if not args.postgresql:
        yield args.database_url
        return
    with postgres_server() as server:
        yield server.url(server.create_database("torture"))


if __name__ == "__main__":
    sys.exit(main())
