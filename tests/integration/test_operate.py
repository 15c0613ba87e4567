"""Operating sagas over gRPC: operator actions and their audit trail, budgets that end, the
definitions registry, finding sagas, and retention. Real gRPC on loopback, a real SQLite file."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from saga.v1 import coordinator_service_pb2 as cpb
from saga.v1 import saga_pb2

from tests.support.coordinator import (
    FAST_RETRY,
    Harness,
    four_step_definition,
    running_coordinator,
)
from tests.support.participants import ScriptedParticipant, error, ok, reject

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def state(saga: saga_pb2.Saga) -> str:
    return saga_pb2.SagaState.Name(saga.state).removeprefix("SAGA_STATE_")


def step_states(saga: saga_pb2.Saga) -> list[str]:
    return [saga_pb2.StepState.Name(step.state).removeprefix("STEP_STATE_") for step in saga.steps]


def reason_of(failure: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(failure)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    raise AssertionError("no ErrorInfo")


def pivoted_definition(name: str = "pay", **overrides: Any) -> dict[str, Any]:
    """reserve (compensatable), charge (pivot), ship (retriable), with fast retries."""
    steps: list[dict[str, Any]] = [
        {
            "name": "reserve",
            "participant": "identity",
            "action": "Reserve",
            "compensation": "Release",
        },
        {"name": "charge", "participant": "accounts", "action": "Charge", "kind": "PIVOT"},
        {"name": "ship", "participant": "cards", "action": "Ship", "kind": "RETRIABLE"},
    ]
    for step in steps:
        step.update(overrides.get(str(step["name"]), {}))
    definition: dict[str, Any] = {
        "name": name,
        "version": 1,
        "retry": FAST_RETRY,
        "compensation_retry": FAST_RETRY,
        "steps": steps,
    }
    definition.update(overrides.get("", {}))
    return definition


SLOW_RETRY = {"max_attempts": 3, "initial_backoff": "30s", "max_backoff": "60s"}


@pytest.fixture
async def harness(
    tmp_path: Path, participants: dict[str, ScriptedParticipant]
) -> AsyncIterator[Harness]:
    definitions = [
        four_step_definition("onboard"),
        four_step_definition("onboard-slow", **{"create-user": {"retry": SLOW_RETRY}}),
        pivoted_definition("pay", ship={"max_attempts": 2}, charge={"max_attempts": 2}),
        pivoted_definition("pay-by", **{"": {"deadline": "1s"}}),
    ]
    async with running_coordinator(tmp_path, participants, definitions) as running:
        yield running


async def retry(harness: Harness, saga_id: str, step: str = "", **fields: Any) -> saga_pb2.Saga:
    request = cpb.RetrySagaStepRequest(
        name=f"sagas/{saga_id}", step=step, reason=fields.pop("reason", "because"), **fields
    )
    return (await harness.stub.RetrySagaStep(request)).saga


async def test_resume_after_the_participant_is_fixed_ends_compensated_with_no_net_effect(
    harness: Harness, participants: dict[str, ScriptedParticipant]
) -> None:
    participants["cards"].script("IssueCard", reject("CARD_REFUSED", "no card for you"))
    participants["accounts"].script(
        "CloseAccount",
        *[error(UNAVAILABLE, "ledger down")] * 3,  # the compensation's budget
    )
    saga = await harness.create("onboard", saga_id="parked-1")
    saga = await harness.wait(saga.saga_id)
    assert state(saga) == "NEEDS_ATTENTION"
    assert saga.failure.step == "open-account"

    refused = await _refused(harness.stub.RetrySagaStep(_retry_request("parked-1", "")))
    assert refused.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(refused) == "ACTION_NOT_ALLOWED"
    assert "NEEDS_ATTENTION, stuck on step 'open-account'" in (refused.details() or "")
    assert "resume step 'open-account'" in (refused.details() or "")

    missing_reason = await _refused(
        harness.stub.ResumeSaga(cpb.ResumeSagaRequest(name="sagas/parked-1"))
    )
    assert missing_reason.code() is grpc.StatusCode.INVALID_ARGUMENT

    # The participant is fixed (its script is spent: it answers OK from now on).
    resumed = await harness.stub.ResumeSaga(
        cpb.ResumeSagaRequest(name="sagas/parked-1", reason="ledger is back", actor="ana")
    )
    assert state(resumed.saga) in ("COMPENSATING", "COMPENSATED")
    saga = await harness.wait("parked-1")
    assert state(saga) == "COMPENSATED"
    assert [(a.actor, a.reason) for a in saga.audit] == [("ana", "ledger is back")]
    assert saga.audit[0].action == saga_pb2.OPERATOR_ACTION_RESUME
    assert saga.audit[0].step == "open-account"

    # Every step's net effect is zero: what was executed was compensated.
    for participant in participants.values():
        executed = {r.request.step for r in participant.calls("execute")}
        undone = {r.request.step for r in participant.calls("compensate")}
        applied_executes = {
            rid.split("/steps/")[1].split(":")[0]
            for rid in participant.applied
            if rid.endswith(":execute")
        }
        applied_undos = {
            rid.split("/steps/")[1].split(":")[0]
            for rid in participant.applied
            if rid.endswith(":compensate")
        }
        assert applied_executes <= applied_undos, participant.name
        assert executed <= undone | {"issue-card"}

    events = await harness.stub.ListSagaEvents(cpb.ListSagaEventsRequest(name="sagas/parked-1"))
    types = [saga_pb2.SagaEventType.Name(e.type) for e in events.events]
    assert "SAGA_EVENT_TYPE_RESUMED" in types
    resumed_event = events.events[types.index("SAGA_EVENT_TYPE_RESUMED")]
    assert (resumed_event.actor, resumed_event.reason) == ("ana", "ledger is back")
    compensations = [e.action for e in events.events if e.operation == "compensate"]
    assert compensations[-2:] == ["CloseAccount", "DeactivateUser"]


async def _log(harness: Harness, saga_id: str, size: int, newest_first: bool) -> list[int]:
    """The sequences of a saga's whole log, read in pages of ``size`` in one order."""
    sequences: list[int] = []
    token = ""
    while True:
        page = await harness.stub.ListSagaEvents(
            cpb.ListSagaEventsRequest(
                name=f"sagas/{saga_id}", page_size=size, page_token=token, newest_first=newest_first
            )
        )
        assert len(page.events) <= size
        sequences.extend(event.sequence for event in page.events)
        token = page.next_page_token
        if not token:
            return sequences


