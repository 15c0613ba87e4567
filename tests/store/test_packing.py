"""The compact stored form reads back exactly what it wrote, and still reads what schema 2 wrote."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.core.events import (
    CallAnswered,
    CancelRequested,
    CompleteRequested,
    DeadlineExceeded,
    Event,
    MarkCompensated,
    ResumeRequested,
    RetryRequested,
    SagaCreated,
)
from coordinator.core.model import (
    AuditEntry,
    Failure,
    Operation,
    OperatorAction,
    RetryPolicy,
    SagaDefinition,
)
from coordinator.store.errors import StoreCorrupt
from coordinator.store.packing import (
    digest,
    event_type,
    pack_audit,
    pack_definition,
    pack_event,
    pack_failure,
    pack_labels,
    pack_policy,
    unpack_audit,
    unpack_definition,
    unpack_event,
    unpack_failure,
    unpack_labels,
    unpack_policy,
)

from .strategies import (
    OK,
    T0,
    audit_entries,
    definitions,
    events,
    failures,
    headers,
    open_account,
    stored_retry_policies,
    transfer,
)


def _unreachable() -> SagaCreated:
    raise AssertionError("only a creation is rebuilt from the saga's row")


def round_trip(event: Event) -> Event:
    """An event packed and unpacked; a creation is rebuilt from itself (as from its row)."""

    def created() -> SagaCreated:
        assert isinstance(event, SagaCreated)
        return event

    return unpack_event(event_type(event), pack_event(event), created)


@given(definitions)
def test_any_definition_round_trips_exactly(definition: SagaDefinition) -> None:
    assert unpack_definition(pack_definition(definition)) == definition


@given(events)
def test_any_event_round_trips_exactly(event: Event) -> None:
    assert round_trip(event) == event


@given(st.none() | failures)
def test_any_failure_round_trips(failure: Failure | None) -> None:
    assert unpack_failure(pack_failure(failure)) == failure


@given(headers)
def test_any_labels_round_trip_and_none_are_stored_as_null(labels: Mapping[str, str]) -> None:
    packed = pack_labels(labels)
    assert (packed is None) == (not labels)
    assert unpack_labels(packed) == labels


@given(st.lists(audit_entries, max_size=4).map(tuple))
def test_any_audit_trail_round_trips_and_an_empty_one_is_null(
    audit: tuple[AuditEntry, ...],
) -> None:
    packed = pack_audit(audit)
    assert (packed is None) == (not audit)
    assert unpack_audit(packed) == audit


@given(st.none() | stored_retry_policies)
def test_any_retry_override_round_trips(policy: RetryPolicy | None) -> None:
    assert unpack_policy(pack_policy(policy)) == policy


def test_event_types_are_stable_tags() -> None:
    # Part of the stored format: a tag never changes, new events get new ones.
    tagged: dict[str, Event] = {
        "saga_created": SagaCreated("s-1", open_account(), b""),
        "call_answered": CallAnswered(Operation.EXECUTE, 0, 1, OK),
        "cancel_requested": CancelRequested("stop"),
        "retry_requested": RetryRequested(1, "ops", "now"),
        "resume_requested": ResumeRequested("ops", "again"),
        "mark_compensated": MarkCompensated(0, "ops", "by hand"),
        "complete_requested": CompleteRequested(2, b"{}", "ops", "by hand"),
        "deadline_exceeded": DeadlineExceeded(),
    }
    assert {tag: event_type(event) for tag, event in tagged.items()} == {tag: tag for tag in tagged}


# --- what schema 2 wrote ---------------------------------------------------------------------


def _schema_2_definition(definition: SagaDefinition) -> bytes:
    """A definition's body exactly as schema 2 packed it: eight fields per step, no deadline."""

    def policy(p: RetryPolicy) -> list[object]:
        micros = timedelta(microseconds=1)
        return [
            p.max_attempts,
            p.initial_backoff // micros,
            p.max_backoff // micros,
            float(p.multiplier),
            float(p.jitter),
        ]

    packed: bytes = msgpack.packb(
        {
            "name": definition.name,
            "version": definition.version,
            "description": definition.description,
            "steps": [
                [
                    step.name,
                    step.participant,
                    step.action,
                    step.compensation,
                    step.kind.value,
                    step.timeout // timedelta(microseconds=1),
                    policy(step.retry),
                    policy(step.compensation_retry),
                ]
                for step in definition.steps
            ],
        },
        use_bin_type=True,
    )
    return packed


def test_a_schema_2_definition_reads_with_no_limits_and_packs_to_the_same_bytes() -> None:
    definition = open_account()
    old = _schema_2_definition(definition)

    read = unpack_definition(old)

    assert read == definition
    assert [(s.max_attempts, s.emits) for s in read.steps] == [(0, "")] * 3
    assert read.deadline is None
    assert pack_definition(read) == old, "same content, same bytes: same digest and row"
    assert digest(pack_definition(read)) == digest(old)


def test_newer_fields_change_the_stored_content() -> None:
    plain = open_account()
    limited = transfer()

    assert pack_definition(limited) != _schema_2_definition(limited)
    assert unpack_definition(pack_definition(limited)).deadline == timedelta(hours=1)
    assert [s.max_attempts for s in unpack_definition(pack_definition(limited)).steps] == [0, 2, 2]
    assert pack_definition(plain) == _schema_2_definition(plain)


def test_a_schema_2_cancellation_reads_with_no_actor() -> None:
    old = msgpack.packb({"reason": "stop", "in_flight": True}, use_bin_type=True)

    assert unpack_event("cancel_requested", old, _unreachable) == CancelRequested("stop", True, "")


# --- what nobody wrote -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "body", "problem"),
    [
        ("retry_requested", {"step": 1, "actor": "a", "reason": "r", "in_flight": 1}, "boolean"),
        ("resume_requested", {"actor": "a", "reason": "r"}, "compensation_retry"),
        ("complete_requested", {"step": 1, "output": "text", "actor": "a", "reason": "r"}, "bytes"),
        ("deadline_exceeded", {}, "in_flight"),
        ("operator_waved", {}, "unknown event type"),
    ],
)
def test_an_event_body_not_in_the_expected_form_is_store_corrupt(
    kind: str, body: dict[str, object], problem: str
) -> None:
    with pytest.raises(StoreCorrupt, match=problem):
        unpack_event(kind, msgpack.packb(body, use_bin_type=True), _unreachable)


def test_a_step_of_nine_fields_is_store_corrupt() -> None:
    body = msgpack.unpackb(pack_definition(transfer()))
    body["steps"][1] = body["steps"][1][:9]

    with pytest.raises(StoreCorrupt, match="stored definition is not in the expected form"):
        unpack_definition(msgpack.packb(body, use_bin_type=True))


def test_an_audit_entry_with_an_unknown_action_is_store_corrupt() -> None:
    packed = pack_audit((AuditEntry(2, T0, "ops", OperatorAction.RETRY, "s", "r"),))
    assert packed is not None
    tampered = packed.replace(b"RETRY", b"WAVED")

    with pytest.raises(StoreCorrupt, match="audit trail"):
        unpack_audit(tampered)
