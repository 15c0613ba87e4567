"""Barrier retention: when the barrier rows of old calls may be deleted, and the command that does.

A barrier row is what makes a duplicate harmless: while the row of a call exists, the call's
repetitions (same request_id) answer the stored answer, and an Execute arriving after its
Compensate is refused. Once the row is gone, a repetition runs the handler again. So the rule:

- `prune(older_than=W)` deletes the rows of calls first seen more than `W` ago and keeps every
  row newer than that, by the database's clock;
- `W` must exceed the longest time during which the coordinator can still send a call again:
  its retry horizon (a step's retries with their backoff and any `RetryInfo` wait, the saga's
  deadline) and the time an operator may take to resume or retry a saga parked in
  NEEDS_ATTENTION, which sends the same request_ids again;
- a window shorter than `MINIMUM_RETENTION` is refused (`ValueError`), whatever the backend.

Within the window a late duplicate is still absorbed; beyond it, only sagas that have ended
are safe, so prune with a window well past the point where your coordinator's sagas have all
ended (or been pruned from the coordinator itself).

Command line (also `python -m saga_sdk.retention`)::

    saga-barrier prune --database sqlite:///accounts.db --older-than 30d [--dry-run]
    saga-barrier prune --database postgresql://user@host/db --older-than 8w --table saga_barrier
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from datetime import timedelta

MINIMUM_RETENTION = timedelta(days=7)
"""The shortest window `prune` accepts: longer than the coordinator's retry horizon by default
(its longest RetryInfo wait is an hour past a step's max_backoff), with days to spare for an
operator to resume a parked saga."""

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")


def check_window(older_than: timedelta) -> timedelta:
    """Return `older_than` when it is a safe retention window; else raise a clear error."""
    if not isinstance(older_than, timedelta):
        raise TypeError(f"older_than is a datetime.timedelta, not {type(older_than).__name__}")
    if older_than < MINIMUM_RETENTION:
        raise ValueError(
            f"a barrier retention window of {older_than} is shorter than the minimum of "
            f"{MINIMUM_RETENTION.days} days: a duplicate arriving after the prune would apply "
            "again. Keep rows longer than the coordinator can resend a call (retries, "
            "saga deadline, operator resumes)"
        )
    return older_than


def parse_window(text: str) -> timedelta:
    """Read a duration such as "30d", "8w", "36h" (units s, m, h, d, w)."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"not a duration like 30d, 8w or 36h: {text!r}")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def prune_database(
    database: str, older_than: timedelta, *, table: str = "saga_barrier", dry_run: bool = False
) -> int:
    """Prune the barrier table of `database`: a `sqlite:///path` URL (or a plain file path)
    or a `postgresql://` URL. Return the number of rows deleted (or, with `dry_run`, that
    would be)."""
    check_window(older_than)
    if database.startswith(("postgresql://", "postgres://")):
        from saga_sdk.postgres_barrier import PostgresBarrier

        postgres = PostgresBarrier(database, table=table)
        try:
            return postgres.prune(older_than, dry_run=dry_run)
        finally:
            postgres.close()
    from saga_sdk.sqlite_barrier import SqliteBarrier

    path = database.removeprefix("sqlite:///") if database.startswith("sqlite:") else database
    if database.startswith("sqlite:") and not database.startswith("sqlite:///"):
        raise ValueError(f"a SQLite URL is sqlite:///path/to/file.db: {database!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no SQLite database at {path!r}")
    sqlite = SqliteBarrier(path, table=table)
    return sqlite.prune(older_than, dry_run=dry_run)


def main(argv: Sequence[str] | None = None) -> int:
    """`saga-barrier prune`: delete the barrier rows older than a safe window."""
    parser = argparse.ArgumentParser(
        prog="saga-barrier", description="Maintain a participant's idempotency barrier."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    prune = commands.add_parser(
        "prune",
        help="delete the rows of calls older than a window",
        description=f"Delete the barrier rows of calls first seen longer ago than --older-than "
        f"(at least {MINIMUM_RETENTION.days} days; longer than the coordinator can resend a "
        "call).",
    )
    prune.add_argument(
        "--database", required=True, help="sqlite:///path/to/file.db or postgresql://..."
    )
    prune.add_argument("--older-than", required=True, help="window, e.g. 30d, 8w, 240h")
    prune.add_argument("--table", default="saga_barrier", help="barrier table name")
    prune.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    args = parser.parse_args(argv)
    try:
        window = check_window(parse_window(args.older_than))
    except ValueError as error:
        parser.error(f"--older-than: {error}")
    try:
        count = prune_database(args.database, window, table=args.table, dry_run=args.dry_run)
    except Exception as error:  # a command reports what went wrong, without a traceback
        print(f"saga-barrier: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{verb} {count} barrier row(s) older than {args.older_than.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