async def test_the_log_reads_newest_first_in_pages_and_tokens_keep_their_order(
    harness: Harness, participants: dict[str, ScriptedParticipant]
) -> None:
    participants["cards"].script("IssueCard", reject("CARD_REFUSED", "no card for you"))
    saga = await harness.wait((await harness.create("onboard", saga_id="told-1")).saga_id)
    assert state(saga) == "COMPENSATED"

    oldest_first = await _log(harness, "told-1", 100, newest_first=False)
    assert oldest_first == list(range(1, len(oldest_first) + 1))
    assert len(oldest_first) >= 7
    for size in (1, 3, len(oldest_first), 1000):
        assert await _log(harness, "told-1", size, newest_first=True) == oldest_first[::-1]

    newest = await harness.stub.ListSagaEvents(
        cpb.ListSagaEventsRequest(name="sagas/told-1", page_size=2, newest_first=True)
    )
    last = newest.events[0]
    assert last.sequence == oldest_first[-1]
    assert (last.type, last.action) == (
        saga_pb2.SAGA_EVENT_TYPE_COMPENSATION_SUCCEEDED,
        "DeactivateUser",
    )
    forward = await harness.stub.ListSagaEvents(
        cpb.ListSagaEventsRequest(name="sagas/told-1", page_size=2)
    )
    for token, newest_first, why in (
        (newest.next_page_token, False, "read newest first: keep newest_first the same"),
        (forward.next_page_token, True, "read oldest first: keep newest_first the same"),
        ("bm90IGEgdG9rZW4", True, "not a token returned by ListSagaEvents"),
        ("PDA", True, "not a token returned by ListSagaEvents"),  # "<0"
    ):
        refused = await _refused(
            harness.stub.ListSagaEvents(
                cpb.ListSagaEventsRequest(
                    name="sagas/told-1", page_size=2, page_token=token, newest_first=newest_first
                )
            )
        )
        assert refused.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert why in _violations(refused)["page_token"]


