"""Sagas end to end in one process: real gRPC on loopback, a real SQLite file."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from saga.v1 import coordinator_service_pb2 as cpb
from saga.v1 import saga_pb2

from tests.support.coordinator import (
    NAMES,
    Harness,
    four_step_definition,
    running_coordinator,
)
from tests.support.participants import ScriptedParticipant, error, ok, reject

STEPS = ("create-user", "open-account", "issue-card", "subscribe")


@pytest.fixture
async def harness(
    tmp_path: Path, participants: dict[str, ScriptedParticipant]
) -> AsyncIterator[Harness]:
    definitions = [
        four_step_definition("onboard"),
        four_step_definition(
            "onboard-patient",
            **{
                "issue-card": {
                    "compensation_retry": {
                        "max_attempts": 50,
                        "initial_backoff": "20ms",
                        "max_backoff": "50ms",
                    }
                }
            },
        ),
    ]
    async with running_coordinator(tmp_path, participants, definitions) as running:
        yield running


def step_states(saga: saga_pb2.Saga) -> list[str]:
    return [saga_pb2.StepState.Name(step.state).removeprefix("STEP_STATE_") for step in saga.steps]


def state(saga: saga_pb2.Saga) -> str:
    return saga_pb2.SagaState.Name(saga.state).removeprefix("SAGA_STATE_")


def compensation_order(participants: dict[str, ScriptedParticipant]) -> list[str]:
    journal = next(iter(participants.values())).journal
    return [step for kind, _, op, step in journal if kind == "begin" and op == "compensate"]


def assert_one_call_at_a_time(participants: dict[str, ScriptedParticipant]) -> None:
    journal = next(iter(participants.values())).journal
    kinds = [kind for kind, *_ in journal]
    assert kinds == ["begin", "end"] * (len(kinds) // 2), journal


async def test_four_step_saga_succeeds_with_inputs_and_earlier_outputs(
    harness: Harness, participants: dict[str, ScriptedParticipant]
) -> None:
    payload = json.dumps({"company": "Acme"}).encode()
    created = await harness.create("onboard", payload, saga_id="acme-1")
    assert created.name == "sagas/acme-1"

    saga = await harness.wait("acme-1")

    assert state(saga) == "SUCCEEDED"
    assert step_states(saga) == ["SUCCEEDED"] * 4
    for index, name in enumerate(NAMES):
        executes = participants[name].calls("execute")
        assert len(executes) == 1, name
        request = executes[0].execute
        assert request.input == payload
        assert request.saga == "sagas/acme-1"
        assert request.attempt == 1
        assert request.request_id == f"sagas/acme-1/steps/{STEPS[index]}:execute"
        assert dict(request.previous_outputs) == {
            STEPS[i]: saga.steps[i].output for i in range(index)
        }
        assert participants[name].calls("compensate") == []
    assert_one_call_at_a_time(participants)


async def test_rejection_at_step_three_compensates_three_two_one_newest_first(
    harness: Harness, participants: dict[str, ScriptedParticipant]
) -> None:
    participants["cards"].script("IssueCard", reject("CARD_LIMIT", "credit limit reached"))

    await harness.create("onboard", b"{}", saga_id="refused")
    saga = await harness.wait("refused")

    assert state(saga) == "COMPENSATED"
    assert step_states(saga) == ["COMPENSATED", "COMPENSATED", "COMPENSATED", "PENDING"]
    assert compensation_order(participants) == ["issue-card", "open-account", "create-user"]
    assert participants["billing"].received == []
    assert saga.failure.step == "issue-card"
    assert saga.failure.reason == "CARD_LIMIT"
    assert_one_call_at_a_time(participants)
    # Each Compensate carries its own Execute's output (none for the rejected step).
    for name in ("identity", "accounts"):
        (execute,) = participants[name].calls("execute")
        (compensate,) = participants[name].calls("compensate")
        assert compensate.compensate.HasField("execute_output")
        assert (
            compensate.compensate.execute_output
            == participants[name].answers[execute.request.request_id]
        )
        assert compensate.compensate.execute_request_id == execute.request.request_id
    (card_compensation,) = participants["cards"].calls("compensate")
    assert not card_compensation.compensate.HasField("execute_output")


async def test_unavailable_twice_then_ok_retries_the_same_request_and_succeeds(
    harness: Harness, participants: dict[str, ScriptedParticipant]
) -> None:
    participants["accounts"].script(
        "OpenAccount",
        error(grpc.StatusCode.UNAVAILABLE),
        error(grpc.StatusCode.UNAVAILABLE),
        ok({"account": "A-1"}),
    )

    await harness.create("onboard", saga_id="flaky")
    saga = await harness.wait("flaky")

    assert state(saga) == "SUCCEEDED"
    attempts = participants["accounts"].calls("execute")
    assert [c.request.attempt for c in attempts] == [1, 2, 3]
    assert {c.request.request_id for c in attempts} == {"sagas/flaky/steps/open-account:execute"}
    assert saga.steps[1].execute_attempts == 3
    assert json.loads(saga.steps[1].output) == {"account": "A-1"}
    assert sorted(participants["cards"].calls("execute")[0].execute.previous_outputs) == [
        "create-user",
        "open-account",
    ]


async def test_transient_errors_past_the_budget_fail_the_step_and_compensate_it_too(
    harness: Harness, participants: dict[str, ScriptedParticipant]
) -> None:
    participants["cards"].script("IssueCard", *[error(grpc.StatusCode.DEADLINE_EXCEEDED)] * 3)

    await harness.create("onboard", saga_id="timeouts")
    saga = await harness.wait("timeouts")

    assert state(saga) == "COMPENSATED"
    assert len(participants["cards"].calls("execute")) == 3  # the budget: max_attempts 3
    assert saga.steps[2].execute_attempts == 3
    assert compensation_order(participants) == ["issue-card", "open-account", "create-user"]
    assert "gave up after 3 attempts" in saga.failure.message


async def test_participant_down_for_the_whole_saga_gets_a_null_compensation(
    harness: Harness, participants: dict[str, ScriptedParticipant]
) -> None:
    cards = participants["cards"]
    port = cards.port
    await cards.stop()  # down: every Execute attempt is refused

    await harness.create("onboard-patient", saga_id="down")
    async for change in harness.stub.WatchSaga(cpb.WatchSagaRequest(name="sagas/down")):
        if change.saga.steps[2].state == saga_pb2.STEP_STATE_COMPENSATING:
            break
    await cards.start(port)  # back, having never seen the Execute
    saga = await harness.wait("down")

    assert state(saga) == "COMPENSATED"
    assert cards.calls("execute") == []
    assert [c.step for c in cards.calls("compensate")] == ["issue-card"]
    assert compensation_order(participants)[-2:] == ["open-account", "create-user"]


async def test_compensation_failing_past_its_budget_parks_the_saga(
    harness: Harness, participants: dict[str, ScriptedParticipant]
) -> None:
    participants["cards"].script("IssueCard", reject())
    participants["accounts"].script("CloseAccount", *[error(grpc.StatusCode.UNAVAILABLE)] * 3)

    await harness.create("onboard", saga_id="stuck")
    saga = await harness.wait("stuck")

    assert state(saga) == "NEEDS_ATTENTION"
    assert saga.failure.step == "open-account"
    assert saga.failure.operation == "compensate"
    assert "compensation gave up after 3 attempts" in saga.failure.message
    assert len(participants["accounts"].calls("compensate")) == 3
    assert participants["identity"].calls("compensate") == []  # never past the stuck step
    assert participants["billing"].received == []  # never runs forward
    await asyncio.sleep(0.2)
    fetched = (await harness.stub.GetSaga(cpb.GetSagaRequest(name="sagas/stuck"))).saga
    assert state(fetched) == "NEEDS_ATTENTION"
    assert fetched.version == saga.version


async def test_failure_after_the_pivot_is_retried_forward_and_nothing_is_compensated(
    tmp_path: Path, participants: dict[str, ScriptedParticipant]
) -> None:
    definition = four_step_definition(
        "pivoting",
        **{
            "issue-card": {"kind": "pivot", "compensation": ""},
            "subscribe": {"kind": "retriable", "compensation": ""},
        },
    )
    participants["billing"].script(
        "CreateSubscription", *[error(grpc.StatusCode.UNAVAILABLE)] * 6, ok()
    )
    async with running_coordinator(tmp_path, participants, [definition]) as harness:
        await harness.create("pivoting", saga_id="forward")
        saga = await harness.wait("forward")

    assert state(saga) == "SUCCEEDED"
    assert len(participants["billing"].calls("execute")) == 7  # past max_attempts 3
    assert all(p.calls("compensate") == [] for p in participants.values())


async def test_create_is_idempotent_on_the_saga_id(harness: Harness) -> None:
    first = await harness.stub.CreateSaga(
        cpb.CreateSagaRequest(saga_id="same", definition="onboard", input=b'{"a":1}')
    )
    again = await harness.stub.CreateSaga(
        cpb.CreateSagaRequest(saga_id="same", definition="onboard", input=b'{"a":1}')
    )

    assert first.created
    assert not again.created
    assert again.saga.saga_id == "same"
    assert again.saga.create_time == first.saga.create_time


async def test_create_with_an_existing_id_and_another_request_is_already_exists(
    harness: Harness,
) -> None:
    await harness.create("onboard", b'{"a":1}', saga_id="taken")

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.create("onboard", b'{"a":2}', saga_id="taken")

    assert caught.value.code() is grpc.StatusCode.ALREADY_EXISTS
    saga = (await harness.stub.GetSaga(cpb.GetSagaRequest(name="sagas/taken"))).saga
    assert saga.input == b'{"a":1}'


def violations_of(error: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(error)
    assert status is not None
    found = {}
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            found.update({v.field: v.description for v in bad_request.field_violations})
    return found


def reason_of(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    raise AssertionError("no ErrorInfo")


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"saga_id": "bad id!", "definition": "onboard"}, "saga_id"),
        ({"saga_id": "x" * 129, "definition": "onboard"}, "saga_id"),
        ({"saga_id": "ok-id"}, "definition"),
        ({"saga_id": "big", "definition": "onboard", "input": b"x" * (1024 * 1024 + 1)}, "input"),
    ],
)
async def test_invalid_create_requests_name_the_field_and_store_nothing(
    harness: Harness, request_fields: dict[str, object], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.stub.CreateSaga(cpb.CreateSagaRequest(**request_fields))  # type: ignore[arg-type]

    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert field in violations_of(caught.value)
    listed = await harness.stub.ListSagas(cpb.ListSagasRequest())
    assert list(listed.sagas) == []


async def test_unknown_definition_is_not_found_and_stores_nothing(harness: Harness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.create("no-such-saga", saga_id="x")

    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    assert reason_of(caught.value) == "DEFINITION_NOT_FOUND"
    assert list((await harness.stub.ListSagas(cpb.ListSagasRequest())).sagas) == []


async def test_watch_streams_every_state_change_in_order(
    harness: Harness, participants: dict[str, ScriptedParticipant]
) -> None:
    participants["cards"].script("IssueCard", error(grpc.StatusCode.UNAVAILABLE), reject())
    participants["accounts"].script("OpenAccount", ok(delay=0.3))
    await harness.create("onboard", saga_id="watched")

    changes = [
        change
        async for change in harness.stub.WatchSaga(cpb.WatchSagaRequest(name="sagas/watched"))
    ]

    first, rest = changes[0], changes[1:]
    assert not first.HasField("event")
    versions = [c.saga.version for c in changes]
    assert versions == list(range(first.saga.version, first.saga.version + len(changes)))
    assert [c.event.sequence for c in rest] == versions[1:]
    assert state(changes[-1].saga) == "COMPENSATED"
    types = [saga_pb2.SagaEventType.Name(c.event.type) for c in rest]
    assert types[-6:] == [
        "SAGA_EVENT_TYPE_STEP_SUCCEEDED",  # open-account, after its delay
        "SAGA_EVENT_TYPE_STEP_ATTEMPT_FAILED",  # issue-card unavailable
        "SAGA_EVENT_TYPE_STEP_REJECTED",
        "SAGA_EVENT_TYPE_COMPENSATION_SUCCEEDED",
        "SAGA_EVENT_TYPE_COMPENSATION_SUCCEEDED",
        "SAGA_EVENT_TYPE_COMPENSATION_SUCCEEDED",
    ]


async def test_late_watcher_first_receives_the_current_state(harness: Harness) -> None:
    await harness.create("onboard", saga_id="done-already")
    final = await harness.wait("done-already")

    changes = [
        c async for c in harness.stub.WatchSaga(cpb.WatchSagaRequest(name="sagas/done-already"))
    ]

    assert len(changes) == 1
    assert changes[0].saga == final


async def test_cancel_compensates_a_running_saga(
    harness: Harness, participants: dict[str, ScriptedParticipant]
) -> None:
    participants["cards"].script("IssueCard", ok(delay=0.5))
    await harness.create("onboard", saga_id="cancelled")
    async for change in harness.stub.WatchSaga(cpb.WatchSagaRequest(name="sagas/cancelled")):
        if change.saga.steps[2].state == saga_pb2.STEP_STATE_RUNNING:
            break

    response = await harness.stub.CancelSaga(
        cpb.CancelSagaRequest(name="sagas/cancelled", reason="customer withdrew")
    )
    assert state(response.saga) == "COMPENSATING"
    saga = await harness.wait("cancelled")

    assert state(saga) == "COMPENSATED"
    assert saga.cancel_reason == "customer withdrew"
    assert compensation_order(participants) == ["issue-card", "open-account", "create-user"]
    assert participants["billing"].received == []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.stub.CancelSaga(cpb.CancelSagaRequest(name="sagas/cancelled"))
    assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(caught.value) == "SAGA_ENDED"


async def test_get_and_cancel_of_unknown_sagas_are_not_found(harness: Harness) -> None:
    for call in (
        harness.stub.GetSaga(cpb.GetSagaRequest(name="sagas/nope")),
        harness.stub.CancelSaga(cpb.CancelSagaRequest(name="sagas/nope")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.stub.GetSaga(cpb.GetSagaRequest(name="nope"))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_list_filters_and_pages_through_every_saga(harness: Harness) -> None:
    ids = [f"s{i:02d}" for i in range(7)]
    for saga_id in ids:
        await harness.create("onboard", saga_id=saga_id)
    for saga_id in ids:
        await harness.wait(saga_id)

    seen: list[str] = []
    token = ""
    while True:
        page = await harness.stub.ListSagas(
            cpb.ListSagasRequest(
                page_size=3,
                page_token=token,
                states=[saga_pb2.SAGA_STATE_SUCCEEDED],
                definition="onboard",
            )
        )
        seen.extend(s.saga_id for s in page.sagas)
        token = page.next_page_token
        if not token:
            break
    assert seen == ids

    none = await harness.stub.ListSagas(
        cpb.ListSagasRequest(states=[saga_pb2.SAGA_STATE_COMPENSATED])
    )
    assert list(none.sagas) == []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.stub.ListSagas(cpb.ListSagasRequest(page_token="garbage"))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_a_code_that_is_never_retried_fails_the_step_at_once(
    harness: Harness, participants: dict[str, ScriptedParticipant]
) -> None:
    participants["cards"].script("IssueCard", error(grpc.StatusCode.UNIMPLEMENTED, "no such"))

    await harness.create("onboard", saga_id="unimplemented")
    saga = await harness.wait("unimplemented")

    assert state(saga) == "COMPENSATED"
    assert len(participants["cards"].calls("execute")) == 1
    assert saga.steps[2].failure.code == "UNIMPLEMENTED"
    assert compensation_order(participants) == ["issue-card", "open-account", "create-user"]


async def test_retry_info_from_the_participant_is_honoured(
    harness: Harness, participants: dict[str, ScriptedParticipant]
) -> None:
    participants["identity"].script(
        "CreateUser", error(grpc.StatusCode.RESOURCE_EXHAUSTED, retry_after=timedelta(seconds=0.4))
    )
    began = time.monotonic()

    await harness.create("onboard", saga_id="slow-down")
    saga = await harness.wait("slow-down")

    assert state(saga) == "SUCCEEDED"
    assert time.monotonic() - began >= 0.4  # the policy alone would have waited 10 ms
    _first, second = participants["identity"].calls("execute")
    assert second.request.attempt == 2


async def test_calls_in_flight_per_participant_are_bounded(
    tmp_path: Path, participants: dict[str, ScriptedParticipant]
) -> None:
    participants["accounts"].rule = lambda request: ok(delay=0.05)
    async with running_coordinator(
        tmp_path, participants, [four_step_definition("onboard")], max_calls_per_participant=2
    ) as harness:
        for index in range(12):
            await harness.create("onboard", saga_id=f"busy-{index}")
        finals = [await harness.wait(f"busy-{index}") for index in range(12)]

    assert {state(saga) for saga in finals} == {"SUCCEEDED"}
    assert participants["accounts"].max_in_flight == 2
    assert participants["identity"].max_in_flight <= 2
