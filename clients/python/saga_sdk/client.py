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
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc
import grpc.aio
from saga.v1 import coordinator_service_pb2_grpc, saga_pb2

from saga_sdk.connection import (
    AsyncTokenSource,
    BearerToken,
    Connection,
    TokenSource,
)
from saga_sdk.errors import WaitTimeout, error_from_aio, error_from_call
from saga_sdk.model import (
    CreateResult,
    DefinitionSummary,
    PruneResult,
    RegisteredDefinition,
    RegisterResult,
    RetryPolicy,
    Saga,
    SagaChange,
    SagaCounts,
    SagaEvent,
    SagaState,
    SagaUpdate,
    change_from_proto,
    counts_from_proto,
    event_from_proto,
    prune_result_from_proto,
    register_result_from_proto,
    registered_from_proto,
    saga_from_proto,
    settled_saga_from_response,
    summary_from_proto,
    update_from_proto,
)
from saga_sdk.requests import (
    DefinitionInput,
    ListQuery,
    cancel_request,
    changes_request,
    complete_request,
    create_request,
    definition_request,
    definitions_request,
    events_request,
    get_request,
    mark_compensated_request,
    prune_request,
    register_request,
    resume_request,
    retry_request,
    rewatch_delay,
    trace_headers,
    watch_request,
)
from saga_sdk.tls import ClientTLS

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")

ChannelOptions = Sequence[tuple[str, Any]]
Metadata = Sequence[tuple[str, str]]

DEFAULT_TIMEOUT = 30.0
"""Deadline, in seconds, of each unary call unless the client is given another."""


_RESUMABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
"""A change feed stream broken with these codes is reopened from its last position."""
_RESUME_FIRST = 0.1
_RESUME_MAX = 5.0


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


def _dialing(
    target: str | None,
    channel: object | None,
    credentials: grpc.ChannelCredentials | None,
    tls: ClientTLS | None,
    options: ChannelOptions,
) -> tuple[list[tuple[str, Any]], grpc.ChannelCredentials | None]:
    """The channel options and credentials a client opens its channel with."""
    if (target is None) == (channel is None):
        raise ValueError("give exactly one of target and channel")
    if tls is not None and credentials is not None:
        raise ValueError("give tls or credentials, not both")
    if channel is not None and (tls is not None or credentials is not None):
        raise ValueError("a channel passed in has its own credentials: give no tls or credentials")
    if tls is None:
        return list(options), credentials
    return [*options, *tls.channel_options()], tls.credentials()


def _checked_metadata(metadata: Metadata, token: object | None) -> tuple[tuple[str, str], ...]:
    entries = tuple((key, value) for key, value in metadata)
    if token is not None and any(key.lower() == "authorization" for key, _ in entries):
        raise ValueError("give token or an authorization entry in metadata, not both")
    return entries


def _shown(kind: str, target: str | None, tls: ClientTLS | None, token: object | None) -> str:
    where = repr(target) if target is not None else "channel=..."
    secured = f", tls={tls!r}" if tls is not None else ""
    authorized = ", token=<hidden>" if token is not None else ""
    return f"{kind}({where}{secured}{authorized})"


