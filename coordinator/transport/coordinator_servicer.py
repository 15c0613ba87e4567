"""CoordinatorService: what clients and operators call, checked and translated for the engine."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from datetime import datetime
from typing import TypeVar

import grpc
from saga.v1 import coordinator_service_pb2 as pb
from saga.v1 import coordinator_service_pb2_grpc as pb_grpc

from coordinator.core.definitions import NAME_RULE, is_valid_name
from coordinator.core.errors import FieldViolation, InvalidArgument
from coordinator.engine import Engine
from coordinator.ports import ListCursor, SagaFilter
from coordinator.telemetry import SagaTelemetry, headers_of, now_ns
from coordinator.transport.convert import (
    Renderings,
    event_to_proto,
    saga_state_from_proto,
    saga_to_proto,
)
from coordinator.watchers import SagaChange

log = logging.getLogger("coordinator.transport")

MAX_PAGE_SIZE = 1000
MAX_REASON = 1024
DEFAULT_PAGE_SIZE = 100

T = TypeVar("T")


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
    text = json.dumps([sorted(s.value for s in where.states), where.definition])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode_page_token(cursor: ListCursor, where: SagaFilter) -> str:
    """An opaque token for the page after ``cursor``, bound to the listing's filters."""
    body = json.dumps(
        {"t": cursor.created_at.isoformat(), "i": cursor.saga_id, "f": _filter_key(where)}
    )
    return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


def decode_page_token(token: str, where: SagaFilter) -> ListCursor:
    """The cursor inside a page token; InvalidArgument if it is not one of ours or filters moved."""
    try:
        body = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
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


class CoordinatorServicer(pb_grpc.CoordinatorServiceServicer):
    """Validates requests and calls the engine; it raises the coordinator's errors, which
    ``coordinator.transport.server`` turns into rich statuses for every method alike."""

    def __init__(
        self, engine: Engine, *, max_payload_bytes: int, telemetry: SagaTelemetry | None = None
    ) -> None:
        self._engine = engine
        self._max_payload_bytes = max_payload_bytes
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
        return pb.GetSagaResponse(saga=self._saga(saga))

    async def ListSagas(
        self,
        request: pb.ListSagasRequest,
        context: grpc.aio.ServicerContext[pb.ListSagasRequest, pb.ListSagasResponse],
    ) -> pb.ListSagasResponse:
        """Return one page of sagas, oldest first."""

        violations = []
        states = set()
        for i, value in enumerate(request.states):
            try:
                states.add(saga_state_from_proto(value))
            except ValueError as error:
                violations.append(FieldViolation(f"states[{i}]", str(error)))
        if not 0 <= request.page_size <= MAX_PAGE_SIZE:
            violations.append(FieldViolation("page_size", f"must be from 0 to {MAX_PAGE_SIZE}"))
        if violations:
            raise InvalidArgument("invalid ListSagas request", tuple(violations))
        where = SagaFilter(frozenset(states), request.definition or None)
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
        saga = await self._engine.cancel_saga(saga_id_of(request.name), request.reason)
        return pb.CancelSagaResponse(saga=self._saga(saga))
