"""A participant process for the crash tests: a ledger behind the barrier, served until SIGTERM.

Usage: python sdk_participant_process.py DATABASE PORT [MODE]

DATABASE is a SQLite file path or a postgresql:// URL. MODE makes the process die by SIGKILL
at a chosen instant of a Debit:
- "before-commit": after the ledger write, before the transaction commits (it creates the
  file named by $READY_FILE and waits for the test to kill it);
- "after-commit": once the barrier has committed, before the answer is sent.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid
from pathlib import Path

from saga_sdk.barrier import AsyncEffect, Barrier, BarrierKey, Outcome, SyncEffect
from saga_sdk.participant import ExecuteContext, Participant
from saga_sdk.postgres_barrier import PostgresBarrier
from saga_sdk.sqlite_barrier import SqliteBarrier


class KilledAfterCommit(Barrier):
    """Wraps a barrier: the process dies right after the barrier's transaction commits."""

    def __init__(self, inner: Barrier) -> None:
        self.inner = inner

    def run(self, key: BarrierKey, effect: SyncEffect) -> Outcome:
        self.inner.run(key, effect)
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")

    async def run_async(self, key: BarrierKey, effect: AsyncEffect) -> Outcome:
        await self.inner.run_async(key, effect)
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")


def main(database: str, port: int, mode: str) -> None:
    barrier: Barrier
    if database.startswith("postgresql://"):
        barrier = PostgresBarrier(database)
        placeholder = "%s"
        import psycopg

        with psycopg.connect(database, autocommit=True) as pg:
            pg.execute("CREATE TABLE IF NOT EXISTS ledger (request_id TEXT, amount INT)")
    else:
        barrier = SqliteBarrier(database)
        placeholder = "?"
        with barrier.connect() as connection:
            connection.execute("CREATE TABLE IF NOT EXISTS ledger (request_id TEXT, amount INT)")
    insert = f"INSERT INTO ledger VALUES ({placeholder}, {placeholder})"

    participant = Participant(
        "ledger", barrier=KilledAfterCommit(barrier) if mode == "after-commit" else barrier
    )

    @participant.action("Debit")
    def debit(ctx: ExecuteContext) -> dict[str, str]:
        ctx.tx.execute(insert, (ctx.request_id, -ctx.input["amount"]))
        if mode == "before-commit":
            Path(os.environ["READY_FILE"]).write_text(str(os.getpid()))
            time.sleep(120)  # the test kills the process now
        return {"entry": uuid.uuid4().hex}

    participant.run(f"127.0.0.1:{port}", grace=2)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "")
