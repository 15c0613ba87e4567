"""Watchers of sagas: each change the engine commits, handed to whoever follows that saga."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from coordinator.core.errors import ShuttingDown, WatcherTooSlow
from coordinator.core.events import RecordedEvent
from coordinator.core.model import Saga


@dataclass(frozen=True)
class SagaChange:
    """One state of a watched saga: the saga, and the event that led to it (None at first)."""

    saga: Saga
    event: RecordedEvent | None


@dataclass(eq=False)
class _Watcher:
    ending_only: bool
    queue: asyncio.Queue[SagaChange | None] = field(default_factory=asyncio.Queue)
    overflowed: bool = False


class SagaWatchers:
    """Fans each committed change out to the watchers of its saga.

    A watcher that falls more than ``buffer`` changes behind is cut off (it may watch again);
    one that asked for the ending only is handed nothing before the saga settles.
    """

    def __init__(self, buffer: int) -> None:
        self._buffer = buffer
        self._by_saga: dict[str, set[_Watcher]] = {}
        self._closed = False

    def publish(self, change: SagaChange) -> None:
        """Hand ``change`` to the watchers of its saga; never blocks."""
        watchers = self._by_saga.get(change.saga.saga_id)
        if not watchers:
            return
        settled = change.saga.state.is_settled
        for watcher in watchers:
            if watcher.overflowed or (watcher.ending_only and not settled):
                continue
            if watcher.queue.qsize() >= self._buffer:
                watcher.overflowed = True
            watcher.queue.put_nowait(change)

    def watching(self, saga_id: str) -> bool:
        """Whether anyone here watches the saga."""
        return saga_id in self._by_saga

    def close(self) -> None:
        """End every watch (the process is stopping); later watches are refused."""
        self._closed = True
        for watchers in self._by_saga.values():
            for watcher in watchers:
                watcher.queue.put_nowait(None)

    async def watch(
        self, saga_id: str, current: Callable[[], Awaitable[Saga]], *, ending_only: bool = False
    ) -> AsyncIterator[SagaChange]:
        """The saga as ``current`` reads it, then every change in order, until it settles.

        With ``ending_only``, only the settled state.
        """
        if self._closed:
            raise ShuttingDown("the coordinator is shutting down; watch again")
        watcher = _Watcher(ending_only)
        self._by_saga.setdefault(saga_id, set()).add(watcher)
        try:
            # Registered before reading: a change committed after the read is in the queue, one
            # committed before is in the state read; versions tell them apart.
            saga = await current()
            seen = saga.version
            settled = saga.state.is_settled
            if settled or not ending_only:
                yield SagaChange(saga, None)
            while not settled:
                change = await watcher.queue.get()
                if change is None:
                    raise ShuttingDown("the coordinator is shutting down; watch again")
                if watcher.overflowed:
                    raise WatcherTooSlow(
                        f"watcher of saga {saga_id} fell more than {self._buffer} changes "
                        "behind; watch again"
                    )
                if change.saga.version <= seen:
                    continue
                seen = change.saga.version
                settled = change.saga.state.is_settled
                yield change
        finally:
            watchers = self._by_saga.get(saga_id)
            if watchers is not None:
                watchers.discard(watcher)
                if not watchers:
                    del self._by_saga[saga_id]
