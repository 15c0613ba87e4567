"""CoordinatorService: what clients and operators call, checked and translated for the engine."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import grpc
from google.protobuf import timestamp_pb2
from saga.v1 import coordinator_service_pb2 as pb
from saga.v1 import coordinator_service_pb2_grpc as pb_grpc

from coordinator.core.definitions import NAME_RULE, is_valid_name, retry_violations
from coordinator.core.errors import (
    ActionNotAllowed,
    FeedConsumerTooSlow,
    FieldViolation,
    InvalidArgument,
)
from coordinator.core.events import (
    CompleteRequested,
    MarkCompensated,
    OperatorEvent,
    ResumeRequested,
    RetryRequested,
)
from coordinator.core.machine import waiting_step
from coordinator.core.model import Saga, SagaState
from coordinator.engine import Engine
from coordinator.ports import ChangeFilter, FeedChange, ListCursor, RegisteredDefinition, SagaFilter
from coordinator.telemetry import SagaTelemetry, headers_of, now_ns
from coordinator.transport.access import current_caller
from coordinator.transport.convert import (
    Renderings,
    definition_from_proto,
    definition_to_proto,
    event_proto,
    event_to_proto,
    retry_policy_from_proto,
    saga_state_from_proto,
    saga_state_to_proto,
    saga_to_proto,
)
from coordinator.watchers import SagaChange

log = logging.getLogger("coordinator.transport")

MAX_PAGE_SIZE = 1000
MAX_REASON = 1024
MAX_ACTOR = 256
DEFAULT_PAGE_SIZE = 100
MAX_LABELS = 16
MAX_LABEL_VALUE = 256
LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")
MIN_PRUNE_AGE = timedelta(minutes=1)
# Counts are listed with the states that need people first.
COUNT_ORDER = (
    SagaState.NEEDS_ATTENTION,
    SagaState.RUNNING,
    SagaState.COMPENSATING,
    SagaState.SUCCEEDED,
    SagaState.COMPENSATED,
)

T = TypeVar("T")
_ActionRequest = (
    pb.RetrySagaStepRequest
    | pb.ResumeSagaRequest
    | pb.MarkStepCompensatedRequest
    | pb.CompleteStepRequest
)
_EventOf = Callable[[int, str, str, bool], OperatorEvent]
"""Builds an operator event from (step index, actor, reason, call in flight)."""


def saga_id_of(name: str, field: str = "name") -> str:
    """The id in a resource name ``sagas/{id}``; InvalidArgument otherwise."""
    saga_id = name.removeprefix("sagas/")
    if not name.startswith("sagas/") or not is_valid_name(saga_id):
        raise InvalidArgument(
            f"invalid saga name {name[:200]!r}: expected sagas/{{id}}",
            (FieldViolation(field, f"expected sagas/{{id}} where id is {NAME_RULE}"),),
        )
    return saga_id


def _filter_key(where: SagaFilter) -> str:
    text = json.dumps(
        [
            sorted(s.value for s in where.states),
            where.definition,
            where.definition_version,
            sorted(where.labels),
            where.created_after.isoformat() if where.created_after else None,
            where.created_before.isoformat() if where.created_before else None,
            where.stuck_on_participant,
            where.stuck_on_step,
        ]
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def states_of(values: Iterable[int], violations: list[FieldViolation]) -> frozenset[SagaState]:
    """The saga states a request names; an unknown or unspecified one goes to ``violations``."""
    states = set()
    for i, value in enumerate(values):
        try:
            states.add(saga_state_from_proto(value))
        except ValueError as error:
            violations.append(FieldViolation(f"states[{i}]", str(error)))
    return frozenset(states)


def label_violations(labels: Mapping[str, str], field: str) -> list[FieldViolation]:
    """Everything wrong with a set of labels."""
    problems = []
    if len(labels) > MAX_LABELS:
        problems.append(FieldViolation(field, f"at most {MAX_LABELS} labels"))
    for key, value in sorted(labels.items()):
        if not LABEL_KEY.match(key):
            problems.append(
                FieldViolation(
                    f"{field}[{key[:64]!r}]",
                    "a key is 1 to 63 letters, digits, '.', '_', '-' or '/', "
                    "starting with a letter or digit",
                )
            )
        if len(value) > MAX_LABEL_VALUE:
            problems.append(
                FieldViolation(f"{field}[{key[:64]!r}]", f"at most {MAX_LABEL_VALUE} characters")
            )
        elif "\x00" in value:
            problems.append(FieldViolation(f"{field}[{key[:64]!r}]", NO_NUL))
    return problems


NO_NUL = "must not contain the NUL character"


def _time(value: timestamp_pb2.Timestamp) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(
        seconds=value.seconds, microseconds=value.nanos // 1000
    )


def saga_filter(
    request: pb.ListSagasRequest | pb.CountSagasRequest,
    states: frozenset[SagaState],
    violations: list[FieldViolation],
) -> SagaFilter:
    """The filter a listing or count request asks for; problems go to ``violations``."""
    if request.definition and not is_valid_name(request.definition):
        violations.append(FieldViolation("definition", f"must be {NAME_RULE}"))
    if request.definition_version and not request.definition:
        violations.append(
            FieldViolation("definition_version", "a version needs the definition's name")
        )
    violations.extend(label_violations(request.labels, "labels"))
    for field in ("stuck_on_participant", "stuck_on_step"):
        value = getattr(request, field)
        if value and not is_valid_name(value):
            violations.append(FieldViolation(field, f"must be {NAME_RULE}"))
    after = _time(request.created_after) if request.HasField("created_after") else None
    before = _time(request.created_before) if request.HasField("created_before") else None
    if after is not None and before is not None and before <= after:
        violations.append(FieldViolation("created_before", "must be later than created_after"))
    return SagaFilter(
        states=states,
        definition=request.definition or None,
        definition_version=request.definition_version or None,
        labels=tuple(sorted(request.labels.items())),
        created_after=after,
        created_before=before,
        stuck_on_participant=request.stuck_on_participant or None,
        stuck_on_step=request.stuck_on_step or None,
    )


def actor_of(asked: str) -> str:
    """Who an action is recorded as taken by: the authenticated caller when calls are
    authenticated (what a request says is then ignored), else what the request says."""
    identity = current_caller().identity
    return identity or asked


def _action_violations(reason: str, actor: str) -> list[FieldViolation]:
    problems = []
    if not reason.strip():
        problems.append(FieldViolation("reason", "is required: say why, for the audit trail"))
    elif len(reason) > MAX_REASON:
        problems.append(FieldViolation("reason", f"at most {MAX_REASON} characters"))
    elif "\x00" in reason:
        problems.append(FieldViolation("reason", NO_NUL))
    if len(actor) > MAX_ACTOR:
        problems.append(FieldViolation("actor", f"at most {MAX_ACTOR} characters"))
    elif "\x00" in actor:
        problems.append(FieldViolation("actor", NO_NUL))
    return problems


def step_index(saga: Saga, name: str, verb: str) -> int:
    """The index of the step ``name`` (empty: the step the saga waits on or is parked on)."""
    if not name:
        index = waiting_step(saga)
        if index is None:
            raise ActionNotAllowed(
                f"{verb} does not fit saga {saga.saga_id}: it has ended {saga.state}; "
                "what fits now: none"
            )
        return index
    for index, step in enumerate(saga.steps):
        if step.name == name:
            return index
    names = ", ".join(step.name for step in saga.steps)
    raise InvalidArgument(
        f"saga {saga.saga_id} has no step {name[:200]!r}",
        (FieldViolation("step", f"one of the saga's steps: {names}"),),
    )


def _change_to_proto(change: FeedChange) -> pb.SagaChange:
    message = pb.SagaChange(
        position=change.position,
        saga_id=change.saga_id,
        definition=change.definition.name,
        definition_version=change.definition.version,
        event=event_proto(change.record, change.definition),
        labels=change.labels,
    )
    if change.state is not None:
        message.state = saga_state_to_proto(change.state)
    return message


def _version_info(registered: RegisteredDefinition) -> pb.DefinitionVersion:
    info = pb.DefinitionVersion(
        version=registered.definition.version,
        digest=registered.digest,
        unfinished_sagas=registered.unfinished,
        step_count=len(registered.definition.steps),
    )
    info.register_time.FromDatetime(registered.registered_at)
    return info


def encode_page_token(cursor: ListCursor, where: SagaFilter) -> str:
    """An opaque token for the page after ``cursor``, bound to the listing's filters."""
    body = json.dumps(
        {"t": cursor.created_at.isoformat(), "i": cursor.saga_id, "f": _filter_key(where)}
    )
    return _token_of(body)


