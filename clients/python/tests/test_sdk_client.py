"""SagaClient and AsyncSagaClient against a fake CoordinatorService on a real loopback server."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from saga.v1 import coordinator_service_pb2, coordinator_service_pb2_grpc, saga_pb2

from saga_sdk import (
    Aborted,
    AlreadyExists,
    AsyncSagaClient,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OperatorAction,
    RetryPolicy,
    SagaClient,
    SagaEventType,
    SagaRpcError,
    SagaState,
    StepKind,
    StepState,
    WaitTimeout,
    model,
)
from saga_sdk.requests import watch_request

DOMAIN = "saga.fake"
KNOWN_DEFINITIONS = {"onboard": 3, "offboard": 1}
SAGA_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SETTLED = {
    saga_pb2.SAGA_STATE_SUCCEEDED,
    saga_pb2.SAGA_STATE_COMPENSATED,
    saga_pb2.SAGA_STATE_NEEDS_ATTENTION,
}


def abort(
    context: grpc.ServicerContext,
    code: grpc.StatusCode,
    reason: str,
    message: str,
    violations: tuple[tuple[str, str], ...] = (),
) -> None:
    """End the call with a rich google.rpc.Status, as the real coordinator does."""
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata={"k": "v"}))
    details = [info]
    if violations:
        bad = any_pb2.Any()
        bad.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                    for f, d in violations
                ]
            )
        )
        details.append(bad)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details)
    context.abort_with_status(rpc_status.to_status(status))


@dataclass
class FakeCoordinator(coordinator_service_pb2_grpc.CoordinatorServiceServicer):
    """Keeps sagas in memory and lets the test move them; records what it was asked."""

    sagas: dict[str, saga_pb2.Saga] = field(default_factory=dict)
    requests: dict[str, coordinator_service_pb2.CreateSagaRequest] = field(default_factory=dict)
    list_requests: list[coordinator_service_pb2.ListSagasRequest] = field(default_factory=list)
    watch_requests: list[coordinator_service_pb2.WatchSagaRequest] = field(default_factory=list)
    watches: int = 0
    watch_messages: int = 0
    """How many WatchSaga messages were sent, over every watch."""
    break_watches: int = 0
    """How many of the next watches break with UNAVAILABLE after their first message (at once
    for a watch of the ending only, which has no message before the ending)."""
    honour_ending_only: bool = True
    """False plays a coordinator older than `ending_only`, which sends every change."""
    changed: threading.Condition = field(default_factory=threading.Condition)
    events: dict[str, list[saga_pb2.SagaEvent]] = field(default_factory=dict)
    event_requests: list[coordinator_service_pb2.ListSagaEventsRequest] = field(
        default_factory=list
    )
    count_requests: list[coordinator_service_pb2.CountSagasRequest] = field(default_factory=list)
    actions: list[Any] = field(default_factory=list)
    """Every operator action request, in order."""
    feed: list[coordinator_service_pb2.SagaChange] = field(default_factory=list)
    feed_requests: list[coordinator_service_pb2.WatchChangesRequest] = field(default_factory=list)
    break_feeds: int = 0
    """How many of the next change feed streams break (UNAVAILABLE) after their first message."""
    definitions: dict[tuple[str, int], saga_pb2.SagaDefinition] = field(default_factory=dict)
    prune_requests: list[coordinator_service_pb2.PruneSagasRequest] = field(default_factory=list)

    def CreateSaga(
        self, request: coordinator_service_pb2.CreateSagaRequest, context: grpc.ServicerContext
    ) -> coordinator_service_pb2.CreateSagaResponse:
        saga_id = request.saga_id or f"generated-{len(self.sagas) + 1}"
        if not SAGA_ID.match(saga_id):
            abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "INVALID_ARGUMENT",
                "the request is invalid",
                (("saga_id", "letters, digits, '.', '_' and '-' only"),),
            )
        if request.definition not in KNOWN_DEFINITIONS:
            abort(context, grpc.StatusCode.NOT_FOUND, "DEFINITION_NOT_FOUND", "no definition")
        with self.changed:
            if saga_id in self.sagas:
                if self.requests[saga_id] != request:
                    abort(
                        context,
                        grpc.StatusCode.ALREADY_EXISTS,
                        "SAGA_ALREADY_EXISTS",
                        f"saga {saga_id} exists with another request",
                    )
                return coordinator_service_pb2.CreateSagaResponse(
                    saga=self.sagas[saga_id], created=False
                )
            saga = saga_pb2.Saga(
                name=f"sagas/{saga_id}",
                saga_id=saga_id,
                definition=request.definition,
                definition_version=request.definition_version
                or KNOWN_DEFINITIONS[request.definition],
                state=saga_pb2.SAGA_STATE_RUNNING,
                input=request.input,
                steps=[
                    saga_pb2.StepRun(
                        name="open-account",
                        participant="accounts",
                        state=saga_pb2.STEP_STATE_RUNNING,
                        execute_attempts=1,
                    ),
                    saga_pb2.StepRun(
                        name="issue-card",
                        participant="cards",
                        kind=saga_pb2.STEP_KIND_PIVOT,
                        state=saga_pb2.STEP_STATE_PENDING,
                    ),
                ],
                version=1,
            )
            saga.create_time.GetCurrentTime()
            saga.update_time.CopyFrom(saga.create_time)
            self.sagas[saga_id] = saga
            self.requests[saga_id] = request
            return coordinator_service_pb2.CreateSagaResponse(saga=saga, created=True)

    def GetSaga(
        self, request: coordinator_service_pb2.GetSagaRequest, context: grpc.ServicerContext
    ) -> coordinator_service_pb2.GetSagaResponse:
        return coordinator_service_pb2.GetSagaResponse(saga=self._find(request.name, context))

    def ListSagas(
        self, request: coordinator_service_pb2.ListSagasRequest, context: grpc.ServicerContext
    ) -> coordinator_service_pb2.ListSagasResponse:
        self.list_requests.append(request)
        matching = [
            s
            for s in self.sagas.values()
            if (not request.states or s.state in request.states)
            and (not request.definition or s.definition == request.definition)
        ]
        start = int(request.page_token or "0")
        end = start + (request.page_size or 100)
        return coordinator_service_pb2.ListSagasResponse(
            sagas=matching[start:end],
            next_page_token=str(end) if end < len(matching) else "",
        )

    def WatchSaga(
        self, request: coordinator_service_pb2.WatchSagaRequest, context: grpc.ServicerContext
    ) -> Iterator[coordinator_service_pb2.WatchSagaResponse]:
        saga = self._find(request.name, context)
        ending_only = request.ending_only and self.honour_ending_only
        with self.changed:
            self.watch_requests.append(request)
            self.watches += 1
            breaks = self.break_watches > 0
            self.break_watches -= 1 if breaks else 0
        if not ending_only or saga.state in SETTLED:
            self.watch_messages += 1
            yield coordinator_service_pb2.WatchSagaResponse(saga=saga)
        if breaks:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the coordinator is restarting")
        seen = saga.version
        while context.is_active() and saga.state not in SETTLED:
            with self.changed:
                self.changed.wait(0.05)
                saga = self.sagas[saga.saga_id]
            if saga.version > seen and (not ending_only or saga.state in SETTLED):
                seen = saga.version
                event = saga_pb2.SagaEvent(
                    sequence=saga.version, type=saga_pb2.SAGA_EVENT_TYPE_STEP_SUCCEEDED, step="x"
                )
                event.time.GetCurrentTime()
                self.watch_messages += 1
                yield coordinator_service_pb2.WatchSagaResponse(saga=saga, event=event)

    def CancelSaga(
        self, request: coordinator_service_pb2.CancelSagaRequest, context: grpc.ServicerContext
    ) -> coordinator_service_pb2.CancelSagaResponse:
        saga = self._find(request.name, context)
        if saga.state in SETTLED:
            abort(context, grpc.StatusCode.FAILED_PRECONDITION, "SAGA_ENDED", "saga has ended")
        saga.cancel_reason = request.reason
        self.move(saga.saga_id, saga_pb2.SAGA_STATE_COMPENSATING)
        return coordinator_service_pb2.CancelSagaResponse(saga=self.sagas[saga.saga_id])

    def WatchChanges(
        self, request: coordinator_service_pb2.WatchChangesRequest, context: grpc.ServicerContext
    ) -> Iterator[coordinator_service_pb2.WatchChangesResponse]:
        self.feed_requests.append(request)
        rest = [c for c in self.feed if c.position > request.after_position]
        for index, change in enumerate(rest):
            yield coordinator_service_pb2.WatchChangesResponse(
                changes=[change], position=change.position
            )
            if index == 0 and self.break_feeds:
                self.break_feeds -= 1
                context.abort(grpc.StatusCode.UNAVAILABLE, "the coordinator is restarting")

    def ListSagaEvents(
        self, request: coordinator_service_pb2.ListSagaEventsRequest, context: grpc.ServicerContext
    ) -> coordinator_service_pb2.ListSagaEventsResponse:
        saga = self._find(request.name, context)
        self.event_requests.append(request)
        log = self.events.get(saga.saga_id, [])
        if request.newest_first:
            log = log[::-1]
        start = int(request.page_token or "0")
        end = start + (request.page_size or 100)
        return coordinator_service_pb2.ListSagaEventsResponse(
            events=log[start:end], next_page_token=str(end) if end < len(log) else ""
        )

    def CountSagas(
        self, request: coordinator_service_pb2.CountSagasRequest, context: grpc.ServicerContext
    ) -> coordinator_service_pb2.CountSagasResponse:
        self.count_requests.append(request)
        states = [saga_pb2.SAGA_STATE_NEEDS_ATTENTION] + [
            s for s in saga_pb2.SagaState.values() if s not in (0, 5)
        ]
        matching = [
            s
            for s in self.sagas.values()
            if not request.definition or s.definition == request.definition
        ]
        counts = [
            coordinator_service_pb2.StateCount(
                state=state, count=sum(1 for s in matching if s.state == state)
            )
            for state in states
        ]
        return coordinator_service_pb2.CountSagasResponse(counts=counts, total=len(matching))

    def _act(
        self, request: Any, context: grpc.ServicerContext, action: saga_pb2.OperatorAction.ValueType
    ) -> saga_pb2.Saga:
        """An operator action: refused as the coordinator refuses, else recorded in the audit."""
        saga = self._find(request.name, context)
        self.actions.append(request)
        if not request.reason:
            abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "INVALID_ARGUMENT",
                "the request is invalid",
                (("reason", "is required"),),
            )
        if request.expected_version and request.expected_version != saga.version:
            abort(
                context,
                grpc.StatusCode.ABORTED,
                "SAGA_VERSION_MISMATCH",
                f"saga is at version {saga.version}",
            )
        if saga.state == saga_pb2.SAGA_STATE_SUCCEEDED:
            abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                "ACTION_NOT_ALLOWED",
                "saga is SUCCEEDED; what fits now: nothing",
            )
        with self.changed:
            saga.version += 1
            saga.audit.add(
                sequence=saga.version,
                actor=request.actor,
                action=action,
                step=getattr(request, "step", ""),
                reason=request.reason,
            )
        return saga

    def RetrySagaStep(
        self, request: coordinator_service_pb2.RetrySagaStepRequest, context: grpc.ServicerContext
    ) -> coordinator_service_pb2.RetrySagaStepResponse:
        saga = self._act(request, context, saga_pb2.OPERATOR_ACTION_RETRY)
        return coordinator_service_pb2.RetrySagaStepResponse(saga=saga)

    def ResumeSaga(
        self, request: coordinator_service_pb2.ResumeSagaRequest, context: grpc.ServicerContext
    ) -> coordinator_service_pb2.ResumeSagaResponse:
        saga = self._act(request, context, saga_pb2.OPERATOR_ACTION_RESUME)
        return coordinator_service_pb2.ResumeSagaResponse(saga=saga)

    def MarkStepCompensated(
        self,
        request: coordinator_service_pb2.MarkStepCompensatedRequest,
        context: grpc.ServicerContext,
    ) -> coordinator_service_pb2.MarkStepCompensatedResponse:
        saga = self._act(request, context, saga_pb2.OPERATOR_ACTION_MARK_COMPENSATED)
        return coordinator_service_pb2.MarkStepCompensatedResponse(saga=saga)

    def CompleteStep(
        self, request: coordinator_service_pb2.CompleteStepRequest, context: grpc.ServicerContext
    ) -> coordinator_service_pb2.CompleteStepResponse:
        saga = self._act(request, context, saga_pb2.OPERATOR_ACTION_COMPLETE)
        return coordinator_service_pb2.CompleteStepResponse(saga=saga)

    def _info(
        self, definition: saga_pb2.SagaDefinition
    ) -> coordinator_service_pb2.DefinitionVersion:
        return coordinator_service_pb2.DefinitionVersion(
            version=definition.version,
            digest=f"{hash(definition.SerializeToString()) & 0xFFFF:04x}",
            step_count=len(definition.steps),
            unfinished_sagas=sum(
                1
                for s in self.sagas.values()
                if s.definition == definition.name and s.state not in SETTLED
            ),
        )

    def ListDefinitions(
        self, request: coordinator_service_pb2.ListDefinitionsRequest, context: grpc.ServicerContext
    ) -> coordinator_service_pb2.ListDefinitionsResponse:
        names = sorted({n for n, _ in self.definitions if not request.name or n == request.name})
        return coordinator_service_pb2.ListDefinitionsResponse(
            definitions=[
                coordinator_service_pb2.DefinitionSummary(
                    name=name,
                    versions=[
                        self._info(d) for (n, _), d in sorted(self.definitions.items()) if n == name
                    ],
                )
                for name in names
            ]
        )

    def GetDefinition(
        self, request: coordinator_service_pb2.GetDefinitionRequest, context: grpc.ServicerContext
    ) -> coordinator_service_pb2.GetDefinitionResponse:
        versions = [v for n, v in self.definitions if n == request.name]
        version = request.version or max(versions, default=0)
        if (request.name, version) not in self.definitions:
            abort(context, grpc.StatusCode.NOT_FOUND, "DEFINITION_NOT_FOUND", "no definition")
        definition = self.definitions[(request.name, version)]
        return coordinator_service_pb2.GetDefinitionResponse(
            definition=definition, info=self._info(definition)
        )

    def RegisterDefinition(
        self,
        request: coordinator_service_pb2.RegisterDefinitionRequest,
        context: grpc.ServicerContext,
    ) -> coordinator_service_pb2.RegisterDefinitionResponse:
        definition = request.definition
        key = (definition.name, definition.version)
        created = key not in self.definitions
        if not created and self.definitions[key] != definition:
            abort(
                context,
                grpc.StatusCode.ALREADY_EXISTS,
                "DEFINITION_VERSION_EXISTS",
                f"{definition.name} v{definition.version} exists with other content",
            )
        self.definitions[key] = definition
        return coordinator_service_pb2.RegisterDefinitionResponse(
            definition=definition, created=created, info=self._info(definition)
        )

    def PruneSagas(
        self, request: coordinator_service_pb2.PruneSagasRequest, context: grpc.ServicerContext
    ) -> coordinator_service_pb2.PruneSagasResponse:
        self.prune_requests.append(request)
        ended = [s for s in self.sagas.values() if s.state in SETTLED]
        if not request.dry_run:
            for saga in ended:
                del self.sagas[saga.saga_id]
        response = coordinator_service_pb2.PruneSagasResponse(
            sagas=len(ended), events=3 * len(ended)
        )
        response.cutoff.GetCurrentTime()
        return response

    def log(self, saga_id: str, count: int) -> None:
        """Give a saga an event log of `count` events."""
        self.events[saga_id] = [
            saga_pb2.SagaEvent(
                sequence=n,
                type=saga_pb2.SAGA_EVENT_TYPE_STEP_SUCCEEDED,
                step="open-account",
                operation="execute",
                action="OpenAccount",
                attempt=1,
            )
            for n in range(1, count + 1)
        ]

    def move(self, saga_id: str, state: saga_pb2.SagaState.ValueType) -> None:
        """Change a saga's state as the engine would, waking the watchers."""
        with self.changed:
            saga = self.sagas[saga_id]
            saga.state = state
            saga.version += 1
            saga.update_time.GetCurrentTime()
            if state in SETTLED:
                saga.end_time.GetCurrentTime()
                saga.steps[0].state = saga_pb2.STEP_STATE_SUCCEEDED
                saga.steps[0].output = b'{"account":"A-1"}'
            self.changed.notify_all()

    def _find(self, name: str, context: grpc.ServicerContext) -> saga_pb2.Saga:
        saga_id = name.removeprefix("sagas/")
        if saga_id not in self.sagas:
            abort(context, grpc.StatusCode.NOT_FOUND, "SAGA_NOT_FOUND", f"no saga {name}")
        return self.sagas[saga_id]


