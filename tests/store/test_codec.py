"""The schema-1 codec writes sagas and events as JSON and reads back exactly what it wrote."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given

from coordinator.core.events import (
    CancelRequested,
    CompleteRequested,
    DeadlineExceeded,
    Event,
    MarkCompensated,
    RecordedEvent,
    ResumeRequested,
    RetryRequested,
)
from coordinator.core.model import Saga
from coordinator.store.codec import (
    decode_datetime,
    decode_event,
    decode_recorded_event,
    decode_saga,
    encode_datetime,
    encode_event,
    encode_recorded_event,
    encode_saga,
)
from coordinator.store.errors import StoreCorrupt
from coordinator.store.packing import event_type

from .strategies import (
    OK,
    SagaHistory,
    run_history,
    saga_histories,
    schema_1_events,
    schema_1_recorded_events,
    schema_1_sagas,
)


@given(schema_1_sagas)
def test_any_saga_round_trips_exactly(saga: Saga) -> None:
    assert decode_saga(encode_saga(saga)) == saga


@given(schema_1_events)
def test_any_event_round_trips_exactly(event: Event) -> None:
    assert decode_event(encode_event(event)) == event


@given(schema_1_recorded_events)
def test_any_recorded_event_round_trips_exactly(recorded: RecordedEvent) -> None:
    assert decode_recorded_event(encode_recorded_event(recorded)) == recorded


@given(saga_histories(schema_1=True))
def test_every_saga_and_event_of_a_real_history_round_trips(history: SagaHistory) -> None:
    for saga, recorded in zip(history.sagas, history.log, strict=True):
        # Schema 1 kept no audit trail: a cancelled saga reads back without its entry.
        assert decode_saga(encode_saga(saga)) == dataclasses.replace(saga, audit=())
        assert decode_event(encode_event(recorded.event)) == recorded.event


@pytest.mark.parametrize(
    "event",
    [
        RetryRequested(0, "ops", "stuck"),
        ResumeRequested("ops", "fixed"),
        MarkCompensated(1, "ops", "undone by hand"),
        CompleteRequested(2, b"{}", "ops", "done by hand"),
        DeadlineExceeded(),
    ],
    ids=lambda event: type(event).__name__,
)
def test_events_schema_1_never_had_are_refused_by_name(event: Event) -> None:
    with pytest.raises(ValueError, match=f"schema 1 has no {type(event).__name__} events"):
        encode_event(event)


def test_events_carry_a_stable_type_tag() -> None:
    history = run_history("s-1", [OK, CancelRequested("changed my mind")])
    tags = [json.loads(encode_event(recorded.event))["type"] for recorded in history.log]
    assert tags == ["saga_created", "call_answered", "cancel_requested"]
    assert tags == [event_type(recorded.event) for recorded in history.log]


def test_bytes_are_base64_and_times_are_utc_text_with_microseconds() -> None:
    saga = run_history("s-1", at=datetime(2025, 3, 1, 12, 0, 0, 5, tzinfo=UTC)).first
    body = json.loads(encode_saga(saga))
    assert body["input"] == "eyJjdXN0b21lciI6ICJjLTcifQ=="
    assert body["created_at"] == "2025-03-01T12:00:00.000005Z"
    assert body["definition"]["steps"][0]["timeout_us"] == 10_000_000


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (datetime(1, 1, 1, tzinfo=UTC), "0001-01-01T00:00:00.000000Z"),
        (
            datetime(2025, 3, 1, 14, 0, 7, 123456, tzinfo=timezone(timedelta(hours=2))),
            "2025-03-01T12:00:07.123456Z",
        ),
    ],
)
def test_times_are_stored_as_fixed_width_utc(value: datetime, text: str) -> None:
    assert encode_datetime(value) == text
    assert decode_datetime(text) == value
    assert decode_datetime(text).tzinfo is UTC


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        encode_datetime(datetime(2025, 3, 1, 12, 0))


@pytest.mark.parametrize(
    "text",
    ["not json", "[]", '{"saga_id": "s-1"}', '{"type": "saga_exploded"}'],
)
def test_what_the_codec_did_not_write_is_reported_corrupt(text: str) -> None:
    with pytest.raises(StoreCorrupt, match="cannot be decoded"):
        decode_saga(text)
    with pytest.raises(StoreCorrupt, match="cannot be decoded"):
        decode_event(text)


def test_a_tampered_field_type_is_reported_corrupt() -> None:
    body = json.loads(encode_saga(run_history("s-1").first))
    body["version"] = "1"
    with pytest.raises(StoreCorrupt, match="expected an integer"):
        decode_saga(json.dumps(body))