def _violations(refused: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(refused)
    assert status is not None
    found: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            request = error_details_pb2.BadRequest()
            detail.Unpack(request)
            found.update((v.field, v.description) for v in request.field_violations)
    return found


def _retry_request(saga_id: str, step: str, reason: str = "now") -> cpb.RetrySagaStepRequest:
    return cpb.RetrySagaStepRequest(name=f"sagas/{saga_id}", step=step, reason=reason)


async def _refused(call: Any) -> grpc.aio.AioRpcError:
    try:
        await call
    except grpc.aio.AioRpcError as failure:
        return failure
    raise AssertionError("the call was not refused")


async def test_retry_now_sends_a_waiting_step_at_once_with_the_same_request_id(
    harness: Harness, participants: dict[str, ScriptedParticipant]
) -> None:
    participants["identity"].script("CreateUser", error(UNAVAILABLE, "down"))
    await harness.create("onboard-slow", saga_id="slow-1")
    for _ in range(100):
        saga = (await harness.stub.GetSaga(cpb.GetSagaRequest(name="sagas/slow-1"))).saga
        if saga.steps[0].HasField("next_attempt_time"):
            break
        await asyncio.sleep(0.02)
    assert saga.steps[0].execute_attempts == 2  # attempt 2 waits out a 30 s backoff

    stale = await _refused(
        harness.stub.RetrySagaStep(
            cpb.RetrySagaStepRequest(name="sagas/slow-1", reason="x", expected_version=1)
        )
    )
    assert stale.code() is grpc.StatusCode.ABORTED
    assert reason_of(stale) == "SAGA_VERSION_MISMATCH"

    retried = await retry(harness, "slow-1", "create-user", actor="bo", reason="it is back")
    assert retried.audit[-1].actor == "bo"
    saga = await harness.wait("slow-1", timeout=10)
    assert state(saga) == "SUCCEEDED"
    ids = [r.request.request_id for r in participants["identity"].calls("execute")]
    assert ids == ["sagas/slow-1/steps/create-user:execute"] * 2


async def test_concurrent_actions_on_one_saga_exactly_one_wins(
    harness: Harness, participants: dict[str, ScriptedParticipant]
) -> None:
    participants["cards"].script("Ship", *[error(UNAVAILABLE, "down")] * 2)
    saga = await harness.wait((await harness.create("pay", saga_id="race-1")).saga_id)
    assert state(saga) == "NEEDS_ATTENTION"  # ship's max_attempts of 2 is spent
    assert saga.steps[2].failure.message.startswith("gave up after 2 attempts (max_attempts 2)")
    participants["cards"].script("Ship", ok(delay=0.5))

    results = await asyncio.gather(
        harness.stub.CompleteStep(
            cpb.CompleteStepRequest(name="sagas/race-1", reason="shipped by hand", output=b"{}")
        ),
        harness.stub.RetrySagaStep(_retry_request("race-1", "ship")),
        return_exceptions=True,
    )
    won = [r for r in results if not isinstance(r, BaseException)]
    lost = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(won) == 1
    assert len(lost) == 1
    assert lost[0].code() is grpc.StatusCode.FAILED_PRECONDITION
    saga = await harness.wait("race-1")
    assert state(saga) == "SUCCEEDED"
    assert len(saga.audit) == 1


async def test_complete_by_hand_of_a_parked_step_passes_its_output_on(
    harness: Harness, participants: dict[str, ScriptedParticipant]
) -> None:
    participants["accounts"].script("Charge", *[error(UNAVAILABLE, "down")] * 2)
    saga = await harness.wait((await harness.create("pay", saga_id="hand-1")).saga_id)
    assert state(saga) == "NEEDS_ATTENTION"
    assert saga.failure.step == "charge"

    done = await harness.stub.CompleteStep(
        cpb.CompleteStepRequest(
            name="sagas/hand-1", reason="charged at the till", output=b'{"receipt": 7}'
        )
    )
    assert done.saga.steps[1].by_operator
    saga = await harness.wait("hand-1")
    assert state(saga) == "SUCCEEDED"
    shipped = participants["cards"].calls("execute")[-1].execute
    assert json.loads(shipped.previous_outputs["charge"]) == {"receipt": 7}

    again = await _refused(
        harness.stub.CompleteStep(cpb.CompleteStepRequest(name="sagas/hand-1", reason="x"))
    )
    assert again.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "has ended SUCCEEDED" in (again.details() or "")
    unknown = await _refused(harness.stub.RetrySagaStep(_retry_request("nope", "")))
    assert unknown.code() is grpc.StatusCode.NOT_FOUND
    bad_step = await _refused(harness.stub.RetrySagaStep(_retry_request("hand-1", "no-such")))
    assert bad_step.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_mark_compensated_goes_on_with_the_backward_walk(
    harness: Harness, participants: dict[str, ScriptedParticipant]
) -> None:
    participants["cards"].script("IssueCard", reject("CARD_REFUSED", "no"))
    participants["accounts"].script("CloseAccount", reject("LEDGER_LOCKED", "the ledger is locked"))
    saga = await harness.wait((await harness.create("onboard", saga_id="mark-1")).saga_id)
    assert state(saga) == "NEEDS_ATTENTION"

    marked = await harness.stub.MarkStepCompensated(
        cpb.MarkStepCompensatedRequest(
            name="sagas/mark-1", step="open-account", reason="closed in the admin tool"
        )
    )
    assert marked.saga.steps[1].by_operator
    saga = await harness.wait("mark-1")
    assert state(saga) == "COMPENSATED"
    assert step_states(saga)[:2] == ["COMPENSATED", "COMPENSATED"]
    assert [c.request.action for c in participants["identity"].calls("compensate")] == [
        "DeactivateUser"
    ]


async def test_deadline_before_the_pivot_compensates_and_after_it_parks(
    harness: Harness, participants: dict[str, ScriptedParticipant]
) -> None:
    participants["accounts"].script("Charge", ok(delay=1.5))
    participants["identity"].script("Reserve", ok(delay=1.5))
    before = await harness.create("pay-by", saga_id="late-1")
    saga = await harness.wait(before.saga_id)
    assert state(saga) == "COMPENSATED"  # reserve answered after the deadline: undone
    assert saga.failure.reason == "SAGA_DEADLINE_EXCEEDED"
    assert saga.HasField("deadline_time")

    participants["cards"].script("Ship", *[error(UNAVAILABLE, "down")] * 1000)
    after = await harness.create("pay-by", saga_id="late-2")
    saga = await harness.wait(after.saga_id, timeout=10)
    assert state(saga) == "NEEDS_ATTENTION"
    assert saga.failure.code == "DEADLINE_EXCEEDED"
    assert saga.failure.step in ("charge", "ship")


async def test_definitions_registry_keeps_running_sagas_on_their_version(
    harness: Harness, participants: dict[str, ScriptedParticipant]
) -> None:
    participants["identity"].script("CreateUser", ok(delay=1.0))
    old = await harness.create("onboard", saga_id="v1-saga")

    current = (
        await harness.stub.GetDefinition(cpb.GetDefinitionRequest(name="onboard"))
    ).definition
    same = await harness.stub.RegisterDefinition(cpb.RegisterDefinitionRequest(definition=current))
    assert not same.created

    changed = saga_pb2.SagaDefinition()
    changed.CopyFrom(current)
    del changed.steps[3]
    conflict = await _refused(
        harness.stub.RegisterDefinition(cpb.RegisterDefinitionRequest(definition=changed))
    )
    assert conflict.code() is grpc.StatusCode.ALREADY_EXISTS
    assert reason_of(conflict) == "DEFINITION_VERSION_EXISTS"

    changed.version = 2
    changed.steps[0].participant = "nobody"
    invalid = await _refused(
        harness.stub.RegisterDefinition(cpb.RegisterDefinitionRequest(definition=changed))
    )
    assert invalid.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown participant 'nobody'" in (invalid.details() or "")

    changed.steps[0].participant = "identity"
    registered = await harness.stub.RegisterDefinition(
        cpb.RegisterDefinitionRequest(definition=changed)
    )
    assert registered.created
    listing = await harness.stub.ListDefinitions(cpb.ListDefinitionsRequest(name="onboard"))
    versions = {v.version: v.unfinished_sagas for v in listing.definitions[0].versions}
    assert versions == {1: 1, 2: 0}

    new = await harness.create("onboard", saga_id="v2-saga")
    assert new.definition_version == 2
    assert len(new.steps) == 3
    assert (await harness.wait("v1-saga")).definition_version == 1
    assert len((await harness.wait("v1-saga")).steps) == 4
    assert old.definition_version == 1
    assert state(await harness.wait("v2-saga")) == "SUCCEEDED"


async def test_labels_and_filters_find_the_stuck_sagas(
    harness: Harness, participants: dict[str, ScriptedParticipant]
) -> None:
    participants["accounts"].script("CloseAccount", reject("LEDGER_LOCKED", "the ledger is locked"))
    participants["cards"].script("IssueCard", *[reject("CARD_REFUSED", "no")] * 3)
    for index in range(3):
        await harness.stub.CreateSaga(
            cpb.CreateSagaRequest(
                saga_id=f"find-{index}",
                definition="onboard",
                input=b"{}",
                labels={"customer": f"c-{index}", "tier": "gold"},
            )
        )
        await harness.wait(f"find-{index}")

    bad = await _refused(
        harness.stub.CreateSaga(
            cpb.CreateSagaRequest(definition="onboard", labels={"bad key!": "x"})
        )
    )
    assert bad.code() is grpc.StatusCode.INVALID_ARGUMENT

    by_label = await harness.stub.ListSagas(cpb.ListSagasRequest(labels={"customer": "c-1"}))
    assert [s.saga_id for s in by_label.sagas] == ["find-1"]
    assert dict(by_label.sagas[0].labels) == {"customer": "c-1", "tier": "gold"}
    stuck = await harness.stub.ListSagas(
        cpb.ListSagasRequest(stuck_on_participant="accounts", labels={"tier": "gold"})
    )
    # The first saga parked on CloseAccount; the next two found it answering OK.
    assert [s.saga_id for s in stuck.sagas] == ["find-0"]
    counts = await harness.stub.CountSagas(cpb.CountSagasRequest(labels={"tier": "gold"}))
    by_state = {saga_pb2.SagaState.Name(c.state): c.count for c in counts.counts}
    assert saga_pb2.SagaState.Name(counts.counts[0].state) == "SAGA_STATE_NEEDS_ATTENTION"
    assert by_state["SAGA_STATE_NEEDS_ATTENTION"] == 1
    assert by_state["SAGA_STATE_COMPENSATED"] == 2
    assert counts.total == 3


async def test_prune_under_load_removes_only_old_ended_sagas(
    tmp_path: Path, participants: dict[str, ScriptedParticipant]
) -> None:
    async with running_coordinator(
        tmp_path, participants, [four_step_definition("onboard")]
    ) as harness:
        participants["cards"].script("IssueCard", reject("CARD_REFUSED", "no"))
        participants["accounts"].script(
            "CloseAccount", reject("LEDGER_LOCKED", "the ledger is locked")
        )
        parked = await harness.wait(
            (await harness.create("onboard", saga_id="keep-parked")).saga_id
        )
        assert state(parked) == "NEEDS_ATTENTION"
        old = [await harness.create("onboard", saga_id=f"old-{i}") for i in range(30)]
        for saga in old:
            await harness.wait(saga.saga_id)
        await asyncio.sleep(1.2)

        participants["identity"].script("CreateUser", *[ok(delay=0.3)] * 20)
        running = [
            asyncio.create_task(harness.create("onboard", saga_id=f"new-{i}")) for i in range(20)
        ]
        await asyncio.gather(*running)
        older_than = duration_pb2.Duration(seconds=60)
        too_short = await _refused(
            harness.stub.PruneSagas(
                cpb.PruneSagasRequest(older_than=duration_pb2.Duration(seconds=1))
            )
        )
        assert too_short.code() is grpc.StatusCode.INVALID_ARGUMENT
        # The cutoff is "ended more than a minute ago": move the store's clock instead of
        # waiting, by pruning through the engine with a cutoff one second back.
        engine = harness.coordinator.engine
        _, dry = await engine.prune(timedelta(seconds=1), dry_run=True)
        assert dry.sagas == 30
        _, done = await engine.prune(timedelta(seconds=1))
        assert done.sagas == 30
        assert done.events == 30 * 5  # created, then four steps answered
        nothing = await harness.stub.PruneSagas(cpb.PruneSagasRequest(older_than=older_than))
        assert nothing.sagas == 0

        gone = await _refused(harness.stub.GetSaga(cpb.GetSagaRequest(name="sagas/old-3")))
        assert gone.code() is grpc.StatusCode.NOT_FOUND
        assert "pruned" in (gone.details() or "")
        kept = await harness.stub.GetSaga(cpb.GetSagaRequest(name="sagas/keep-parked"))
        assert state(kept.saga) == "NEEDS_ATTENTION"
        for index in range(20):
            assert state(await harness.wait(f"new-{index}")) == "SUCCEEDED"