@pytest.fixture
def coordinator() -> Iterator[tuple[FakeCoordinator, str]]:
    """A fake coordinator served by a real gRPC server on a loopback port."""
    fake = FakeCoordinator()
    server = grpc.server(ThreadPoolExecutor(max_workers=16))
    coordinator_service_pb2_grpc.add_CoordinatorServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield fake, f"127.0.0.1:{port}"
    server.stop(0)


def later(seconds: float, action: object) -> threading.Timer:
    """Run `action` on a timer thread after `seconds`."""
    assert callable(action)
    timer = threading.Timer(seconds, action)
    timer.start()
    return timer


# --- blocking client ----------------------------------------------------------------------


def test_create_returns_the_typed_saga_and_a_replay_says_not_created(
    coordinator: tuple[FakeCoordinator, str],
) -> None:
    _, target = coordinator
    with SagaClient(target) as client:
        first = client.create("onboard", {"name": "ACME", "n": 1}, saga_id="acme-1")
        again = client.create("onboard", {"name": "ACME", "n": 1}, saga_id="acme-1")

    assert first.created is True
    assert again.created is False
    saga = first.saga
    assert saga.saga_id == "acme-1"
    assert saga.definition == "onboard"
    assert saga.definition_version == 3
    assert saga.state is SagaState.RUNNING
    assert saga.input == b'{"name":"ACME","n":1}'
    assert saga.input_json() == {"name": "ACME", "n": 1}
    assert saga.create_time is not None
    assert saga.create_time.tzinfo is not None
    assert abs((datetime.now(UTC) - saga.create_time).total_seconds()) < 60
    assert saga.end_time is None
    assert [s.name for s in saga.steps] == ["open-account", "issue-card"]
    assert saga.steps[0].kind is StepKind.COMPENSATABLE  # UNSPECIFIED reads as the default
    assert saga.steps[1].kind is StepKind.PIVOT
    assert saga.steps[1].state is StepState.PENDING
    assert saga.steps[0].output is None
    assert saga.steps[0].output_json() is None
    assert again.saga == saga


