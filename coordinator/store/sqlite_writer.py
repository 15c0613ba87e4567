"""Group commit: one thread owns the SQLite write connection and commits queued writes together.

Callers on the event loop submit a job (a function of the connection) and await its answer. The
writer thread takes the first job, drains whatever else is queued, and runs the batch in one
``BEGIN IMMEDIATE`` transaction, each job inside its own savepoint, then commits once: one fsync
for the whole batch. While that fsync runs, the next batch queues up, so the more concurrent
writers there are, the more each fsync carries.

A job that raises (a refusal such as ``ConcurrentUpdate``, or a failed statement) is rolled
back to its savepoint; only its caller gets the error. If the transaction as a whole fails
(the lock cannot be had, the commit fails, SQLite rolls everything back), every job of the batch
fails. Nothing is answered before the commit returned: acknowledged means durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import Future as ThreadFuture
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from coordinator.core.errors import SagaError
from coordinator.store.errors import StorageFailure, StoreClosed
from coordinator.store.sqlite_errors import is_fatal, translate

T = TypeVar("T")

Job = Callable[[sqlite3.Connection], T]
"""Work done inside the write transaction; it may raise to refuse (its savepoint is undone)."""


@dataclass(frozen=True)
class WriterStats:
    """What the writer did so far: ``jobs / transactions`` is the mean batch size."""

    transactions: int
    """Write transactions committed."""
    jobs: int
    """Jobs that ran in them (whether they stored something or refused)."""


@dataclass(frozen=True)
class _Queued(Generic[T]):
    run: Job[T]
    doing: str
    future: asyncio.Future[T]
    loop: asyncio.AbstractEventLoop


_Outcome = tuple["_Queued[Any]", Any, BaseException | None]


class GroupCommitWriter:
    """The single writer of one SQLite database, batching concurrent writes into one commit."""

    def __init__(
        self, connect: Callable[[], sqlite3.Connection], *, max_batch: int, name: str
    ) -> None:
        """Prepare a writer whose thread opens its connection with ``connect``."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self._connect = connect
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Queued[Any] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._ready: ThreadFuture[None] = ThreadFuture()
        self._stopping = False
        self._failure: str | None = None
        self._transactions = 0
        self._jobs = 0

    @property
    def stats(self) -> WriterStats:
        """Transactions and jobs committed so far."""
        return WriterStats(self._transactions, self._jobs)

    async def start(self) -> None:
        """Start the thread and wait until its connection is open (or raise why it is not)."""
        self._thread.start()
        await asyncio.wrap_future(self._ready)

    async def submit(self, run: Job[T], doing: str) -> T:
        """Run ``run`` in the next batch and return its result once the batch is committed.

        ``doing`` names the write in error messages ("creating saga s-1"). A caller that stops
        waiting (cancellation) before the batch starts withdraws the job; after that, the job
        may still be committed.
        """
        if self._stopping:
            raise StoreClosed(f"{doing}: the saga store is closed")
        if self._failure is not None:
            raise StorageFailure(f"{doing}: {self._failure}")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Queued(run, doing, future, loop))
        return await future

    async def stop(self) -> None:
        """Finish the queued jobs, then close the connection and end the thread. Idempotent."""
        if not self._stopping:
            self._stopping = True
            self._queue.put(None)
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join)

    # --- the writer thread -------------------------------------------------------------------

    def _main(self) -> None:
        try:
            connection = self._connect()
        except BaseException as error:
            self._ready.set_exception(error)
            return
        self._ready.set_result(None)
        try:
            stopping = False
            while not stopping:
                batch, stopping = self._next_batch()
                try:
                    self._run_batch(connection, batch)
                except BaseException as error:
                    # A bug in the writer itself: stop writing, but never leave a caller waiting.
                    self._failure = f"the store's writer failed ({error!r}); restart"
                    self._settle([(job, None, StorageFailure(self._failure)) for job in batch])
        finally:
            connection.close()
            self._fail_leftovers()

    def _next_batch(self) -> tuple[list[_Queued[Any]], bool]:
        first = self._queue.get()
        if first is None:
            return [], True
        batch = [first]
        while len(batch) < self._max_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return batch, True
            batch.append(job)
        return batch, False

    def _run_batch(self, connection: sqlite3.Connection, batch: list[_Queued[Any]]) -> None:
        batch = [job for job in batch if not job.future.cancelled()]
        if not batch:
            return
        if self._failure is not None:
            failure = self._failure
            self._settle([(job, None, StorageFailure(f"{job.doing}: {failure}")) for job in batch])
            return
        try:
            connection.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as error:
            self._abort(connection, batch, error)
            return
        outcomes: list[_Outcome] = []
        for job in batch:
            try:
                connection.execute("SAVEPOINT job")
                try:
                    result = job.run(connection)
                except sqlite3.Error as error:
                    if is_fatal(error) or not connection.in_transaction:
                        # The disk failed, or SQLite rolled the whole transaction back (as it
                        # may on a full disk): the jobs before this one were lost with it.
                        self._abort(connection, batch, error)
                        return
                    self._undo(connection)
                    outcomes.append((job, None, _translated(error, job.doing)))
                    continue
                except Exception as error:  # a refusal (SagaError) or the caller's bug
                    self._undo(connection)
                    outcomes.append((job, None, error))
                    continue
                connection.execute("RELEASE job")
                outcomes.append((job, result, None))
            except sqlite3.Error as error:  # the savepoint statements themselves failed
                self._abort(connection, batch, error)
                return
        try:
            connection.execute("COMMIT")
        except sqlite3.Error as error:
            self._abort(connection, batch, error)
            return
        self._transactions += 1
        self._jobs += len(batch)
        self._settle(outcomes)

    @staticmethod
    def _undo(connection: sqlite3.Connection) -> None:
        connection.execute("ROLLBACK TO job")
        connection.execute("RELEASE job")

    def _abort(
        self, connection: sqlite3.Connection, batch: list[_Queued[Any]], error: sqlite3.Error
    ) -> None:
        """Fail every job of the batch: none of them was committed."""
        try:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
        except sqlite3.Error as rollback_error:
            # A connection stuck inside a transaction would fail every later batch confusingly.
            self._failure = f"the store could not roll back a failed write ({rollback_error})"
        if is_fatal(error):
            self._failure = (
                f"an earlier write failed ({translate(error, 'writing').message}); "
                "the store takes no more writes until the coordinator restarts"
            )
        self._settle([(job, None, _translated(error, job.doing)) for job in batch])

    def _settle(self, outcomes: list[_Outcome]) -> None:
        # One wake-up per event loop for the whole batch, not one per job.
        by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
        for outcome in outcomes:
            by_loop.setdefault(outcome[0].loop, []).append(outcome)
        for loop, settled in by_loop.items():
            # A closed loop raises RuntimeError: nobody is waiting for these answers any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, settled)

    def _fail_leftovers(self) -> None:
        leftovers: list[_Outcome] = []
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                leftovers.append((job, None, StoreClosed(f"{job.doing}: the store is closed")))
        self._settle(leftovers)


def _translated(error: sqlite3.Error, doing: str) -> SagaError:
    translated = translate(error, doing)
    translated.__cause__ = error
    return translated


def _resolve(outcomes: list[_Outcome]) -> None:
    for job, result, error in outcomes:
        if job.future.done():
            continue  # the caller cancelled; the write happened (or not) all the same
        if error is None:
            job.future.set_result(result)
        else:
            job.future.set_exception(error)
