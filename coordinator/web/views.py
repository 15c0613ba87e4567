"""What the pages show, computed from the SDK's views: payload summaries, groups, attempts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from urllib.parse import quote

from saga.v1 import saga_pb2

from coordinator.core.model import Operation, request_id
from coordinator.web.actions import waiting_step
from coordinator.web.timeline import FAILURE_EVENTS, duration_text, event_type, event_words
from saga_sdk.model import (
    Saga,
    SagaEvent,
    SagaEventType,
    SagaState,
    StepRun,
    event_from_proto,
    saga_from_proto,
)

PAYLOAD_PREVIEW = 240
"""Characters of a payload shown in a summary."""
ATTEMPTS_SHOWN = 12
"""Attempts listed per step on a saga's page (the first and last halves); the log has all."""


def payload_summary(payload: bytes | None) -> str:
    """A payload for people: its size, and the start of its JSON or text (never raw bytes)."""
    if payload is None:
        return "none"
    if not payload:
        return "empty"
    size = f"{len(payload):,} bytes"
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return f"{size}, binary"
    try:
        value = json.loads(text)
    except ValueError:
        shown = text
    else:
        shown = json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
        if isinstance(value, dict):
            size += f", {len(value)} field{'s' if len(value) != 1 else ''}"
    if len(shown) > PAYLOAD_PREVIEW:
        shown = shown[:PAYLOAD_PREVIEW] + "…"
    return f"{size}: {shown}"


def state_class(state: SagaState | str) -> str:
    """The CSS class of a state's badge."""
    return "state-" + str(state).lower().replace("_", "-")


def trace_link(template: str, saga: Saga) -> str:
    """The trace URL from the template: {trace_id} and {saga_id} are filled in (URL-quoted);
    "" without a template, or when it names {trace_id} and the saga has none (the coordinator
    traces nothing)."""
    if not template or ("{trace_id}" in template and not saga.trace_id):
        return ""
    filled = template.replace("{trace_id}", quote(saga.trace_id, safe=""))
    return filled.replace("{saga_id}", quote(saga.saga_id, safe=""))


@dataclass(frozen=True)
class Attempt:
    """One answered call, or an operator's action, in a step's attempts table."""

    sequence: int
    operation: str
    attempt: int
    time: datetime | None
    outcome: str
    code: str
    reason: str
    message: str
    request_id: str


@dataclass
class StepAttempts:
    """A step's row and its attempts (some left out when they are many)."""

    step: StepRun
    execute_request_id: str
    compensate_request_id: str
    attempts: list[Attempt] = field(default_factory=list)
    left_out: int = 0
    duration: str = ""


def _request_id(saga_id: str, step: str, operation: str) -> str:
    if operation == Operation.EXECUTE.value:
        return request_id(saga_id, step, Operation.EXECUTE)
    if operation == Operation.COMPENSATE.value:
        return request_id(saga_id, step, Operation.COMPENSATE)
    return ""


def step_attempts(
    saga: Saga, events: Sequence[saga_pb2.SagaEvent], now: datetime
) -> list[StepAttempts]:
    """Each step with its attempts, from the event log's protos (only those listed converted)."""
    rows = {
        step.name: StepAttempts(
            step,
            request_id(saga.saga_id, step.name, Operation.EXECUTE),
            request_id(saga.saga_id, step.name, Operation.COMPENSATE)
            if step.compensate_attempts or step.state.value in ("COMPENSATING", "COMPENSATED")
            else "",
            duration=duration_text(
                (step.end_time or now) - step.start_time if step.start_time else None
            ),
        )
        for step in saga.steps
    }
    every: dict[str, list[int]] = {name: [] for name in rows}
    for index, event in enumerate(events):
        if event.step in every and event_type(event) is not SagaEventType.CREATED:
            every[event.step].append(index)
    for name, indexes in every.items():
        row = rows[name]
        if len(indexes) > ATTEMPTS_SHOWN:
            half = ATTEMPTS_SHOWN // 2
            row.left_out = len(indexes) - ATTEMPTS_SHOWN
            indexes = [*indexes[:half], *indexes[-half:]]
        row.attempts = [_attempt(saga.saga_id, event_from_proto(events[i])) for i in indexes]
    return list(rows.values())


def _attempt(saga_id: str, event: SagaEvent) -> Attempt:
    failure = event.failure
    return Attempt(
        sequence=event.sequence,
        operation=event.operation or ("operator" if event.type.by_operator else ""),
        attempt=event.attempt,
        time=event.time,
        outcome=event_words(event.type),
        code=failure.code if failure else ("OK" if "SUCCEEDED" in event.type else ""),
        reason=failure.reason if failure else event.reason,
        message=failure.message if failure else (event.actor and f"by {event.actor}"),
        request_id=_request_id(saga_id, event.step, event.operation),
    )


def is_failure(event: SagaEvent) -> bool:
    """Whether the log's failures-only filter keeps the event."""
    return event.type in FAILURE_EVENTS


SHOWN_PER_GROUP = 10
"""Sagas named per needs-attention group (the oldest); the group counts them all."""


@dataclass
class AttentionGroup:
    """Parked sagas of one definition, stuck on one step for one reason."""

    definition: str
    step: str
    reason: str
    message: str
    sagas: list[Saga] = field(default_factory=list)
    """The SHOWN_PER_GROUP parked longest ago, oldest first."""
    count: int = 0
    """How many of the sagas grouped are in the group."""

    @property
    def oldest(self) -> Saga:
        """The saga parked longest ago."""
        return self.sagas[0]


def _parked_at(saga: saga_pb2.Saga) -> tuple[int, int]:
    moment = saga.update_time if saga.HasField("update_time") else saga.create_time
    return moment.seconds, moment.nanos


def attention_groups(sagas: Sequence[saga_pb2.Saga]) -> list[AttentionGroup]:
    """Group parked sagas by definition, failing step and reason, oldest group first.

    Read from the protos: only the sagas a group names are converted (a page groups hundreds).
    """
    groups: dict[tuple[str, str, str], AttentionGroup] = {}
    for message in sorted(sagas, key=_parked_at):
        failed = message.HasField("failure")
        failure = message.failure
        step = failure.step
        if not step:
            waiting = waiting_step(saga_from_proto(message))
            step = waiting.name if waiting else ""
        reason = (failure.reason or failure.code) if failed else "(no reason recorded)"
        key = (message.definition, step, reason)
        group = groups.get(key)
        if group is None:
            group = groups[key] = AttentionGroup(
                message.definition, step, reason, failure.message if failed else ""
            )
        group.count += 1
        if len(group.sagas) < SHOWN_PER_GROUP:
            group.sagas.append(saga_from_proto(message))
    return list(groups.values())