def test_create_sends_bytes_input_as_is_and_none_as_empty(
    coordinator: tuple[FakeCoordinator, str],
) -> None:
    fake, target = coordinator
    with SagaClient(target) as client:
        client.create("onboard", b"\x00raw", saga_id="raw")
        client.create("onboard", saga_id="empty", definition_version=2)
        generated = client.create("offboard", "text")

    assert fake.requests["raw"].input == b"\x00raw"
    assert fake.requests["empty"].input == b""
    assert fake.requests["empty"].definition_version == 2
    assert generated.saga.saga_id.startswith("generated-")
    assert generated.saga.input_json() == "text"


def test_same_id_with_another_request_raises_already_exists_with_its_error_info(
    coordinator: tuple[FakeCoordinator, str],
) -> None:
    _, target = coordinator
    with SagaClient(target) as client:
        client.create("onboard", {"a": 1}, saga_id="dup")
        with pytest.raises(AlreadyExists) as caught:
            client.create("onboard", {"a": 2}, saga_id="dup")

    error = caught.value
    assert error.code == grpc.StatusCode.ALREADY_EXISTS
    assert error.reason == "SAGA_ALREADY_EXISTS"
    assert error.domain == DOMAIN
    assert error.metadata == {"k": "v"}
    assert error.message == "saga dup exists with another request"
    assert "SAGA_ALREADY_EXISTS" in str(error)


