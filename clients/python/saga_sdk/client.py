"""Clients of the coordinator: `SagaClient` (blocking) and `AsyncSagaClient` (asyncio), twins.

Both build their requests with `saga_sdk.requests` and convert answers with `saga_sdk.model`;
only the I/O differs. Every failed call raises a `saga_sdk.errors.SagaRpcError` (or one of its
subclasses by status code) carrying the rich `google.rpc.Status` details.

    with SagaClient("localhost:50051") as client:
        result = client.create("onboard-client", {"name": "ACME"}, saga_id="acme-1")
        saga = client.wait(result.saga.saga_id, timeout=60)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, Self

import grpc
import grpc.aio
from saga.v1 import coordinator_service_pb2_grpc

from saga_sdk.errors import WaitTimeout, error_from_aio, error_from_call
from saga_sdk.model import (
    CreateResult,
    Saga,
    SagaState,
    SagaUpdate,
    saga_from_proto,
    settled_saga_from_response,
    update_from_proto,
)
from saga_sdk.requests import (
    ListQuery,
    cancel_request,
    create_request,
    get_request,
    rewatch_delay,
    trace_headers,
    watch_request,
)

ChannelOptions = Sequence[tuple[str, Any]]
Metadata = Sequence[tuple[str, str]]

DEFAULT_TIMEOUT = 30.0
"""Deadline, in seconds, of each unary call unless the client is given another."""


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


class SagaClient:
    """A blocking client of the coordinator's `CoordinatorService`.

    Give either `target` ("host:port"; TLS when `credentials` are given) or an existing
    `channel`. A channel passed in stays the caller's: `close()` closes only a channel the client
    opened itself. `timeout` is the deadline of each unary call, in seconds (None: no deadline);
    `metadata` is sent with every call (e.g. an authorization header).
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        channel: grpc.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: ChannelOptions = (),
        timeout: float | None = DEFAULT_TIMEOUT,
        metadata: Metadata = (),
    ) -> None:
        if (target is None) == (channel is None):
            raise ValueError("give exactly one of target and channel")
        self._owns_channel = channel is None
        if channel is None:
            assert target is not None
            if credentials is None:
                channel = grpc.insecure_channel(target, options=list(options))
            else:
                channel = grpc.secure_channel(target, credentials, options=list(options))
        self._channel = channel
        self._stub = coordinator_service_pb2_grpc.CoordinatorServiceStub(channel)
        self._timeout = timeout
        self._metadata = tuple(metadata)

    def create(
        self,
        definition: str,
        input: object = None,
        *,
        saga_id: str | None = None,
        definition_version: int = 0,
    ) -> CreateResult:
        """Start a saga of `definition` and return it once it is stored durably.

        `input` is sent as is when it is bytes, as an empty payload when None, and as UTF-8
        JSON otherwise. With a `saga_id` the call is idempotent: the same request again returns
        the existing saga with `created=False`; a different request with the same id raises
        `AlreadyExists`. `definition_version` 0 means the newest version.
        """
        request = create_request(
            definition, input, saga_id=saga_id, definition_version=definition_version
        )
        try:
            response = self._stub.CreateSaga(
                request, timeout=self._timeout, metadata=self._metadata + trace_headers()
            )
        except grpc.RpcError as exc:
            raise error_from_call(exc) from None
        return CreateResult(saga_from_proto(response.saga), response.created)

    def get(self, saga_id: str) -> Saga:
        """Return the saga with this id; `NotFound` when there is none."""
        try:
            response = self._stub.GetSaga(
                get_request(saga_id), timeout=self._timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise error_from_call(exc) from None
        return saga_from_proto(response.saga)

    def cancel(self, saga_id: str, reason: str = "") -> Saga:
        """Cancel a running saga (it compensates); `FailedPrecondition` when it cannot be."""
        try:
            response = self._stub.CancelSaga(
                cancel_request(saga_id, reason), timeout=self._timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise error_from_call(exc) from None
        return saga_from_proto(response.saga)

    def watch(self, saga_id: str) -> Iterator[SagaUpdate]:
        """Iterate over a saga's states: first the current one, then each change, in order.

        The iteration ends when the saga settles (SUCCEEDED, COMPENSATED or NEEDS_ATTENTION).
        A broken stream raises; use `wait()` for a watch that survives coordinator restarts.
        Closing the iterator early cancels the stream.
        """
        request = watch_request(saga_id)

        def stream() -> Iterator[SagaUpdate]:
            call = self._stub.WatchSaga(request, metadata=self._metadata)
            try:
                for response in call:
                    yield update_from_proto(response)
            except grpc.RpcError as exc:
                raise error_from_call(exc) from None
            finally:
                call.cancel()

        return stream()

    def wait(self, saga_id: str, timeout: float | None = None) -> Saga:
        """Block until the saga is SUCCEEDED, COMPENSATED or NEEDS_ATTENTION, and return it.

        Raises `WaitTimeout` (a `TimeoutError`) after `timeout` seconds; None waits for as long
        as it takes. The watch asks for the ending only (one message, once the saga settles);
        when the stream breaks with UNAVAILABLE (e.g. the coordinator restarts) it is watched
        again after a short, growing pause.
        """
        request = watch_request(saga_id, ending_only=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        broken = 0
        while True:
            remaining = _remaining(deadline)
            if remaining is not None and remaining <= 0:
                raise WaitTimeout(saga_id, timeout)
            call = self._stub.WatchSaga(request, timeout=remaining, metadata=self._metadata)
            try:
                for response in call:
                    saga = settled_saga_from_response(response)
                    if saga is not None:
                        return saga
            except grpc.RpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.DEADLINE_EXCEEDED and deadline is not None:
                    raise WaitTimeout(saga_id, timeout) from None
                if code != grpc.StatusCode.UNAVAILABLE:
                    raise error_from_call(exc) from None
            finally:
                call.cancel()
            # The stream broke, or ended before the saga settled: watch again.
            broken += 1
            pause = rewatch_delay(broken)
            remaining = _remaining(deadline)
            time.sleep(pause if remaining is None else max(0.0, min(pause, remaining)))

    def list(
        self,
        *,
        states: Iterable[SagaState | str] = (),
        definition: str | None = None,
        page_size: int = 100,
    ) -> Iterator[Saga]:
        """Iterate over every saga matching the filters, oldest first, page after page.

        `states` keeps sagas in any of these states (empty: all); `definition` keeps sagas of
        that definition; `page_size` is how many sagas each request fetches.
        """
        query = ListQuery.of(states, definition, page_size)

        def pages() -> Iterator[Saga]:
            token = ""
            while True:
                try:
                    response = self._stub.ListSagas(
                        query.page(token), timeout=self._timeout, metadata=self._metadata
                    )
                except grpc.RpcError as exc:
                    raise error_from_call(exc) from None
                for saga in response.sagas:
                    yield saga_from_proto(saga)
                token = response.next_page_token
                if not token:
                    return

        return pages()

    def close(self) -> None:
        """Close the channel, when the client opened it."""
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncSagaClient:
    """An asyncio client of the coordinator's `CoordinatorService`; the twin of `SagaClient`.

    Give either `target` ("host:port"; TLS when `credentials` are given) or an existing
    `grpc.aio` `channel`, which then stays the caller's. Create it inside the event loop that
    uses it.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        channel: grpc.aio.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: ChannelOptions = (),
        timeout: float | None = DEFAULT_TIMEOUT,
        metadata: Metadata = (),
    ) -> None:
        if (target is None) == (channel is None):
            raise ValueError("give exactly one of target and channel")
        self._owns_channel = channel is None
        if channel is None:
            assert target is not None
            if credentials is None:
                channel = grpc.aio.insecure_channel(target, options=list(options))
            else:
                channel = grpc.aio.secure_channel(target, credentials, options=list(options))
        self._channel = channel
        self._stub = coordinator_service_pb2_grpc.CoordinatorServiceStub(channel)
        self._timeout = timeout
        self._metadata = tuple(metadata)

    async def create(
        self,
        definition: str,
        input: object = None,
        *,
        saga_id: str | None = None,
        definition_version: int = 0,
    ) -> CreateResult:
        """Start a saga of `definition` and return it once it is stored; see `SagaClient`."""
        request = create_request(
            definition, input, saga_id=saga_id, definition_version=definition_version
        )
        try:
            response = await self._stub.CreateSaga(
                request, timeout=self._timeout, metadata=self._metadata + trace_headers()
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_aio(exc) from None
        return CreateResult(saga_from_proto(response.saga), response.created)

    async def get(self, saga_id: str) -> Saga:
        """Return the saga with this id; `NotFound` when there is none."""
        try:
            response = await self._stub.GetSaga(
                get_request(saga_id), timeout=self._timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_aio(exc) from None
        return saga_from_proto(response.saga)

    async def cancel(self, saga_id: str, reason: str = "") -> Saga:
        """Cancel a running saga (it compensates); `FailedPrecondition` when it cannot be."""
        try:
            response = await self._stub.CancelSaga(
                cancel_request(saga_id, reason), timeout=self._timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_aio(exc) from None
        return saga_from_proto(response.saga)

    def watch(self, saga_id: str) -> AsyncIterator[SagaUpdate]:
        """Iterate over a saga's states until it settles; see `SagaClient.watch`."""
        request = watch_request(saga_id)

        async def stream() -> AsyncIterator[SagaUpdate]:
            call = self._stub.WatchSaga(request, metadata=self._metadata)
            try:
                async for response in call:
                    yield update_from_proto(response)
            except grpc.aio.AioRpcError as exc:
                raise error_from_aio(exc) from None
            finally:
                call.cancel()

        return stream()

    # The twin of SagaClient.wait keeps its signature; the deadline also bounds the stream.
    async def wait(self, saga_id: str, timeout: float | None = None) -> Saga:
        """Wait until the saga is SUCCEEDED, COMPENSATED or NEEDS_ATTENTION; see `SagaClient`."""
        request = watch_request(saga_id, ending_only=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        broken = 0
        while True:
            remaining = _remaining(deadline)
            if remaining is not None and remaining <= 0:
                raise WaitTimeout(saga_id, timeout)
            call = self._stub.WatchSaga(request, timeout=remaining, metadata=self._metadata)
            try:
                async for response in call:
                    saga = settled_saga_from_response(response)
                    if saga is not None:
                        return saga
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.DEADLINE_EXCEEDED and deadline is not None:
                    raise WaitTimeout(saga_id, timeout) from None
                if code != grpc.StatusCode.UNAVAILABLE:
                    raise error_from_aio(exc) from None
            finally:
                call.cancel()
            # The stream broke, or ended before the saga settled: watch again.
            broken += 1
            pause = rewatch_delay(broken)
            remaining = _remaining(deadline)
            await asyncio.sleep(pause if remaining is None else max(0.0, min(pause, remaining)))

    def list(
        self,
        *,
        states: Iterable[SagaState | str] = (),
        definition: str | None = None,
        page_size: int = 100,
    ) -> AsyncIterator[Saga]:
        """Iterate over every saga matching the filters, page after page; see `SagaClient`."""
        query = ListQuery.of(states, definition, page_size)

        async def pages() -> AsyncIterator[Saga]:
            token = ""
            while True:
                try:
                    response = await self._stub.ListSagas(
                        query.page(token), timeout=self._timeout, metadata=self._metadata
                    )
                except grpc.aio.AioRpcError as exc:
                    raise error_from_aio(exc) from None
                for saga in response.sagas:
                    yield saga_from_proto(saga)
                token = response.next_page_token
                if not token:
                    return

        return pages()

    async def close(self) -> None:
        """Close the channel, when the client opened it."""
        if self._owns_channel:
            await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
