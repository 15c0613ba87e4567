"""What a participant is sent: the call built from the saga for one dispatch."""

from __future__ import annotations

from datetime import timedelta

from coordinator.core.calls import build_call
from coordinator.core.events import Succeeded
from coordinator.core.model import request_id

from .builders import (
    COMPENSATE,
    EXECUTE,
    INPUT,
    NO,
    OK,
    SAGA_ID,
    UNAVAILABLE,
    SagaRun,
    compensatable,
    saga_definition,
)

TIMED = saga_definition(
    compensatable("identity", "identity", timeout=timedelta(seconds=1)),
    compensatable("account", "accounts", timeout=timedelta(seconds=2)),
    compensatable("card", "cards", timeout=timedelta(seconds=3)),
    name="open-account",
    version=7,
)


def test_execute_carries_the_saga_input_and_the_outputs_of_every_earlier_step() -> None:
    run = SagaRun(TIMED)
    run.answer_all(Succeeded(b"person-1"), Succeeded(b"account-42"))

    call = build_call(run.saga, run.pending)

    assert call.participant == "cards"
    assert call.operation is EXECUTE
    assert (call.saga_id, call.saga_name) == (SAGA_ID, f"sagas/{SAGA_ID}")
    assert (call.definition, call.definition_version) == ("open-account", 7)
    assert (call.step, call.action, call.attempt) == ("card", "card.do", 1)
    assert call.request_id == request_id(SAGA_ID, "card", EXECUTE)
    assert call.execute_request_id == call.request_id
    assert call.input == INPUT
    assert dict(call.previous_outputs) == {"identity": b"person-1", "account": b"account-42"}
    assert call.execute_output is None
    assert call.timeout == timedelta(seconds=3)


def test_first_execute_has_no_previous_outputs() -> None:
    run = SagaRun(TIMED)

    call = build_call(run.saga, run.pending)

    assert dict(call.previous_outputs) == {}
    assert call.timeout == timedelta(seconds=1)
    assert call.participant == "identity"


def test_execute_retry_carries_its_attempt_and_the_same_request_id() -> None:
    run = SagaRun(TIMED)
    first = build_call(run.saga, run.pending)
    retry = run.answer(UNAVAILABLE).commands[0]

    call = build_call(run.saga, retry)

    assert call.attempt == 2
    assert call.request_id == first.request_id


def test_compensate_carries_its_own_execute_output_and_request_id() -> None:
    run = SagaRun(TIMED)
    run.answer_all(Succeeded(b"person-1"), Succeeded(b"account-42"))
    compensate_card = run.answer(NO).commands[0]
    run.answer(OK)
    compensate_account = run.pending

    rejected = build_call(run.saga, compensate_card)
    call = build_call(run.saga, compensate_account)

    assert call.operation is COMPENSATE
    assert call.participant == "accounts"
    assert (call.step, call.action, call.attempt) == ("account", "account.undo", 1)
    assert call.request_id == request_id(SAGA_ID, "account", COMPENSATE)
    assert call.execute_request_id == request_id(SAGA_ID, "account", EXECUTE)
    assert call.execute_output == b"account-42"
    assert call.input == INPUT
    assert dict(call.previous_outputs) == {}
    assert call.timeout == timedelta(seconds=2)
    assert rejected.execute_output is None  # the rejected Execute answered nothing
    assert rejected.action == "card.undo"
    assert rejected.execute_request_id == request_id(SAGA_ID, "card", EXECUTE)
