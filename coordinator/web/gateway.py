"""The console's one way to the coordinator: the SDK's asyncio client, plus paged reads.

The SDK's `list()` and `events()` iterate over every page and keep the page tokens to
themselves; a console pages with a cursor in its URL, so the two paged reads are made here from
the SDK's own request builders and conversions, on the client's channel and with its token.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

import grpc
import grpc.aio
from saga.v1 import coordinator_service_pb2_grpc, saga_pb2
from saga.v1.coordinator_service_pb2 import ListSagaEventsResponse, ListSagasResponse

from saga_sdk.client import AsyncSagaClient
from saga_sdk.connection import BearerToken, TokenSource
from saga_sdk.errors import error_from_aio
from saga_sdk.model import (
    DefinitionSummary,
    RegisteredDefinition,
    Saga,
    SagaChange,
    SagaCounts,
    SagaEvent,
    SagaState,
    SagaUpdate,
    counts_from_proto,
    event_from_proto,
    saga_from_proto,
)
from saga_sdk.requests import ListQuery, events_request
from saga_sdk.tls import ClientTLS

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")

UNARY_TIMEOUT = 10.0
"""Deadline of each unary call, in seconds: a page waits no longer for the coordinator."""


@dataclass(frozen=True)
class SagaPage:
    """One page of a listing and the cursor of the next ("" on the last)."""

    sagas: tuple[Saga, ...]
    next_token: str


@dataclass(frozen=True)
class LogEnds:
    """The two ends of a saga's event log, oldest first, and how many events lie between."""

    head: list[saga_pb2.SagaEvent]
    tail: list[saga_pb2.SagaEvent]
    """The newest events after `head`, oldest first (empty when `head` is the whole log)."""
    unread: int
    """How many events lie between `head` and `tail`, not read."""


@dataclass(frozen=True)
class EventPage:
    """One page of a saga's event log and the cursor of the next ("" on the last)."""

    events: tuple[SagaEvent, ...]
    next_token: str


class Gateway:
    """The coordinator as the console sees it. Open it inside the event loop that serves."""

    def __init__(
        self,
        target: str,
        *,
        tls: ClientTLS | None = None,
        token: TokenSource | None = None,
        actor: str,
    ) -> None:
        options: list[tuple[str, object]] = [("grpc.max_receive_message_length", 64 << 20)]
        if tls is None:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        else:
            options.extend(tls.channel_options())
            self._channel = grpc.aio.secure_channel(target, tls.credentials(), options=options)
        self._token = None if token is None else BearerToken(token)
        self.client = AsyncSagaClient(channel=self._channel, token=token, timeout=UNARY_TIMEOUT)
        self._stub = coordinator_service_pb2_grpc.CoordinatorServiceStub(self._channel)
        self.target = target
        self.actor = actor

    async def _call(
        self, method: grpc.aio.UnaryUnaryMultiCallable[_Request, _Response], request: _Request
    ) -> _Response:
        """One unary call with the client's deadline and token; the SDK's errors."""
        metadata = () if self._token is None else (await self._token.header_async(),)
        try:
            return await method(request, timeout=UNARY_TIMEOUT, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            raise error_from_aio(exc) from None

    async def list_protos(self, query: ListQuery, token: str = "") -> ListSagasResponse:
        """One page of the sagas `query` selects, from the cursor `token`, as protos (a page
        that only groups them converts the few it names)."""
        return await self._call(self._stub.ListSagas, query.page(token))

    async def list_page(self, query: ListQuery, token: str = "") -> SagaPage:
        """One page of the sagas `query` selects, from the cursor `token`."""
        response = await self.list_protos(query, token)
        return SagaPage(
            tuple(saga_from_proto(saga) for saga in response.sagas), response.next_page_token
        )

    async def _events_protos(
        self, saga_id: str, page_size: int, token: str = "", *, newest_first: bool = False
    ) -> ListSagaEventsResponse:
        request = events_request(saga_id, page_size, token, newest_first=newest_first)
        return await self._call(self._stub.ListSagaEvents, request)

    async def events_page(self, saga_id: str, page_size: int, token: str = "") -> EventPage:
        """One page of a saga's event log, oldest first, from the cursor `token`."""
        response = await self._events_protos(saga_id, page_size, token)
        return EventPage(
            tuple(event_from_proto(event) for event in response.events), response.next_page_token
        )

    async def log_ends(self, saga_id: str, each: int) -> LogEnds:
        """The first and the last `each` events of a saga's log, as protos (the whole log when
        it holds no more than twice `each`).

        Protos, not the SDK's views: a long log is laid out from a few fields of each event,
        and only what is shown is converted. Two reads at most, however long the log.
        """
        head = await self._events_protos(saga_id, each, newest_first=False)
        if not head.next_page_token:
            return LogEnds(list(head.events), [], 0)
        newest = await self._events_protos(saga_id, each, newest_first=True)
        read_up_to = head.events[-1].sequence
        tail = [event for event in reversed(newest.events) if event.sequence > read_up_to]
        unread = tail[0].sequence - read_up_to - 1 if tail else 0
        return LogEnds(list(head.events), tail, unread)

    async def get(self, saga_id: str) -> Saga:
        """The saga with this id (NotFound when there is none)."""
        return await self.client.get(saga_id)

    async def count(self, query: ListQuery) -> SagaCounts:
        """How many sagas `query`'s filters (states aside) select, per state."""
        return counts_from_proto(await self._call(self._stub.CountSagas, query.count()))

    async def definitions(self, name: str | None = None) -> list[DefinitionSummary]:
        """Every registered definition (or only `name`'s) with its versions."""
        return await self.client.definitions(name)

    async def definition(self, name: str, version: int = 0) -> RegisteredDefinition:
        """One version of a definition (0: the newest)."""
        return await self.client.definition(name, version)

    def watch(self, saga_id: str) -> AsyncIterator[SagaUpdate]:
        """The saga's states until it settles."""
        return self.client.watch(saga_id)

    def changes(
        self,
        *,
        states: Iterable[SagaState] = (),
        definition: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> AsyncIterator[SagaChange]:
        """The change feed from now on, resumed by the SDK when the stream breaks."""
        return self.client.changes(
            from_now=True, definition=definition, states=states, labels=labels
        )

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()


def utc_text(value: datetime | None) -> str:
    """A time as the console shows it: UTC to the second, "" for none."""
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")
