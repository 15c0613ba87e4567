"""One follower of the coordinator's change feed, shared by every live page of the console.

The feed is followed only while a page listens. Each page gets its own bounded queue; a page
that does not keep up loses its queue's content and is told to catch up ("resync") rather than
slowing the others. A feed that breaks for good (e.g. the token lost its rights) is reported to
the pages, then followed again from now after a pause.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from coordinator.web.gateway import Gateway
from saga_sdk.errors import SagaSdkError
from saga_sdk.model import SagaChange

log = logging.getLogger(__name__)

QUEUE_SIZE = 2000
"""Changes a page may have waiting before it is told to resync."""
REFOLLOW_PAUSE = 2.0


@dataclass(frozen=True)
class Resync:
    """The page missed changes (it was slow, or the feed broke): read the current state."""

    why: str


FeedItem = SagaChange | Resync


class _Subscriber:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[FeedItem] = asyncio.Queue(QUEUE_SIZE)
        self.overflowed = False

    def offer(self, item: FeedItem) -> None:
        if self.overflowed:
            return
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.overflowed = True
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(Resync("this page fell behind the change feed"))


class ChangeHub:
    """Fans the change feed out to the pages that listen."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self._subscribers: set[_Subscriber] = set()
        self._task: asyncio.Task[None] | None = None

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[Callable[[], asyncio.Future[FeedItem]]]:
        """Listen to the feed; the context gives a function returning the next item."""
        subscriber = _Subscriber()
        self._subscribers.add(subscriber)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._follow(), name="console change feed")

        handed: list[asyncio.Future[FeedItem]] = []

        def next_item() -> asyncio.Future[FeedItem]:
            subscriber.overflowed = False
            handed[:] = [future for future in handed if not future.done()]
            future = asyncio.ensure_future(subscriber.queue.get())
            handed.append(future)
            return future

        try:
            yield next_item
        finally:
            for future in handed:  # a page that left mid-wait leaves no task behind
                future.cancel()
            self._subscribers.discard(subscriber)
            if not self._subscribers and self._task is not None:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
                self._task = None

    def _publish(self, item: FeedItem) -> None:
        for subscriber in list(self._subscribers):
            subscriber.offer(item)

    async def _follow(self) -> None:
        while True:
            try:
                async for change in self._gateway.changes():
                    self._publish(change)
                return
            except SagaSdkError as error:
                log.warning("the change feed broke: %s; following it again from now", error)
                self._publish(Resync(f"the change feed broke ({error}); following it again"))
            await asyncio.sleep(REFOLLOW_PAUSE)

    async def close(self) -> None:
        """Stop following."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
