"""I/O-free building of the coordinator's requests, shared by the sync and async clients."""

from __future__ import annotations

import getpass
import json
import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from google.protobuf import duration_pb2, json_format, timestamp_pb2
from saga.v1 import coordinator_service_pb2, saga_pb2

from saga_sdk import telemetry
from saga_sdk.model import RetryPolicy, SagaDefinition, SagaState, definition_to_proto
from saga_sdk.model import retry_policy_to_proto as _retry_policy_to_proto

SAGA_NAME_PREFIX = "sagas/"
ACTOR_VARIABLE = "SAGA_ACTOR"
"""The environment variable naming who acts, when a call is not given an actor."""

DefinitionInput = saga_pb2.SagaDefinition | SagaDefinition | Mapping[str, object]
"""A definition to register: the proto message, the SDK's model, or the proto's JSON form as a
dict (e.g. {"name": "onboard", "version": 2, "steps": [...]}, durations as "2s")."""


def default_actor() -> str:
    """Who acts when a call names no one: `SAGA_ACTOR`, else "user@host"."""
    actor = os.environ.get(ACTOR_VARIABLE, "").strip()
    if actor:
        return actor
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (e.g. in a bare container)
        user = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    return f"{user}@{socket.gethostname()}"


def _actor(actor: str | None) -> str:
    return default_actor() if actor is None else actor


def saga_name(saga_id: str) -> str:
    """The resource name of a saga, "sagas/{saga_id}", from its plain id."""
    if not saga_id:
        raise ValueError("saga_id must not be empty")
    if "/" in saga_id:
        raise ValueError(f"pass the plain saga id, not a resource name: {saga_id!r}")
    return SAGA_NAME_PREFIX + saga_id


def encode_payload(value: object) -> bytes:
    """Encode a payload: bytes as they are, None as empty, anything else as UTF-8 JSON."""
    if value is None:
        return b""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def create_request(
    definition: str,
    input: object = None,
    *,
    saga_id: str | None = None,
    definition_version: int = 0,
    labels: Mapping[str, str] | None = None,
) -> coordinator_service_pb2.CreateSagaRequest:
    """Build a CreateSagaRequest; see `SagaClient.create`."""
    if not definition:
        raise ValueError("definition must not be empty")
    if definition_version < 0:
        raise ValueError("definition_version must be >= 0")
    return coordinator_service_pb2.CreateSagaRequest(
        saga_id=saga_id or "",
        definition=definition,
        definition_version=definition_version,
        input=encode_payload(input),
        labels=_labels(labels),
    )


def _labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    result = dict(labels or {})
    for key, value in result.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"labels map strings to strings: {key!r}: {value!r}")
    return result


def _timestamp(value: datetime | None, name: str) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, e.g. datetime.now(UTC)")
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _duration(value: timedelta) -> duration_pb2.Duration:
    message = duration_pb2.Duration()
    message.FromTimedelta(value)
    return message


def get_request(saga_id: str) -> coordinator_service_pb2.GetSagaRequest:
    """Build a GetSagaRequest for a plain saga id."""
    return coordinator_service_pb2.GetSagaRequest(name=saga_name(saga_id))


def watch_request(
    saga_id: str, ending_only: bool = False
) -> coordinator_service_pb2.WatchSagaRequest:
    """Build a WatchSagaRequest for a plain saga id.

    With `ending_only` the coordinator sends one message only: the saga once it has settled
    (at once if it already has), which is all that `wait()` needs.
    """
    return coordinator_service_pb2.WatchSagaRequest(
        name=saga_name(saga_id), ending_only=ending_only
    )


def cancel_request(
    saga_id: str, reason: str = "", actor: str | None = None
) -> coordinator_service_pb2.CancelSagaRequest:
    """Build a CancelSagaRequest for a plain saga id; no actor means `default_actor()`."""
    return coordinator_service_pb2.CancelSagaRequest(
        name=saga_name(saga_id), reason=reason, actor=_actor(actor)
    )


def _expected(expected_version: int) -> int:
    if expected_version < 0:
        raise ValueError("expected_version must be >= 0 (0: any version)")
    return expected_version


def retry_request(
    saga_id: str,
    step: str = "",
    *,
    reason: str,
    actor: str | None = None,
    expected_version: int = 0,
) -> coordinator_service_pb2.RetrySagaStepRequest:
    """Build a RetrySagaStepRequest; see `SagaClient.retry`."""
    return coordinator_service_pb2.RetrySagaStepRequest(
        name=saga_name(saga_id),
        step=step,
        reason=reason,
        actor=_actor(actor),
        expected_version=_expected(expected_version),
    )