def test_invalid_input_raises_invalid_argument_with_the_field_violations(
    coordinator: tuple[FakeCoordinator, str],
) -> None:
    _, target = coordinator
    with SagaClient(target) as client, pytest.raises(InvalidArgument) as caught:
        client.create("onboard", {}, saga_id="not valid!")

    assert caught.value.reason == "INVALID_ARGUMENT"
    assert caught.value.field_violations == (("saga_id", "letters, digits, '.', '_' and '-' only"),)
    assert caught.value.field_violations[0].field == "saga_id"


def test_unknown_saga_raises_not_found(coordinator: tuple[FakeCoordinator, str]) -> None:
    _, target = coordinator
    with SagaClient(target) as client, pytest.raises(NotFound) as caught:
        client.get("nope")

    assert caught.value.reason == "SAGA_NOT_FOUND"
    assert caught.value.message == "no saga sagas/nope"
    assert isinstance(caught.value, SagaRpcError)


def test_an_unreachable_coordinator_raises_unavailable() -> None:
    with SagaClient("127.0.0.1:1", timeout=5) as client, pytest.raises(SagaRpcError) as caught:
        client.get("x")

    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.reason == ""


def test_saga_ids_are_plain_ids() -> None:
    with SagaClient("127.0.0.1:1") as client:
        with pytest.raises(ValueError, match="plain saga id"):
            client.get("sagas/x")
        with pytest.raises(ValueError, match="empty"):
            client.watch("")


def test_list_walks_every_page_with_the_filters(coordinator: tuple[FakeCoordinator, str]) -> None:
    fake, target = coordinator
    with SagaClient(target) as client:
        for i in range(25):
            client.create("onboard" if i % 5 else "offboard", {"i": i}, saga_id=f"s-{i:02}")
        fake.move("s-03", saga_pb2.SAGA_STATE_SUCCEEDED)

        every = list(client.list(page_size=7))
        pages = len(fake.list_requests)
        onboard_running = list(
            client.list(states=[SagaState.RUNNING, "COMPENSATING"], definition="onboard")
        )

    assert [s.saga_id for s in every] == [f"s-{i:02}" for i in range(25)]
    assert pages == 4
    assert [r.page_token for r in fake.list_requests[:4]] == ["", "7", "14", "21"]
    assert {s.saga_id for s in onboard_running} == {
        f"s-{i:02}" for i in range(25) if i % 5 and i != 3
    }
    assert list(fake.list_requests[-1].states) == [
        saga_pb2.SAGA_STATE_RUNNING,
        saga_pb2.SAGA_STATE_COMPENSATING,
    ]


def test_list_rejects_a_page_size_out_of_range() -> None:
    with SagaClient("127.0.0.1:1") as client, pytest.raises(ValueError, match="page_size"):
        client.list(page_size=0)


