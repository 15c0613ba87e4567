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
are safe. So `prune` also takes `ended`, a function that, given saga ids, returns those whose
sagas have ended: then only the old rows of those sagas go, and a saga parked in
NEEDS_ATTENTION for longer than the window keeps its rows for the day an operator resumes it.
`ended_on(client)` asks the coordinator: a saga has ended when it is SUCCEEDED or COMPENSATED,
or when the coordinator no longer knows it (it prunes ended sagas only; so ask the coordinator
that calls this participant).

Command line (also `python -m saga_sdk.retention`)::

    saga-barrier prune --database sqlite:///accounts.db --older-than 30d [--dry-run]
    saga-barrier prune --database postgresql://user@host/db --older-than 8w --table saga_barrier
    saga-barrier prune --database sqlite:///accounts.db --older-than 30d \
        --coordinator coordinator.internal:50051    # only the sagas it says have ended

With `--coordinator`, TLS and the token come from the client's usual variables
(`SAGA_TLS_CA`, `SAGA_TLS_CERT`, `SAGA_TLS_KEY`, `SAGA_TLS_SERVER_NAME`, `SAGA_TOKEN_FILE`,
`SAGA_TOKEN`); it needs the `viewer` role.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sqlite3
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from saga_sdk.client import SagaClient

MINIMUM_RETENTION = timedelta(days=7)
"""The shortest window `prune` accepts: longer than the coordinator's retry horizon by default
(a RetryInfo can make it wait up to the longer of an hour and a step's max_backoff), with
days to spare for an operator to resume a parked saga."""

EndedSagas = Callable[[list[str]], Iterable[str]]
"""Given saga ids (as the barrier stores them, without ``sagas/``), the ones that have ended."""

LOOKUP_CHUNK = 500
"""Saga ids asked of an `EndedSagas` at a time, and put into one statement."""

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


def chunks(items: Sequence[str]) -> Iterator[list[str]]:
    """`items` in lists of at most `LOOKUP_CHUNK`."""
    for start in range(0, len(items), LOOKUP_CHUNK):
        yield list(items[start : start + LOOKUP_CHUNK])


def ended_among(candidates: Sequence[str], ended: EndedSagas) -> list[str]:
    """The candidates that `ended` says have ended, asked in chunks; ids it answers that were
    not asked are ignored."""
    asked = set(candidates)
    found: set[str] = set()
    for chunk in chunks(sorted(asked)):
        found.update(saga_id for saga_id in ended(chunk) if saga_id in asked)
    return sorted(found)


def ended_on(client: SagaClient) -> EndedSagas:
    """An `EndedSagas` that asks the coordinator `client` reaches, one GetSaga per saga: ended
    when SUCCEEDED or COMPENSATED, or when it no longer knows the saga (it prunes only ended
    sagas). Any other error (unreachable, refused) propagates, and nothing is pruned."""
    from saga_sdk.errors import NotFound
    from saga_sdk.model import SagaState

    finished = {SagaState.SUCCEEDED, SagaState.COMPENSATED}

    def ended(saga_ids: list[str]) -> Iterator[str]:
        for saga_id in saga_ids:
            try:
                state = client.get(saga_id).state
            except NotFound:
                yield saga_id
                continue
            if state in finished:
                yield saga_id

    return ended


def parse_window(text: str) -> timedelta:
    """Read a duration such as "30d", "8w", "36h" (units s, m, h, d, w)."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"not a duration like 30d, 8w or 36h: {text!r}")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def prune_database(
    database: str,
    older_than: timedelta,
    *,
    table: str = "saga_barrier",
    dry_run: bool = False,
    ended: EndedSagas | None = None,
) -> int:
    """Prune the barrier table of `database`: a `sqlite:///path` URL (or a plain file path)
    or a `postgresql://` URL; with `ended`, only the rows of the sagas it says have ended.
    Return the number of rows deleted (or, with `dry_run`, that would be)."""
    from saga_sdk.sqlite_barrier import check_identifier

    check_window(older_than)
    check_identifier(table)
    if database.startswith(("postgresql://", "postgres://")):
        import psycopg

        from saga_sdk.postgres_barrier import PostgresBarrier

        with psycopg.connect(database) as connection:
            found = connection.execute("SELECT to_regclass(%s)", (table,)).fetchone()
        if found is None or found[0] is None:
            raise LookupError(f"no barrier table {table!r} in that database: nothing to prune")

        postgres = PostgresBarrier(database, table=table)
        try:
            return postgres.prune(older_than, dry_run=dry_run, ended=ended)
        finally:
            postgres.close()
    from saga_sdk.sqlite_barrier import SqliteBarrier

    path = database.removeprefix("sqlite:///") if database.startswith("sqlite:") else database
    if database.startswith("sqlite:") and not database.startswith("sqlite:///"):
        raise ValueError(f"a SQLite URL is sqlite:///path/to/file.db: {database!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no SQLite database at {path!r}")
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as connection:
        found = connection.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
        ).fetchone()
    if found is None:  # never created here: a prune must not create (or upgrade) a table
        raise LookupError(f"no barrier table {table!r} in {path!r}: nothing to prune")
    sqlite = SqliteBarrier(path, table=table)
    return sqlite.prune(older_than, dry_run=dry_run, ended=ended)


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
    prune.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="only the rows of sagas this coordinator says have ended (SUCCEEDED, COMPENSATED "
        "or pruned from it); TLS and token from the SAGA_TLS_* and SAGA_TOKEN* variables",
    )
    args = parser.parse_args(argv)
    try:
        window = check_window(parse_window(args.older_than))
    except ValueError as error:
        parser.error(f"--older-than: {error}")
    try:
        if args.coordinator is None:
            count = prune_database(args.database, window, table=args.table, dry_run=args.dry_run)
        else:
            from saga_sdk.client import SagaClient

            environment = {**os.environ, "SAGA_TARGET": args.coordinator}
            with SagaClient.from_environment(environment) as client:
                count = prune_database(
                    args.database,
                    window,
                    table=args.table,
                    dry_run=args.dry_run,
                    ended=ended_on(client),
                )
    except Exception as error:  # a command reports what went wrong, without a traceback
        print(f"saga-barrier: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    verb = "would delete" if args.dry_run else "deleted"
    which = "" if args.coordinator is None else " of ended sagas"
    print(f"{verb} {count} barrier row(s){which} older than {args.older_than.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