def resume_request(
    saga_id: str,
    *,
    reason: str,
    actor: str | None = None,
    expected_version: int = 0,
    compensation_retry: RetryPolicy | saga_pb2.RetryPolicy | None = None,
) -> coordinator_service_pb2.ResumeSagaRequest:
    """Build a ResumeSagaRequest; see `SagaClient.resume`."""
    request = coordinator_service_pb2.ResumeSagaRequest(
        name=saga_name(saga_id),
        reason=reason,
        actor=_actor(actor),
        expected_version=_expected(expected_version),
    )
    if isinstance(compensation_retry, RetryPolicy):
        request.compensation_retry.CopyFrom(_retry_policy_to_proto(compensation_retry))
    elif compensation_retry is not None:
        request.compensation_retry.CopyFrom(compensation_retry)
    return request


def mark_compensated_request(
    saga_id: str,
    step: str = "",
    *,
    reason: str,
    actor: str | None = None,
    expected_version: int = 0,
) -> coordinator_service_pb2.MarkStepCompensatedRequest:
    """Build a MarkStepCompensatedRequest; see `SagaClient.mark_compensated`."""
    return coordinator_service_pb2.MarkStepCompensatedRequest(
        name=saga_name(saga_id),
        step=step,
        reason=reason,
        actor=_actor(actor),
        expected_version=_expected(expected_version),
    )


def complete_request(
    saga_id: str,
    step: str = "",
    *,
    reason: str,
    output: object = None,
    actor: str | None = None,
    expected_version: int = 0,
) -> coordinator_service_pb2.CompleteStepRequest:
    """Build a CompleteStepRequest; `output` is encoded as `create()`'s input is."""
    return coordinator_service_pb2.CompleteStepRequest(
        name=saga_name(saga_id),
        step=step,
        reason=reason,
        actor=_actor(actor),
        expected_version=_expected(expected_version),
        output=encode_payload(output),
    )


def events_request(
    saga_id: str, page_size: int = 100, page_token: str = "", *, newest_first: bool = False
) -> coordinator_service_pb2.ListSagaEventsRequest:
    """Build a ListSagaEventsRequest for one page of a saga's log (newest event first if
    asked: every page of one listing must be asked in the same order)."""
    _check_page_size(page_size)
    if not isinstance(newest_first, bool):
        raise TypeError(f"newest_first must be True or False, not {newest_first!r}")
    return coordinator_service_pb2.ListSagaEventsRequest(
        name=saga_name(saga_id),
        page_size=page_size,
        page_token=page_token,
        newest_first=newest_first,
    )


def definitions_request(name: str | None = None) -> coordinator_service_pb2.ListDefinitionsRequest:
    """Build a ListDefinitionsRequest (every definition, or those of `name`)."""
    return coordinator_service_pb2.ListDefinitionsRequest(name=name or "")


def definition_request(name: str, version: int = 0) -> coordinator_service_pb2.GetDefinitionRequest:
    """Build a GetDefinitionRequest; version 0 means the newest."""
    if not name:
        raise ValueError("name must not be empty")
    if version < 0:
        raise ValueError("version must be >= 0 (0: the newest)")
    return coordinator_service_pb2.GetDefinitionRequest(name=name, version=version)


def register_request(
    definition: DefinitionInput, actor: str | None = None
) -> coordinator_service_pb2.RegisterDefinitionRequest:
    """Build a RegisterDefinitionRequest from a message, a model or the proto's JSON form."""
    if isinstance(definition, saga_pb2.SagaDefinition):
        message = definition
    elif isinstance(definition, SagaDefinition):
        message = definition_to_proto(definition)
    else:
        try:
            message = json_format.ParseDict(dict(definition), saga_pb2.SagaDefinition())
        except json_format.ParseError as error:
            raise ValueError(f"not a saga definition: {error}") from None
    return coordinator_service_pb2.RegisterDefinitionRequest(
        definition=message, actor=_actor(actor)
    )


def prune_request(
    older_than: timedelta, dry_run: bool = False
) -> coordinator_service_pb2.PruneSagasRequest:
    """Build a PruneSagasRequest: sagas that ended longer ago than `older_than`."""
    if older_than <= timedelta(0):
        raise ValueError("older_than must be positive")
    return coordinator_service_pb2.PruneSagasRequest(
        older_than=_duration(older_than), dry_run=dry_run
    )