def test_cancel_compensates_and_an_ended_saga_cannot_be_cancelled(
    coordinator: tuple[FakeCoordinator, str],
) -> None:
    fake, target = coordinator
    with SagaClient(target) as client:
        client.create("onboard", saga_id="c1")
        cancelled = client.cancel("c1", reason="customer left")
        fake.move("c1", saga_pb2.SAGA_STATE_COMPENSATED)
        with pytest.raises(FailedPrecondition) as caught:
            client.cancel("c1")

    assert cancelled.state is SagaState.COMPENSATING
    assert cancelled.cancel_reason == "customer left"
    assert caught.value.reason == "SAGA_ENDED"


def test_watch_yields_every_change_until_the_saga_settles(
    coordinator: tuple[FakeCoordinator, str],
) -> None:
    fake, target = coordinator
    with SagaClient(target) as client:
        client.create("onboard", saga_id="w1")
        later(0.2, lambda: fake.move("w1", saga_pb2.SAGA_STATE_COMPENSATING))
        later(0.4, lambda: fake.move("w1", saga_pb2.SAGA_STATE_COMPENSATED))
        updates = list(client.watch("w1"))

    assert [u.saga.state for u in updates] == [
        SagaState.RUNNING,
        SagaState.COMPENSATING,
        SagaState.COMPENSATED,
    ]
    assert [r.ending_only for r in fake.watch_requests] == [False]
    assert updates[0].event is None
    assert updates[2].event is not None
    assert updates[2].event.type is SagaEventType.STEP_SUCCEEDED
    assert updates[2].event.sequence == 3
    assert updates[2].event.time is not None
    assert updates[2].saga.end_time is not None
    assert updates[2].saga.steps[0].output_json() == {"account": "A-1"}


def test_watch_of_an_unknown_saga_raises_not_found(
    coordinator: tuple[FakeCoordinator, str],
) -> None:
    _, target = coordinator
    with SagaClient(target) as client, pytest.raises(NotFound):
        next(iter(client.watch("ghost")))


def test_wait_returns_the_settled_saga(coordinator: tuple[FakeCoordinator, str]) -> None:
    fake, target = coordinator
    with SagaClient(target) as client:
        client.create("onboard", saga_id="ok")
        later(0.3, lambda: fake.move("ok", saga_pb2.SAGA_STATE_SUCCEEDED))
        saga = client.wait("ok", timeout=10)

    assert saga.state is SagaState.SUCCEEDED
    assert saga.end_time is not None


def test_watch_request_asks_for_every_change_unless_told_the_ending_only() -> None:
    assert watch_request("s1") == coordinator_service_pb2.WatchSagaRequest(name="sagas/s1")
    assert watch_request("s1", ending_only=True).ending_only is True


def test_wait_asks_for_the_ending_only_and_gets_one_message(
    coordinator: tuple[FakeCoordinator, str],
) -> None:
    fake, target = coordinator
    with SagaClient(target) as client:
        client.create("onboard", saga_id="e1")
        later(0.2, lambda: fake.move("e1", saga_pb2.SAGA_STATE_COMPENSATING))
        later(0.4, lambda: fake.move("e1", saga_pb2.SAGA_STATE_COMPENSATED))
        saga = client.wait("e1", timeout=10)
        messages_while_running = fake.watch_messages
        again = client.wait("e1", timeout=10)  # already settled: its one message, at once

    assert saga.state is SagaState.COMPENSATED
    assert saga.end_time is not None
    assert again == saga
    assert [(r.name, r.ending_only) for r in fake.watch_requests] == [("sagas/e1", True)] * 2
    assert messages_while_running == 1
    assert fake.watch_messages == 2