def _token_of(body: str) -> str:
    """A page token: its body in unpadded URL-safe base64."""
    return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


def _body_of(token: str) -> str:
    """The body of ``_token_of``; ValueError (or binascii.Error) for anything else."""
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()


def decode_page_token(token: str, where: SagaFilter) -> ListCursor:
    """The cursor inside a page token; InvalidArgument if it is not one of ours or filters moved."""
    try:
        body = json.loads(_body_of(token))
        created_at = datetime.fromisoformat(body["t"])
        if created_at.tzinfo is None:
            raise ValueError("a page token's time is in UTC")
        cursor = ListCursor(created_at, str(body["i"]))
        key = body["f"]
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
        raise InvalidArgument(
            "invalid page_token",
            (FieldViolation("page_token", "not a token returned by ListSagas"),),
        ) from None
    if key != _filter_key(where):
        raise InvalidArgument(
            "page_token was issued for other filters",
            (FieldViolation("page_token", "the filters must stay the same across pages"),),
        )
    return cursor


_NEWEST_FIRST = "<"
"""What starts the body of a newest-first ListSagaEvents token."""
_SEQUENCE = re.compile(r"[0-9]{1,18}")


def _events_token(sequence: int, newest_first: bool) -> str:
    """An opaque ListSagaEvents token: the page after the event ``sequence`` in the order read."""
    return _token_of(f"{_NEWEST_FIRST if newest_first else ''}{sequence}")