class SagaClient:
    """A blocking client of the coordinator's `CoordinatorService`.

    Give either `target` ("host:port") or an existing `channel`. A channel passed in stays the
    caller's: `close()` closes only a channel the client opened itself. `tls` (a `ClientTLS`)
    dials TLS, or mTLS with a client certificate; `credentials` takes any gRPC channel
    credentials instead; with neither the channel is plaintext. `token` is sent as
    `authorization: Bearer <token>` with every call, streams and their reconnections included:
    a string, or a callable asked for a fresh token before each call (e.g. a `TokenFile`).
    `timeout` is the deadline of each unary call, in seconds (None: no deadline); `metadata` is
    sent with every call. `SagaClient.from_environment()` takes all this from the environment
    and a config file (see `saga_sdk.connection`).
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        channel: grpc.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        tls: ClientTLS | None = None,
        token: TokenSource | None = None,
        options: ChannelOptions = (),
        timeout: float | None = DEFAULT_TIMEOUT,
        metadata: Metadata = (),
    ) -> None:
        channel_options, credentials = _dialing(target, channel, credentials, tls, options)
        self._metadata = _checked_metadata(metadata, token)
        self._token = None if token is None else BearerToken(token)
        self._owns_channel = channel is None
        if channel is None:
            assert target is not None
            if credentials is None:
                channel = grpc.insecure_channel(target, options=channel_options)
            else:
                channel = grpc.secure_channel(target, credentials, options=channel_options)
        self._channel = channel
        self._stub = coordinator_service_pb2_grpc.CoordinatorServiceStub(channel)
        self._timeout = timeout
        self._shown = (target, tls)

    @classmethod
    def from_environment(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        config_file: str | Path | None = None,
        options: ChannelOptions = (),
        timeout: float | None = DEFAULT_TIMEOUT,
        metadata: Metadata = (),
    ) -> Self:
        """A client to the coordinator that `SAGA_TARGET`, `SAGA_TLS_CA`, `SAGA_TLS_CERT`,
        `SAGA_TLS_KEY`, `SAGA_TLS_SERVER_NAME`, `SAGA_TOKEN` or `SAGA_TOKEN_FILE` name, else
        the config file (`config_file`, else `SAGA_CLIENT_CONFIG`, else
        ~/.config/saga/client.yaml when there is one); see `saga_sdk.connection`. ValueError
        for settings that cannot work (an unreadable file, a key without its certificate, a
        token with whitespace), naming where they came from.
        """
        connection = Connection.from_environment(environ, config_file=config_file)
        return cls(
            connection.target,
            tls=connection.tls,
            token=connection.token,
            options=options,
            timeout=timeout,
            metadata=metadata,
        )

    def _call_metadata(self) -> tuple[tuple[str, str], ...]:
        if self._token is None:
            return self._metadata
        return (*self._metadata, self._token.header())

    def __repr__(self) -> str:  # never the token
        return _shown(type(self).__name__, *self._shown, self._token)

    def _call(
        self, method: grpc.UnaryUnaryMultiCallable[_Request, _Response], request: _Request
    ) -> _Response:
        try:
            return method(request, timeout=self._timeout, metadata=self._call_metadata())
        except grpc.RpcError as exc:
            raise error_from_call(exc) from None

    def create(
        self,
        definition: str,
        input: object = None,
        *,
        saga_id: str | None = None,
        definition_version: int = 0,
        labels: Mapping[str, str] | None = None,
    ) -> CreateResult:
        """Start a saga of `definition` and return it once it is stored durably.

        `input` is sent as is when it is bytes, as an empty payload when None, and as UTF-8
        JSON otherwise. With a `saga_id` the call is idempotent: the same request again returns
        the existing saga with `created=False`; a different request with the same id raises
        `AlreadyExists`. `definition_version` 0 means the newest version. `labels` (e.g.
        {"customer": "c-42"}) are kept with the saga, to find it by with `list()`.
        """
        request = create_request(
            definition,
            input,
            saga_id=saga_id,
            definition_version=definition_version,
            labels=labels,
        )
        try:
            response = self._stub.CreateSaga(
                request, timeout=self._timeout, metadata=self._call_metadata() + trace_headers()
            )
        except grpc.RpcError as exc:
            raise error_from_call(exc) from None
        return CreateResult(saga_from_proto(response.saga), response.created)

    def get(self, saga_id: str) -> Saga:
        """Return the saga with this id; `NotFound` when there is none."""
        try:
            response = self._stub.GetSaga(
                get_request(saga_id), timeout=self._timeout, metadata=self._call_metadata()
            )
        except grpc.RpcError as exc:
            raise error_from_call(exc) from None
        return saga_from_proto(response.saga)

    def cancel(self, saga_id: str, reason: str = "", *, actor: str | None = None) -> Saga:
        """Cancel a running saga (it compensates); `FailedPrecondition` when it cannot be.

        `actor` is recorded in the saga's audit trail; None means the `SAGA_ACTOR` environment
        variable, else "user@host".
        """
        response = self._call(self._stub.CancelSaga, cancel_request(saga_id, reason, actor))
        return saga_from_proto(response.saga)

    def retry(
        self,
        saga_id: str,
        step: str = "",
        *,
        reason: str,
        actor: str | None = None,
        expected_version: int = 0,
    ) -> Saga:
        """Send a step's pending call again now, and return the saga once that is stored.

        Fits a call waiting out its backoff, or the forward step a saga is parked on (which gets
        a fresh attempt budget). `step` "" means the step the saga waits on. Every operator
        action needs a `reason` and is recorded, with the `actor` (default: `SAGA_ACTOR`, else
        "user@host"), in the saga's audit trail. With `expected_version` the action applies
        only if the saga is still at that version (else `SagaRpcError` ABORTED,
        SAGA_VERSION_MISMATCH). An action that does not fit the saga's state raises
        `FailedPrecondition` (ACTION_NOT_ALLOWED) naming what would fit.
        """
        request = retry_request(
            saga_id, step, reason=reason, actor=actor, expected_version=expected_version
        )
        return saga_from_proto(self._call(self._stub.RetrySagaStep, request).saga)

    def resume(
        self,
        saga_id: str,
        *,
        reason: str,
        actor: str | None = None,
        expected_version: int = 0,
        compensation_retry: RetryPolicy | saga_pb2.RetryPolicy | None = None,
    ) -> Saga:
        """Take a saga parked on a failed compensation back to compensating.

        The compensation is tried again with a fresh budget, under `compensation_retry` when
        given (its unset fields take the defaults), then the earlier steps are compensated,
        newest first. See `retry()` for `reason`, `actor` and `expected_version`.
        """
        request = resume_request(
            saga_id,
            reason=reason,
            actor=actor,
            expected_version=expected_version,
            compensation_retry=compensation_retry,
        )
        return saga_from_proto(self._call(self._stub.ResumeSaga, request).saga)

    def mark_compensated(
        self,
        saga_id: str,
        step: str = "",
        *,
        reason: str,
        actor: str | None = None,
        expected_version: int = 0,
    ) -> Saga:
        """Record that a step was undone by hand; the saga goes on compensating the earlier ones.

        `step` "" means the step whose compensation the saga waits on. See `retry()`.
        """
        request = mark_compensated_request(
            saga_id, step, reason=reason, actor=actor, expected_version=expected_version
        )
        return saga_from_proto(self._call(self._stub.MarkStepCompensated, request).saga)

    def complete(
        self,
        saga_id: str,
        step: str = "",
        *,
        reason: str,
        output: object = None,
        actor: str | None = None,
        expected_version: int = 0,
    ) -> Saga:
        """Record a stuck pivot or retriable step as succeeded; the saga goes on forward.

        `output` is the step's output as its participant would have answered it, encoded as
        `create()`'s input is (bytes as is, None empty, else JSON); later steps receive it.
        `step` "" means the step the saga waits on. See `retry()`.
        """
        request = complete_request(
            saga_id,
            step,
            reason=reason,
            output=output,
            actor=actor,
            expected_version=expected_version,
        )
        return saga_from_proto(self._call(self._stub.CompleteStep, request).saga)

    def events(
        self, saga_id: str, *, page_size: int = 100, newest_first: bool = False
    ) -> Iterator[SagaEvent]:
        """Iterate over a saga's whole event log, oldest first (or newest first), page after
        page. Newest first reads the end of a long log without reading the rest."""
        # checks the arguments before the first call
        events_request(saga_id, page_size, newest_first=newest_first)

        def pages() -> Iterator[SagaEvent]:
            token = ""
            while True:
                response = self._call(
                    self._stub.ListSagaEvents,
                    events_request(saga_id, page_size, token, newest_first=newest_first),
                )
                for event in response.events:
                    yield event_from_proto(event)
                token = response.next_page_token
                if not token:
                    return

        return pages()

    def changes(
        self,
        after_position: int = 0,
        *,
        from_now: bool = False,
        definition: str | None = None,
        states: Iterable[SagaState] = (),
        labels: Mapping[str, str] | None = None,
        follow: bool = True,
    ) -> Iterator[SagaChange]:
        """Iterate over the change feed: every change of every saga, in commit order.

        Starts after `after_position` (0: the oldest kept; `from_now`: only new changes), then
        follows new changes (unless `follow` is False: it ends once caught up). Store each
        change's `position` once processed and resume after it: nothing is missed, and a change
        seen twice after a reconnect has the same position. A broken stream (the coordinator
        restarting, or this consumer cut off for reading too slowly) is reopened from the last
        position, after a short pause; other errors raise.
        """
        request = changes_request(after_position, from_now, definition, states, labels, follow)

        def stream() -> Iterator[SagaChange]:
            pause = _RESUME_FIRST
            while True:
                call = self._stub.WatchChanges(request, metadata=self._call_metadata())
                try:
                    for response in call:
                        for change in response.changes:
                            yield change_from_proto(change)
                        request.after_position = response.position
                        request.from_now = False
                        pause = _RESUME_FIRST
                    return
                except grpc.RpcError as exc:
                    error = error_from_call(exc)
                    if error.code not in _RESUMABLE:
                        raise error from None
                finally:
                    call.cancel()
                time.sleep(pause)
                pause = min(pause * 2, _RESUME_MAX)

        return stream()

    def count(
        self,
        *,
        definition: str | None = None,
        definition_version: int = 0,
        labels: Mapping[str, str] | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        stuck_on_participant: str | None = None,
        stuck_on_step: str | None = None,
    ) -> SagaCounts:
        """How many sagas are in each state, NEEDS_ATTENTION first, with `list()`'s filters."""
        query = ListQuery.of(
            definition=definition,
            definition_version=definition_version,
            labels=labels,
            created_after=created_after,
            created_before=created_before,
            stuck_on_participant=stuck_on_participant,
            stuck_on_step=stuck_on_step,
        )
        return counts_from_proto(self._call(self._stub.CountSagas, query.count()))

    def definitions(self, name: str | None = None) -> list[DefinitionSummary]:
        """The registered definitions (or only `name`'s), each with its versions."""
        response = self._call(self._stub.ListDefinitions, definitions_request(name))
        return [summary_from_proto(summary) for summary in response.definitions]

    def definition(self, name: str, version: int = 0) -> RegisteredDefinition:
        """One version of a definition (0: the newest); `NotFound` when there is none."""
        response = self._call(self._stub.GetDefinition, definition_request(name, version))
        return registered_from_proto(response)

    def register_definition(
        self, definition: DefinitionInput, *, actor: str | None = None
    ) -> RegisterResult:
        """Register a new version of a definition, validated as a definition file is.

        `definition` is a `saga.v1.SagaDefinition`, the SDK's `SagaDefinition`, or the proto's
        JSON form as a dict. The same content under a registered version is a no-op
        (`created=False`); other content under it raises `AlreadyExists`
        (DEFINITION_VERSION_EXISTS). Running sagas keep the version they started with.
        """
        request = register_request(definition, actor)
        return register_result_from_proto(self._call(self._stub.RegisterDefinition, request))

    def prune(self, older_than: timedelta, *, dry_run: bool = False) -> PruneResult:
        """Remove the sagas that ended (SUCCEEDED or COMPENSATED) longer than `older_than` ago,
        with their events; with `dry_run`, only count them. Unfinished sagas are never pruned.
        """
        response = self._call(self._stub.PruneSagas, prune_request(older_than, dry_run))
        return prune_result_from_proto(response, dry_run)

    def watch(self, saga_id: str) -> Iterator[SagaUpdate]:
        """Iterate over a saga's states: first the current one, then each change, in order.

        The iteration ends when the saga settles (SUCCEEDED, COMPENSATED or NEEDS_ATTENTION).
        A broken stream raises; use `wait()` for a watch that survives coordinator restarts.
        Closing the iterator early cancels the stream.
        """
        request = watch_request(saga_id)

        def stream() -> Iterator[SagaUpdate]:
            call = self._stub.WatchSaga(request, metadata=self._call_metadata())
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
            call = self._stub.WatchSaga(request, timeout=remaining, metadata=self._call_metadata())
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
        definition_version: int = 0,
        labels: Mapping[str, str] | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        stuck_on_participant: str | None = None,
        stuck_on_step: str | None = None,
    ) -> Iterator[Saga]:
        """Iterate over every saga matching the filters, oldest first, page after page.

        `states` keeps sagas in any of these states (empty: all); `definition` keeps sagas of
        that definition, and `definition_version` (with `definition`) of that version;
        `labels` keeps sagas carrying every one of them; `created_after` (inclusive) and
        `created_before` bound the creation time (timezone-aware datetimes);
        `stuck_on_participant` and `stuck_on_step` keep unfinished or parked sagas waiting on
        a step of that participant, or of that name. `page_size` is how many sagas each
        request fetches.
        """
        query = ListQuery.of(
            states,
            definition,
            page_size,
            definition_version=definition_version,
            labels=labels,
            created_after=created_after,
            created_before=created_before,
            stuck_on_participant=stuck_on_participant,
            stuck_on_step=stuck_on_step,
        )

        def pages() -> Iterator[Saga]:
            token = ""
            while True:
                try:
                    response = self._stub.ListSagas(
                        query.page(token), timeout=self._timeout, metadata=self._call_metadata()
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

    Give either `target` ("host:port") or an existing `grpc.aio` `channel`, which then stays
    the caller's; `tls`, `credentials`, `token` (here the callable may be a coroutine function),
    `timeout` and `metadata` are as `SagaClient`'s. Create it inside the event loop that uses it.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        channel: grpc.aio.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        tls: ClientTLS | None = None,
        token: AsyncTokenSource | None = None,
        options: ChannelOptions = (),
        timeout: float | None = DEFAULT_TIMEOUT,
        metadata: Metadata = (),
    ) -> None:
        channel_options, credentials = _dialing(target, channel, credentials, tls, options)
        self._metadata = _checked_metadata(metadata, token)
        self._token = None if token is None else BearerToken(token)
        self._owns_channel = channel is None
        if channel is None:
            assert target is not None
            if credentials is None:
                channel = grpc.aio.insecure_channel(target, options=channel_options)
            else:
                channel = grpc.aio.secure_channel(target, credentials, options=channel_options)
        self._channel = channel
        self._stub = coordinator_service_pb2_grpc.CoordinatorServiceStub(channel)
        self._timeout = timeout
        self._shown = (target, tls)

    @classmethod
    def from_environment(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        config_file: str | Path | None = None,
        options: ChannelOptions = (),
        timeout: float | None = DEFAULT_TIMEOUT,
        metadata: Metadata = (),
    ) -> Self:
        """A client configured by the environment and the config file; see
        `SagaClient.from_environment`. Call it inside the event loop that uses the client."""
        connection = Connection.from_environment(environ, config_file=config_file)
        return cls(
            connection.target,
            tls=connection.tls,
            token=connection.token,
            options=options,
            timeout=timeout,
            metadata=metadata,
        )

    async def _call_metadata(self) -> tuple[tuple[str, str], ...]:
        if self._token is None:
            return self._metadata
        return (*self._metadata, await self._token.header_async())

    def __repr__(self) -> str:  # never the token
        return _shown(type(self).__name__, *self._shown, self._token)

    async def _call(
        self, method: grpc.aio.UnaryUnaryMultiCallable[_Request, _Response], request: _Request
    ) -> _Response:
        metadata = await self._call_metadata()
        try:
            return await method(request, timeout=self._timeout, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            raise error_from_aio(exc) from None

    async def create(
        self,
        definition: str,
        input: object = None,
        *,
        saga_id: str | None = None,
        definition_version: int = 0,
        labels: Mapping[str, str] | None = None,
    ) -> CreateResult:
        """Start a saga of `definition` and return it once it is stored; see `SagaClient`."""
        request = create_request(
            definition,
            input,
            saga_id=saga_id,
            definition_version=definition_version,
            labels=labels,
        )
        metadata = await self._call_metadata() + trace_headers()
        try:
            response = await self._stub.CreateSaga(
                request, timeout=self._timeout, metadata=metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_aio(exc) from None
        return CreateResult(saga_from_proto(response.saga), response.created)

    async def get(self, saga_id: str) -> Saga:
        """Return the saga with this id; `NotFound` when there is none."""
        try:
            response = await self._stub.GetSaga(
                get_request(saga_id), timeout=self._timeout, metadata=await self._call_metadata()
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_aio(exc) from None
        return saga_from_proto(response.saga)

    async def cancel(self, saga_id: str, reason: str = "", *, actor: str | None = None) -> Saga:
        """Cancel a running saga (it compensates); see `SagaClient.cancel`."""
        response = await self._call(self._stub.CancelSaga, cancel_request(saga_id, reason, actor))
        return saga_from_proto(response.saga)

    async def retry(
        self,
        saga_id: str,
        step: str = "",
        *,
        reason: str,
        actor: str | None = None,
        expected_version: int = 0,
    ) -> Saga:
        """Send a step's pending call again now; see `SagaClient.retry`."""
        request = retry_request(
            saga_id, step, reason=reason, actor=actor, expected_version=expected_version
        )
        return saga_from_proto((await self._call(self._stub.RetrySagaStep, request)).saga)

    async def resume(
        self,
        saga_id: str,
        *,
        reason: str,
        actor: str | None = None,
        expected_version: int = 0,
        compensation_retry: RetryPolicy | saga_pb2.RetryPolicy | None = None,
    ) -> Saga:
        """Take a saga parked on a failed compensation back to compensating; see `SagaClient`."""
        request = resume_request(
            saga_id,
            reason=reason,
            actor=actor,
            expected_version=expected_version,
            compensation_retry=compensation_retry,
        )
        return saga_from_proto((await self._call(self._stub.ResumeSaga, request)).saga)

    async def mark_compensated(
        self,
        saga_id: str,
        step: str = "",
        *,
        reason: str,
        actor: str | None = None,
        expected_version: int = 0,
    ) -> Saga:
        """Record that a step was undone by hand; see `SagaClient.mark_compensated`."""
        request = mark_compensated_request(
            saga_id, step, reason=reason, actor=actor, expected_version=expected_version
        )
        return saga_from_proto((await self._call(self._stub.MarkStepCompensated, request)).saga)

    async def complete(
        self,
        saga_id: str,
        step: str = "",
        *,
        reason: str,
        output: object = None,
        actor: str | None = None,
        expected_version: int = 0,
    ) -> Saga:
        """Record a stuck pivot or retriable step as succeeded; see `SagaClient.complete`."""
        request = complete_request(
            saga_id,
            step,
            reason=reason,
            output=output,
            actor=actor,
            expected_version=expected_version,
        )
        return saga_from_proto((await self._call(self._stub.CompleteStep, request)).saga)

    def events(
        self, saga_id: str, *, page_size: int = 100, newest_first: bool = False
    ) -> AsyncIterator[SagaEvent]:
        """Iterate over a saga's whole event log, oldest first (or newest first), page after
        page. Newest first reads the end of a long log without reading the rest."""
        # checks the arguments before the first call
        events_request(saga_id, page_size, newest_first=newest_first)

        async def pages() -> AsyncIterator[SagaEvent]:
            token = ""
            while True:
                response = await self._call(
                    self._stub.ListSagaEvents,
                    events_request(saga_id, page_size, token, newest_first=newest_first),
                )
                for event in response.events:
                    yield event_from_proto(event)
                token = response.next_page_token
                if not token:
                    return

        return pages()

    def changes(
        self,
        after_position: int = 0,
        *,
        from_now: bool = False,
        definition: str | None = None,
        states: Iterable[SagaState] = (),
        labels: Mapping[str, str] | None = None,
        follow: bool = True,
    ) -> AsyncIterator[SagaChange]:
        """The change feed; see `SagaClient.changes`."""
        request = changes_request(after_position, from_now, definition, states, labels, follow)

        async def stream() -> AsyncIterator[SagaChange]:
            pause = _RESUME_FIRST
            while True:
                call = self._stub.WatchChanges(request, metadata=await self._call_metadata())
                try:
                    async for response in call:
                        for change in response.changes:
                            yield change_from_proto(change)
                        request.after_position = response.position
                        request.from_now = False
                        pause = _RESUME_FIRST
                    return
                except grpc.aio.AioRpcError as exc:
                    error = error_from_aio(exc)
                    if error.code not in _RESUMABLE:
                        raise error from None
                finally:
                    call.cancel()
                await asyncio.sleep(pause)
                pause = min(pause * 2, _RESUME_MAX)

        return stream()

    async def count(
        self,
        *,
        definition: str | None = None,
        definition_version: int = 0,
        labels: Mapping[str, str] | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        stuck_on_participant: str | None = None,
        stuck_on_step: str | None = None,
    ) -> SagaCounts:
        """How many sagas are in each state, NEEDS_ATTENTION first; see `SagaClient.count`."""
        query = ListQuery.of(
            definition=definition,
            definition_version=definition_version,
            labels=labels,
            created_after=created_after,
            created_before=created_before,
            stuck_on_participant=stuck_on_participant,
            stuck_on_step=stuck_on_step,
        )
        return counts_from_proto(await self._call(self._stub.CountSagas, query.count()))

    async def definitions(self, name: str | None = None) -> list[DefinitionSummary]:
        """The registered definitions (or only `name`'s), each with its versions."""
        response = await self._call(self._stub.ListDefinitions, definitions_request(name))
        return [summary_from_proto(summary) for summary in response.definitions]

    async def definition(self, name: str, version: int = 0) -> RegisteredDefinition:
        """One version of a definition (0: the newest); `NotFound` when there is none."""
        response = await self._call(self._stub.GetDefinition, definition_request(name, version))
        return registered_from_proto(response)

    async def register_definition(
        self, definition: DefinitionInput, *, actor: str | None = None
    ) -> RegisterResult:
        """Register a new version of a definition; see `SagaClient.register_definition`."""
        request = register_request(definition, actor)
        return register_result_from_proto(await self._call(self._stub.RegisterDefinition, request))

    async def prune(self, older_than: timedelta, *, dry_run: bool = False) -> PruneResult:
        """Remove (or count) the sagas that ended longer ago; see `SagaClient.prune`."""
        response = await self._call(self._stub.PruneSagas, prune_request(older_than, dry_run))
        return prune_result_from_proto(response, dry_run)

    def watch(self, saga_id: str) -> AsyncIterator[SagaUpdate]:
        """Iterate over a saga's states until it settles; see `SagaClient.watch`."""
        request = watch_request(saga_id)

        async def stream() -> AsyncIterator[SagaUpdate]:
            call = self._stub.WatchSaga(request, metadata=await self._call_metadata())
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
            metadata = await self._call_metadata()
            call = self._stub.WatchSaga(request, timeout=remaining, metadata=metadata)
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
        definition_version: int = 0,
        labels: Mapping[str, str] | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        stuck_on_participant: str | None = None,
        stuck_on_step: str | None = None,
    ) -> AsyncIterator[Saga]:
        """Iterate over every saga matching the filters, page after page; see `SagaClient`."""
        query = ListQuery.of(
            states,
            definition,
            page_size,
            definition_version=definition_version,
            labels=labels,
            created_after=created_after,
            created_before=created_before,
            stuck_on_participant=stuck_on_participant,
            stuck_on_step=stuck_on_step,
        )

        async def pages() -> AsyncIterator[Saga]:
            token = ""
            while True:
                metadata = await self._call_metadata()
                try:
                    response = await self._stub.ListSagas(
                        query.page(token), timeout=self._timeout, metadata=metadata
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