def _check_page_size(page_size: int) -> None:
    if not 1 <= page_size <= 1000:
        raise ValueError("page_size must be from 1 to 1000")


@dataclass(frozen=True)
class ListQuery:
    """The filters of a listing; `page(token)` builds the request for one page of it, and
    `count()` the CountSagasRequest of the same filters (states aside)."""

    states: tuple[SagaState, ...] = ()
    definition: str | None = None
    page_size: int = 100
    definition_version: int = 0
    labels: tuple[tuple[str, str], ...] = ()
    created_after: datetime | None = None
    created_before: datetime | None = None
    stuck_on_participant: str | None = None
    stuck_on_step: str | None = None

    @classmethod
    def of(
        cls,
        states: Iterable[SagaState | str] = (),
        definition: str | None = None,
        page_size: int = 100,
        *,
        definition_version: int = 0,
        labels: Mapping[str, str] | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        stuck_on_participant: str | None = None,
        stuck_on_step: str | None = None,
    ) -> ListQuery:
        """Validate and normalise the filters (state names are accepted as strings)."""
        _check_page_size(page_size)
        parsed = tuple(SagaState(s) for s in states)
        if SagaState.UNSPECIFIED in parsed:
            raise ValueError("UNSPECIFIED is not a state to filter on")
        if definition_version < 0:
            raise ValueError("definition_version must be >= 0 (0: every version)")
        if definition_version and not definition:
            raise ValueError("definition_version needs definition")
        _timestamp(created_after, "created_after")
        _timestamp(created_before, "created_before")
        return cls(
            parsed,
            definition,
            page_size,
            definition_version,
            tuple(sorted(_labels(labels).items())),
            created_after,
            created_before,
            stuck_on_participant,
            stuck_on_step,
        )

    def page(self, page_token: str = "") -> coordinator_service_pb2.ListSagasRequest:
        """The request for the page that `page_token` points at ("" for the first)."""
        return coordinator_service_pb2.ListSagasRequest(
            states=[saga_pb2.SagaState.Value(f"SAGA_STATE_{s.value}") for s in self.states],
            definition=self.definition or "",
            page_size=self.page_size,
            page_token=page_token,
            definition_version=self.definition_version,
            labels=dict(self.labels),
            created_after=_timestamp(self.created_after, "created_after"),
            created_before=_timestamp(self.created_before, "created_before"),
            stuck_on_participant=self.stuck_on_participant or "",
            stuck_on_step=self.stuck_on_step or "",
        )

    def count(self) -> coordinator_service_pb2.CountSagasRequest:
        """The CountSagasRequest with the same filters (a count covers every state)."""
        return coordinator_service_pb2.CountSagasRequest(
            definition=self.definition or "",
            definition_version=self.definition_version,
            labels=dict(self.labels),
            created_after=_timestamp(self.created_after, "created_after"),
            created_before=_timestamp(self.created_before, "created_before"),
            stuck_on_participant=self.stuck_on_participant or "",
            stuck_on_step=self.stuck_on_step or "",
        )


def rewatch_delay(attempt: int) -> float:
    """Seconds to pause before re-watching after the `attempt`-th broken stream (from 1).

    Capped exponential: 0.05 s, 0.1 s, 0.2 s ... up to 2 s, so that a coordinator restart is
    noticed quickly without hammering one that stays down.
    """
    return float(min(2.0, 0.05 * 2 ** max(0, attempt - 1)))


def trace_headers() -> tuple[tuple[str, str], ...]:
    """The current span's W3C trace headers, for CreateSaga: the saga's trace links to it.
    None without OpenTelemetry (the `otel` extra)."""
    return telemetry.trace_headers()


def changes_request(
    after_position: int,
    from_now: bool,
    definition: str | None,
    states: Iterable[SagaState],
    labels: Mapping[str, str] | None,
    follow: bool,
) -> coordinator_service_pb2.WatchChangesRequest:
    """Build a WatchChangesRequest; see `SagaClient.changes`."""
    if after_position < 0:
        raise ValueError("after_position must be >= 0")
    return coordinator_service_pb2.WatchChangesRequest(
        after_position=after_position,
        from_now=from_now,
        definition=definition or "",
        states=[saga_pb2.SagaState.Value(f"SAGA_STATE_{SagaState(s).value}") for s in states],
        labels=dict(labels or {}),
        no_follow=not follow,
    )