def _events_cursor(token: str, newest_first: bool) -> int:
    """The sequence inside an ``_events_token``; ValueError (saying why) for anything else."""
    try:
        body = _body_of(token)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ValueError("not a token returned by ListSagaEvents") from None
    backwards = body.startswith(_NEWEST_FIRST)
    digits = body.removeprefix(_NEWEST_FIRST)
    if not _SEQUENCE.fullmatch(digits) or (backwards and int(digits) < 1):
        raise ValueError("not a token returned by ListSagaEvents")
    if backwards != newest_first:
        order = "newest first" if backwards else "oldest first"
        raise ValueError(f"a token of a page read {order}: keep newest_first the same")
    return int(digits)


class CoordinatorServicer(pb_grpc.CoordinatorServiceServicer):
    """Validates requests and calls the engine; it raises the coordinator's errors, which
    ``coordinator.transport.server`` turns into rich statuses for every method alike."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_payload_bytes: int,
        telemetry: SagaTelemetry | None = None,
        feed_stall_timeout: float = 30.0,
    ) -> None:
        self._engine = engine
        self._max_payload_bytes = max_payload_bytes
        self._feed_stall_timeout = feed_stall_timeout
        self._telemetry = telemetry or SagaTelemetry()
        self._saga = Renderings(saga_to_proto)
        self._watch_response = Renderings(self._render_change, size=1024)

    async def CreateSaga(
        self,
        request: pb.CreateSagaRequest,
        context: grpc.aio.ServicerContext[pb.CreateSagaRequest, pb.CreateSagaResponse],
    ) -> pb.CreateSagaResponse:
        """Start a saga; answer once it is stored."""

        violations = []
        if request.saga_id and not is_valid_name(request.saga_id):
            violations.append(FieldViolation("saga_id", f"must be {NAME_RULE}"))
        if not request.definition:
            violations.append(FieldViolation("definition", "is required"))
        elif not is_valid_name(request.definition):
            violations.append(FieldViolation("definition", f"must be {NAME_RULE}"))
        if len(request.input) > self._max_payload_bytes:
            violations.append(FieldViolation("input", f"at most {self._max_payload_bytes} bytes"))
        violations.extend(label_violations(request.labels, "labels"))
        if violations:
            raise InvalidArgument("invalid CreateSaga request", tuple(violations))
        began = now_ns()
        client_headers = headers_of(context.invocation_metadata() or ())
        saga, created = await self._engine.create_saga(
            request.saga_id or None,
            request.definition,
            request.definition_version,
            request.input,
            client_headers,
            labels=dict(request.labels),
        )
        self._telemetry.record_create(client_headers, saga, created, began)
        return pb.CreateSagaResponse(saga=self._saga(saga), created=created)

    async def GetSaga(
        self,
        request: pb.GetSagaRequest,
        context: grpc.aio.ServicerContext[pb.GetSagaRequest, pb.GetSagaResponse],
    ) -> pb.GetSagaResponse:
        """Return one saga."""

        saga = await self._engine.get_saga(saga_id_of(request.name))
        current_caller().check_definition(saga.definition.name)
        return pb.GetSagaResponse(saga=self._saga(saga))

    async def ListSagas(
        self,
        request: pb.ListSagasRequest,
        context: grpc.aio.ServicerContext[pb.ListSagasRequest, pb.ListSagasResponse],
    ) -> pb.ListSagasResponse:
        """Return one page of sagas, oldest first."""

        violations: list[FieldViolation] = []
        states = states_of(request.states, violations)
        if not 0 <= request.page_size <= MAX_PAGE_SIZE:
            violations.append(FieldViolation("page_size", f"must be from 0 to {MAX_PAGE_SIZE}"))
        where = saga_filter(request, states, violations)
        if violations:
            raise InvalidArgument("invalid ListSagas request", tuple(violations))
        after = decode_page_token(request.page_token, where) if request.page_token else None
        page = await self._engine.list_sagas(where, request.page_size or DEFAULT_PAGE_SIZE, after)
        token = encode_page_token(page.next_cursor, where) if page.next_cursor else ""
        return pb.ListSagasResponse(
            sagas=[self._saga(s) for s in page.sagas], next_page_token=token
        )

    async def WatchSaga(
        self,
        request: pb.WatchSagaRequest,
        context: grpc.aio.ServicerContext[pb.WatchSagaRequest, pb.WatchSagaResponse],
    ) -> AsyncIterator[pb.WatchSagaResponse]:
        """Stream the saga's state, then every change until it settles; or the ending only."""
        await self._in_scope(saga_id_of(request.name))
        changes = self._engine.watch(saga_id_of(request.name), ending_only=request.ending_only)
        async for change in changes:
            yield self._watch_response(change)

    def _render_change(self, change: SagaChange) -> pb.WatchSagaResponse:
        """One watch message per change, shared by all the watchers of the saga."""
        response = pb.WatchSagaResponse(saga=self._saga(change.saga))
        if change.event is not None:
            response.event.CopyFrom(event_to_proto(change.event, change.saga))
        return response

    async def CancelSaga(
        self,
        request: pb.CancelSagaRequest,
        context: grpc.aio.ServicerContext[pb.CancelSagaRequest, pb.CancelSagaResponse],
    ) -> pb.CancelSagaResponse:
        """Cancel a running saga; answer once the cancellation is stored."""

        if len(request.reason) > MAX_REASON:
            raise InvalidArgument(
                "reason is too long", (FieldViolation("reason", "at most 1024 characters"),)
            )
        if len(request.actor) > MAX_ACTOR:
            raise InvalidArgument(
                "actor is too long", (FieldViolation("actor", f"at most {MAX_ACTOR} characters"),)
            )
        nul = [name for name in ("reason", "actor") if "\x00" in getattr(request, name)]
        if nul:
            raise InvalidArgument(
                "invalid CancelSaga request", tuple(FieldViolation(n, NO_NUL) for n in nul)
            )
        await self._in_scope(saga_id_of(request.name))
        saga = await self._engine.cancel_saga(
            saga_id_of(request.name), request.reason, actor_of(request.actor)
        )
        return pb.CancelSagaResponse(saga=self._saga(saga))

    async def ListSagaEvents(
        self,
        request: pb.ListSagaEventsRequest,
        context: grpc.aio.ServicerContext[pb.ListSagaEventsRequest, pb.ListSagaEventsResponse],
    ) -> pb.ListSagaEventsResponse:
        """Return one page of a saga's event log."""
        saga_id = saga_id_of(request.name)
        violations = []
        if not 0 <= request.page_size <= MAX_PAGE_SIZE:
            violations.append(FieldViolation("page_size", f"must be from 0 to {MAX_PAGE_SIZE}"))
        after = 0
        if request.page_token:
            try:
                after = _events_cursor(request.page_token, request.newest_first)
            except ValueError as error:
                violations.append(FieldViolation("page_token", str(error)))
        if violations:
            raise InvalidArgument("invalid ListSagaEvents request", tuple(violations))
        size = request.page_size or DEFAULT_PAGE_SIZE
        saga, events = await self._engine.saga_events(
            saga_id, after, size + 1, newest_first=request.newest_first
        )
        current_caller().check_definition(saga.definition.name)
        page = events[:size]
        token = ""
        if len(events) > size:
            token = _events_token(page[-1].sequence, request.newest_first)
        return pb.ListSagaEventsResponse(
            events=[event_to_proto(record, saga) for record in page], next_page_token=token
        )

    async def CountSagas(
        self,
        request: pb.CountSagasRequest,
        context: grpc.aio.ServicerContext[pb.CountSagasRequest, pb.CountSagasResponse],
    ) -> pb.CountSagasResponse:
        """Count the sagas in each state."""
        violations: list[FieldViolation] = []
        where = saga_filter(request, frozenset(), violations)
        if violations:
            raise InvalidArgument("invalid CountSagas request", tuple(violations))
        counts = await self._engine.count_sagas(where)
        return pb.CountSagasResponse(
            counts=[
                pb.StateCount(state=saga_state_to_proto(state), count=counts[state])
                for state in COUNT_ORDER
            ],
            total=sum(counts.values()),
        )

    async def _act(self, request: _ActionRequest, verb: str, event: _EventOf) -> Saga:
        """Check an operator action's request, then have the engine apply the event ``event``
        builds from the saga as it stands (its step resolved there, under the saga's lock)."""
        violations = _action_violations(request.reason, request.actor)
        step = getattr(request, "step", "")
        if step and not is_valid_name(step):
            violations.append(FieldViolation("step", f"must be {NAME_RULE}"))
        saga_id = saga_id_of(request.name)
        if violations:
            raise InvalidArgument(f"invalid {verb} request", tuple(violations))

        await self._in_scope(saga_id)
        actor = actor_of(request.actor)

        def build(saga: Saga, in_flight: bool) -> OperatorEvent:
            index = step_index(saga, step, verb)
            return event(index, actor, request.reason, in_flight)

        return await self._engine.act(saga_id, build, request.expected_version)

    async def _in_scope(self, saga_id: str) -> None:
        """Refuse a caller limited to some definitions a saga of another (PERMISSION_DENIED)."""
        caller = current_caller()
        if caller.definitions is not None:
            saga = await self._engine.get_saga(saga_id)
            caller.check_definition(saga.definition.name)

    async def RetrySagaStep(
        self,
        request: pb.RetrySagaStepRequest,
        context: grpc.aio.ServicerContext[pb.RetrySagaStepRequest, pb.RetrySagaStepResponse],
    ) -> pb.RetrySagaStepResponse:
        """Send a step's pending call again now."""
        saga = await self._act(request, "retry", RetryRequested)
        return pb.RetrySagaStepResponse(saga=self._saga(saga))

    async def ResumeSaga(
        self,
        request: pb.ResumeSagaRequest,
        context: grpc.aio.ServicerContext[pb.ResumeSagaRequest, pb.ResumeSagaResponse],
    ) -> pb.ResumeSagaResponse:
        """Take a saga parked on a failed compensation back to compensating."""
        policy = None
        if request.HasField("compensation_retry"):
            policy = retry_policy_from_proto(request.compensation_retry)
            problems = list(retry_violations("compensation_retry", policy))
            if problems:
                raise InvalidArgument("invalid compensation_retry", tuple(problems))

        def resumed(step: int, actor: str, reason: str, in_flight: bool) -> OperatorEvent:
            return ResumeRequested(actor, reason, policy)

        saga = await self._act(request, "resume", resumed)
        return pb.ResumeSagaResponse(saga=self._saga(saga))

    async def MarkStepCompensated(
        self,
        request: pb.MarkStepCompensatedRequest,
        context: grpc.aio.ServicerContext[
            pb.MarkStepCompensatedRequest, pb.MarkStepCompensatedResponse
        ],
    ) -> pb.MarkStepCompensatedResponse:
        """Record a step as compensated by hand."""
        saga = await self._act(request, "mark-compensated", MarkCompensated)
        return pb.MarkStepCompensatedResponse(saga=self._saga(saga))

    async def CompleteStep(
        self,
        request: pb.CompleteStepRequest,
        context: grpc.aio.ServicerContext[pb.CompleteStepRequest, pb.CompleteStepResponse],
    ) -> pb.CompleteStepResponse:
        """Record a stuck pivot or retriable step as succeeded."""
        if len(request.output) > self._max_payload_bytes:
            raise InvalidArgument(
                "output is too large",
                (FieldViolation("output", f"at most {self._max_payload_bytes} bytes"),),
            )

        def completed(step: int, actor: str, reason: str, in_flight: bool) -> OperatorEvent:
            return CompleteRequested(step, request.output, actor, reason, in_flight)

        saga = await self._act(request, "complete", completed)
        return pb.CompleteStepResponse(saga=self._saga(saga))

    async def WatchChanges(  # type: ignore[override]  # writes its stream itself, timed
        self,
        request: pb.WatchChangesRequest,
        context: grpc.aio.ServicerContext[pb.WatchChangesRequest, pb.WatchChangesResponse],
    ) -> None:
        """Stream the change feed; cut off a consumer that stops reading."""
        violations: list[FieldViolation] = []
        states = states_of(request.states, violations)
        if request.definition and not is_valid_name(request.definition):
            violations.append(FieldViolation("definition", f"must be {NAME_RULE}"))
        violations.extend(label_violations(request.labels, "labels"))
        if violations:
            raise InvalidArgument("invalid WatchChanges request", tuple(violations))
        where = ChangeFilter(
            request.definition or None, states, tuple(sorted(request.labels.items()))
        )
        after = None if request.from_now else request.after_position
        pages = self._engine.changes(after, where, follow=not request.no_follow)
        async for page in pages:
            response = pb.WatchChangesResponse(
                changes=[_change_to_proto(change) for change in page.changes],
                position=page.position,
            )
            try:
                # A consumer that does not take what it asked for within the timeout is cut
                # off: nothing is buffered for it, and it resumes from its position.
                await asyncio.wait_for(context.write(response), timeout=self._feed_stall_timeout)
            except TimeoutError:
                raise FeedConsumerTooSlow(
                    f"the consumer read nothing for {self._feed_stall_timeout:g}s and was cut "
                    f"off; resume after the last position it processed"
                ) from None
            except Exception as error:  # the write itself failed: the stream is gone
                log.debug("change feed consumer went away while a write waited: %r", error)
                return

    async def ListDefinitions(
        self,
        request: pb.ListDefinitionsRequest,
        context: grpc.aio.ServicerContext[pb.ListDefinitionsRequest, pb.ListDefinitionsResponse],
    ) -> pb.ListDefinitionsResponse:
        """List the registered definitions and their versions."""
        if request.name and not is_valid_name(request.name):
            raise InvalidArgument(
                "invalid definition name", (FieldViolation("name", f"must be {NAME_RULE}"),)
            )
        registered = await self._engine.definitions(request.name or None)
        summaries: dict[str, pb.DefinitionSummary] = {}
        caller = current_caller()
        for entry in registered:
            if not caller.may_use(entry.definition.name):
                continue
            summary = summaries.setdefault(
                entry.definition.name, pb.DefinitionSummary(name=entry.definition.name)
            )
            summary.versions.append(_version_info(entry))
            summary.description = entry.definition.description
        return pb.ListDefinitionsResponse(definitions=list(summaries.values()))

    async def GetDefinition(
        self,
        request: pb.GetDefinitionRequest,
        context: grpc.aio.ServicerContext[pb.GetDefinitionRequest, pb.GetDefinitionResponse],
    ) -> pb.GetDefinitionResponse:
        """Return one version of a definition."""
        if not is_valid_name(request.name):
            raise InvalidArgument(
                "invalid definition name", (FieldViolation("name", f"must be {NAME_RULE}"),)
            )
        registered = await self._engine.definition(request.name, request.version)
        return pb.GetDefinitionResponse(
            definition=definition_to_proto(registered.definition), info=_version_info(registered)
        )

    async def RegisterDefinition(
        self,
        request: pb.RegisterDefinitionRequest,
        context: grpc.aio.ServicerContext[
            pb.RegisterDefinitionRequest, pb.RegisterDefinitionResponse
        ],
    ) -> pb.RegisterDefinitionResponse:
        """Register a new version of a definition."""
        if not request.HasField("definition"):
            raise InvalidArgument(
                "a definition is required", (FieldViolation("definition", "is required"),)
            )
        definition = definition_from_proto(request.definition)
        registered, created = await self._engine.register_definition(
            definition, "RegisterDefinition"
        )
        return pb.RegisterDefinitionResponse(
            definition=definition_to_proto(registered.definition),
            created=created,
            info=_version_info(registered),
        )

    async def PruneSagas(
        self,
        request: pb.PruneSagasRequest,
        context: grpc.aio.ServicerContext[pb.PruneSagasRequest, pb.PruneSagasResponse],
    ) -> pb.PruneSagasResponse:
        """Remove the sagas that ended before a cutoff, with their events."""
        older_than = request.older_than.ToTimedelta()
        if older_than < MIN_PRUNE_AGE:
            raise InvalidArgument(
                "older_than is too short",
                (FieldViolation("older_than", "at least one minute"),),
            )
        cutoff, result = await self._engine.prune(older_than, dry_run=request.dry_run)
        response = pb.PruneSagasResponse(sagas=result.sagas, events=result.events)
        response.cutoff.FromDatetime(cutoff)
        return response