def test_wait_converts_only_the_settled_saga_when_every_change_comes(
    coordinator: tuple[FakeCoordinator, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, target = coordinator
    fake.honour_ending_only = False  # a coordinator older than ending_only
    converted: list[int] = []
    convert = model.saga_from_proto

    def counting(saga: saga_pb2.Saga) -> model.Saga:
        converted.append(saga.state)
        return convert(saga)

    with SagaClient(target) as client:
        client.create("onboard", saga_id="old")
        monkeypatch.setattr(model, "saga_from_proto", counting)
        later(0.2, lambda: fake.move("old", saga_pb2.SAGA_STATE_COMPENSATING))
        later(0.4, lambda: fake.move("old", saga_pb2.SAGA_STATE_COMPENSATED))
        saga = client.wait("old", timeout=10)

    assert saga.state is SagaState.COMPENSATED
    assert fake.watch_messages == 3
    assert converted == [saga_pb2.SAGA_STATE_COMPENSATED]


def test_wait_gives_up_with_a_timeout_error(coordinator: tuple[FakeCoordinator, str]) -> None:
    _, target = coordinator
    with SagaClient(target) as client:
        client.create("onboard", saga_id="slow")
        started = time.monotonic()
        with pytest.raises(WaitTimeout) as caught:
            client.wait("slow", timeout=0.5)
    elapsed = time.monotonic() - started

    assert isinstance(caught.value, TimeoutError)
    assert caught.value.saga_id == "slow"
    assert 0.4 < elapsed < 5


def test_wait_watches_again_when_the_stream_breaks_with_unavailable(
    coordinator: tuple[FakeCoordinator, str],
) -> None:
    fake, target = coordinator
    with SagaClient(target) as client:
        client.create("onboard", saga_id="flaky")
        fake.break_watches = 2
        later(0.5, lambda: fake.move("flaky", saga_pb2.SAGA_STATE_NEEDS_ATTENTION))
        saga = client.wait("flaky", timeout=10)

    assert saga.state is SagaState.NEEDS_ATTENTION
    assert fake.watches >= 3
    assert all(r.ending_only for r in fake.watch_requests)
    assert fake.watch_messages == 1


def test_wait_raises_other_errors_at_once(coordinator: tuple[FakeCoordinator, str]) -> None:
    _, target = coordinator
    with SagaClient(target) as client, pytest.raises(NotFound):
        client.wait("ghost", timeout=10)


def test_wait_survives_a_coordinator_restart() -> None:
    fake = FakeCoordinator()
    first = grpc.server(ThreadPoolExecutor(max_workers=8))
    coordinator_service_pb2_grpc.add_CoordinatorServiceServicer_to_server(fake, first)
    port = first.add_insecure_port("127.0.0.1:0")
    first.start()
    second = grpc.server(ThreadPoolExecutor(max_workers=8))
    coordinator_service_pb2_grpc.add_CoordinatorServiceServicer_to_server(fake, second)

    def restart() -> None:
        first.stop(0)
        time.sleep(0.3)
        fake.move("r1", saga_pb2.SAGA_STATE_SUCCEEDED)
        assert second.add_insecure_port(f"127.0.0.1:{port}") == port
        second.start()

    try:
        with SagaClient(f"127.0.0.1:{port}") as client:
            client.create("onboard", saga_id="r1")
            later(0.3, restart)
            saga = client.wait("r1", timeout=20)
    finally:
        first.stop(0)
        second.stop(0)

    assert saga.state is SagaState.SUCCEEDED
    assert fake.watches >= 2
    assert all(r.ending_only for r in fake.watch_requests)


def test_a_given_channel_stays_open_after_close(coordinator: tuple[FakeCoordinator, str]) -> None:
    _, target = coordinator
    channel = grpc.insecure_channel(target)
    with SagaClient(channel=channel) as client:
        client.create("onboard", saga_id="ch")
    with SagaClient(channel=channel) as again:
        assert again.get("ch").saga_id == "ch"
    channel.close()
    with pytest.raises(ValueError, match="exactly one"):
        SagaClient(target, channel=channel)


# --- asyncio client -----------------------------------------------------------------------


async def test_async_create_get_and_already_exists(
    coordinator: tuple[FakeCoordinator, str],
) -> None:
    _, target = coordinator
    async with AsyncSagaClient(target) as client:
        result = await client.create("onboard", [1, 2], saga_id="a1")
        replay = await client.create("onboard", [1, 2], saga_id="a1")
        got = await client.get("a1")
        with pytest.raises(AlreadyExists) as caught:
            await client.create("onboard", [3], saga_id="a1")

    assert (result.created, replay.created) == (True, False)
    assert got == result.saga
    assert got.input_json() == [1, 2]
    assert caught.value.reason == "SAGA_ALREADY_EXISTS"
    assert caught.value.domain == DOMAIN


async def test_async_errors_carry_the_rich_status(coordinator: tuple[FakeCoordinator, str]) -> None:
    _, target = coordinator
    async with AsyncSagaClient(target) as client:
        with pytest.raises(InvalidArgument) as invalid:
            await client.create("onboard", saga_id="bad id")
        with pytest.raises(NotFound) as missing:
            await client.get("nope")

    assert [v.field for v in invalid.value.field_violations] == ["saga_id"]
    assert missing.value.reason == "SAGA_NOT_FOUND"
    assert missing.value.metadata == {"k": "v"}


async def test_async_list_walks_every_page(coordinator: tuple[FakeCoordinator, str]) -> None:
    fake, target = coordinator
    async with AsyncSagaClient(target) as client:
        for i in range(11):
            await client.create("onboard", saga_id=f"p{i:02}")
        sagas = [s.saga_id async for s in client.list(page_size=3, definition="onboard")]

    assert sagas == [f"p{i:02}" for i in range(11)]
    assert len(fake.list_requests) == 4


async def test_async_watch_and_wait(coordinator: tuple[FakeCoordinator, str]) -> None:
    fake, target = coordinator
    async with AsyncSagaClient(target) as client:
        await client.create("onboard", saga_id="aw")
        fake.break_watches = 1
        later(0.3, lambda: fake.move("aw", saga_pb2.SAGA_STATE_SUCCEEDED))
        waited = await client.wait("aw", timeout=10)
        updates = [u async for u in client.watch("aw")]
        cancelled_too_late = client.cancel("aw")
        with pytest.raises(FailedPrecondition):
            await cancelled_too_late

    assert waited.state is SagaState.SUCCEEDED
    assert fake.watches >= 3
    *by_wait, by_watch = fake.watch_requests
    assert len(by_wait) >= 2
    assert all(r.ending_only for r in by_wait)
    assert by_watch.ending_only is False
    assert [u.saga.state for u in updates] == [SagaState.SUCCEEDED]


async def test_async_wait_times_out(coordinator: tuple[FakeCoordinator, str]) -> None:
    _, target = coordinator
    async with AsyncSagaClient(target) as client:
        await client.create("onboard", saga_id="stuck")
        with pytest.raises(WaitTimeout):
            await client.wait("stuck", timeout=0.3)


async def test_async_wait_asks_for_the_ending_only_and_converts_only_it(
    coordinator: tuple[FakeCoordinator, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, target = coordinator
    fake.honour_ending_only = False  # every change comes: only the settled one is converted
    converted: list[int] = []
    convert = model.saga_from_proto

    def counting(saga: saga_pb2.Saga) -> model.Saga:
        converted.append(saga.state)
        return convert(saga)

    async with AsyncSagaClient(target) as client:
        await client.create("onboard", saga_id="ae")
        monkeypatch.setattr(model, "saga_from_proto", counting)
        later(0.2, lambda: fake.move("ae", saga_pb2.SAGA_STATE_COMPENSATING))
        later(0.4, lambda: fake.move("ae", saga_pb2.SAGA_STATE_NEEDS_ATTENTION))
        waited = await client.wait("ae", timeout=10)

    assert waited.state is SagaState.NEEDS_ATTENTION
    assert [(r.name, r.ending_only) for r in fake.watch_requests] == [("sagas/ae", True)]
    assert fake.watch_messages == 3
    assert converted == [saga_pb2.SAGA_STATE_NEEDS_ATTENTION]


# --- operator actions, events, counts, definitions, pruning --------------------------------


def test_operator_actions_are_recorded_with_reason_and_actor(
    coordinator: tuple[FakeCoordinator, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, target = coordinator
    monkeypatch.setenv("SAGA_ACTOR", "ops@example")
    with SagaClient(target) as client:
        client.create("onboard", saga_id="op")
        retried = client.retry("op", "issue-card", reason="cards is back", expected_version=1)
        resumed = client.resume(
            "op", reason="fixed", actor="ann", compensation_retry=RetryPolicy(max_attempts=9)
        )
        marked = client.mark_compensated("op", reason="closed by hand")
        completed = client.complete("op", "issue-card", reason="issued by hand", output={"c": 1})

    assert [e.action for e in completed.audit] == [
        OperatorAction.RETRY,
        OperatorAction.RESUME,
        OperatorAction.MARK_COMPENSATED,
        OperatorAction.COMPLETE,
    ]
    assert [e.actor for e in completed.audit] == [
        "ops@example",
        "ann",
        "ops@example",
        "ops@example",
    ]
    assert retried.audit[0].step == "issue-card"
    assert retried.audit[0].reason == "cards is back"
    assert (resumed.version, marked.version, completed.version) == (3, 4, 5)
    retry, resume, mark, complete = fake.actions
    assert retry.expected_version == 1
    assert resume.compensation_retry.max_attempts == 9
    assert mark.step == ""
    assert complete.output == b'{"c":1}'


def test_refused_actions_raise_with_the_coordinators_reason(
    coordinator: tuple[FakeCoordinator, str],
) -> None:
    fake, target = coordinator
    with SagaClient(target) as client:
        client.create("onboard", saga_id="r")
        with pytest.raises(Aborted) as stale:
            client.retry("r", reason="now", expected_version=7)
        with pytest.raises(InvalidArgument) as no_reason:
            client.complete("r", reason="")
        fake.move("r", saga_pb2.SAGA_STATE_SUCCEEDED)
        with pytest.raises(FailedPrecondition) as not_allowed:
            client.resume("r", reason="why not")
        with pytest.raises(NotFound):
            client.mark_compensated("ghost", reason="x")

    assert stale.value.reason == "SAGA_VERSION_MISMATCH"
    assert stale.value.code == grpc.StatusCode.ABORTED
    assert no_reason.value.field_violations == (("reason", "is required"),)
    assert not_allowed.value.reason == "ACTION_NOT_ALLOWED"
    assert "what fits now" in not_allowed.value.message


def test_events_walk_the_whole_log_page_by_page(
    coordinator: tuple[FakeCoordinator, str],
) -> None:
    fake, target = coordinator
    with SagaClient(target) as client:
        client.create("onboard", saga_id="ev")
        fake.log("ev", 250)
        events = list(client.events("ev"))
        with pytest.raises(NotFound):
            list(client.events("ghost"))
        with pytest.raises(ValueError, match="page_size"):
            client.events("ev", page_size=0)

    assert [e.sequence for e in events] == list(range(1, 251))
    assert [r.page_token for r in fake.event_requests[:3]] == ["", "100", "200"]
    assert events[0].action == "OpenAccount"
    assert events[0].operation == "execute"
    assert not any(r.newest_first for r in fake.event_requests)


def test_events_newest_first_asks_every_page_newest_first(
    coordinator: tuple[FakeCoordinator, str],
) -> None:
    fake, target = coordinator
    with SagaClient(target) as client:
        client.create("onboard", saga_id="ev")
        fake.log("ev", 250)
        events = list(client.events("ev", page_size=100, newest_first=True))
        with pytest.raises(TypeError, match="newest_first must be True or False"):
            client.events("ev", newest_first="yes")  # type: ignore[arg-type]

    assert [e.sequence for e in events] == list(range(250, 0, -1))
    assert [(r.page_token, r.newest_first) for r in fake.event_requests] == [
        ("", True),
        ("100", True),
        ("200", True),
    ]


async def test_async_events_newest_first_reads_the_end_first(
    coordinator: tuple[FakeCoordinator, str],
) -> None:
    fake, target = coordinator
    async with AsyncSagaClient(target) as client:
        await client.create("onboard", saga_id="ev")
        fake.log("ev", 30)
        events = [event async for event in client.events("ev", page_size=7, newest_first=True)]

    assert [e.sequence for e in events] == list(range(30, 0, -1))
    assert {r.newest_first for r in fake.event_requests} == {True}


def test_count_and_list_send_every_filter(coordinator: tuple[FakeCoordinator, str]) -> None:
    fake, target = coordinator
    since = datetime(2030, 1, 1, tzinfo=UTC)
    with SagaClient(target) as client:
        client.create("onboard", saga_id="c1", labels={"tenant": "t-1"})
        client.create("onboard", saga_id="c2")
        fake.move("c2", saga_pb2.SAGA_STATE_NEEDS_ATTENTION)
        counts = client.count(definition="onboard", labels={"tenant": "t-1"}, created_after=since)
        list(
            client.list(
                definition="onboard",
                definition_version=3,
                labels={"tenant": "t-1"},
                created_before=since,
                stuck_on_participant="cards",
                stuck_on_step="issue-card",
            )
        )

    assert next(iter(counts.counts)) is SagaState.NEEDS_ATTENTION
    assert (counts[SagaState.NEEDS_ATTENTION], counts["RUNNING"], counts.total) == (1, 1, 2)
    assert dict(fake.count_requests[0].labels) == {"tenant": "t-1"}
    assert fake.count_requests[0].created_after.ToDatetime(tzinfo=UTC) == since
    assert fake.requests["c1"].labels == {"tenant": "t-1"}
    listed = fake.list_requests[-1]
    assert listed.definition_version == 3
    assert listed.created_before.ToDatetime(tzinfo=UTC) == since
    assert (listed.stuck_on_participant, listed.stuck_on_step) == ("cards", "issue-card")


def test_definitions_are_registered_listed_and_fetched(
    coordinator: tuple[FakeCoordinator, str],
) -> None:
    _, target = coordinator
    v1 = {
        "name": "refund",
        "version": 1,
        "steps": [{"name": "pay", "participant": "billing", "action": "Refund"}],
    }
    v2 = {**v1, "version": 2, "description": "two"}
    with SagaClient(target) as client:
        first = client.register_definition(v1)
        again = client.register_definition(v1)
        client.register_definition(v2)
        with pytest.raises(AlreadyExists) as conflict:
            client.register_definition({**v1, "description": "changed"})
        newest = client.definition("refund")
        older = client.definition("refund", 1)
        summaries = client.definitions()
        with pytest.raises(NotFound):
            client.definition("nope")

    assert (first.created, again.created) == (True, False)
    assert conflict.value.reason == "DEFINITION_VERSION_EXISTS"
    assert newest.definition.version == 2
    assert newest.definition.description == "two"
    assert older.definition.steps[0].action == "Refund"
    assert newest.info is not None
    assert newest.info.step_count == 1
    assert [(s.name, [v.version for v in s.versions]) for s in summaries] == [("refund", [1, 2])]


def test_prune_sends_the_age_and_says_what_it_removed(
    coordinator: tuple[FakeCoordinator, str],
) -> None:
    fake, target = coordinator
    with SagaClient(target) as client:
        client.create("onboard", saga_id="old")
        fake.move("old", saga_pb2.SAGA_STATE_SUCCEEDED)
        counted = client.prune(timedelta(days=30), dry_run=True)
        still_there = client.get("old")
        pruned = client.prune(timedelta(days=30))
        with pytest.raises(NotFound):
            client.get("old")

    assert (counted.sagas, counted.events, counted.dry_run) == (1, 3, True)
    assert still_there.saga_id == "old"
    assert (pruned.sagas, pruned.dry_run) == (1, False)
    assert pruned.cutoff is not None
    assert fake.prune_requests[0].older_than.ToTimedelta() == timedelta(days=30)


async def test_async_twins_of_the_operator_and_registry_calls(
    coordinator: tuple[FakeCoordinator, str],
) -> None:
    fake, target = coordinator
    async with AsyncSagaClient(target) as client:
        await client.create("onboard", saga_id="aa", labels={"k": "v"})
        fake.log("aa", 5)
        await client.retry("aa", reason="r1", actor="a")
        await client.resume("aa", reason="r2", actor="a")
        await client.mark_compensated("aa", "open-account", reason="r3", actor="a")
        done = await client.complete("aa", reason="r4", actor="a", output=b"\x01")
        with pytest.raises(Aborted):
            await client.retry("aa", reason="r", expected_version=1)
        events = [e async for e in client.events("aa", page_size=2)]
        counts = await client.count(labels={"k": "v"})
        registered = await client.register_definition(
            {"name": "d", "version": 1, "steps": [{"name": "a", "participant": "p", "action": "A"}]}
        )
        fetched = await client.definition("d")
        listed = await client.definitions("d")
        pruned = await client.prune(timedelta(hours=1), dry_run=True)
        cancelled = await client.cancel("aa", "bye", actor="b")

    assert [e.reason for e in done.audit] == ["r1", "r2", "r3", "r4"]
    assert fake.actions[3].output == b"\x01"
    assert len(events) == 5
    assert len(fake.event_requests) == 3
    assert counts.total == 1
    assert registered.created
    assert fetched.definition.name == "d"
    assert [s.name for s in listed] == ["d"]
    assert pruned.dry_run
    assert cancelled.cancel_reason == "bye"


def _feed_change(position: int, saga_id: str) -> coordinator_service_pb2.SagaChange:
    return coordinator_service_pb2.SagaChange(
        position=position,
        saga_id=saga_id,
        definition="onboard",
        definition_version=1,
        state=saga_pb2.SAGA_STATE_RUNNING,
        event=saga_pb2.SagaEvent(sequence=1, type=saga_pb2.SAGA_EVENT_TYPE_CREATED),
        labels={"tenant": "acme"},
    )


def test_changes_reopen_a_broken_feed_after_the_last_position(
    coordinator: tuple[FakeCoordinator, str],
) -> None:
    fake, target = coordinator
    fake.feed = [_feed_change(p, f"s-{p}") for p in (3, 7, 9)]
    fake.break_feeds = 1
    with SagaClient(target) as client:
        changes = list(client.changes(follow=False, definition="onboard"))

    assert [(c.position, c.saga_id, c.state) for c in changes] == [
        (3, "s-3", SagaState.RUNNING),
        (7, "s-7", SagaState.RUNNING),
        (9, "s-9", SagaState.RUNNING),
    ]
    assert dict(changes[0].labels) == {"tenant": "acme"}
    assert [(r.after_position, r.definition, r.no_follow) for r in fake.feed_requests] == [
        (0, "onboard", True),
        (3, "onboard", True),
    ]


async def test_async_changes_reopen_a_broken_feed(coordinator: tuple[FakeCoordinator, str]) -> None:
    fake, target = coordinator
    fake.feed = [_feed_change(p, f"s-{p}") for p in (1, 2)]
    fake.break_feeds = 1
    async with AsyncSagaClient(target) as client:
        positions = [c.position async for c in client.changes(0, follow=False)]

    assert positions == [1, 2]
    assert [r.after_position for r in fake.feed_requests] == [0, 1]
