"""Participant: handlers served over a real loopback gRPC server, with and without a barrier."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from saga.v1 import participant_service_pb2, participant_service_pb2_grpc

from saga_sdk import Rejected
from saga_sdk.errors import SagaRpcError, error_from_aio
from saga_sdk.participant import CompensateContext, ExecuteContext, Participant
from saga_sdk.sqlite_barrier import SqliteBarrier

if TYPE_CHECKING:
    Stub = participant_service_pb2_grpc.ParticipantServiceAsyncStub


def execute_request(
    action: str, input: bytes = b'{"amount": 5}', request_id: str = "", **fields: Any
) -> participant_service_pb2.ExecuteRequest:
    return participant_service_pb2.ExecuteRequest(
        saga=fields.pop("saga", "sagas/s-1"),
        definition="onboard",
        definition_version=2,
        step="debit",
        action=action,
        request_id=request_id or uuid.uuid4().hex,
        attempt=fields.pop("attempt", 1),
        input=input,
        **fields,
    )


def compensate_request(
    action: str, execute: participant_service_pb2.ExecuteRequest, output: bytes | None = None
) -> participant_service_pb2.CompensateRequest:
    request = participant_service_pb2.CompensateRequest(
        saga=execute.saga,
        definition=execute.definition,
        definition_version=execute.definition_version,
        step=execute.step,
        action=action,
        request_id=uuid.uuid4().hex,
        attempt=1,
        input=execute.input,
        execute_request_id=execute.request_id,
    )
    if output is not None:
        request.execute_output = output
    return request


async def failure(call: Any) -> SagaRpcError:
    """Await a call that must fail and return its parsed error."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return error_from_aio(caught.value)


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Participant], Any]]:
    """Start participants on loopback ports; return a stub for each; stop them all at the end."""
    started: list[tuple[Participant, grpc.aio.Channel]] = []

    async def start(participant: Participant) -> Stub:
        port = await participant.start("127.0.0.1:0")
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        started.append((participant, channel))
        return participant_service_pb2_grpc.ParticipantServiceStub(channel)

    yield start
    for participant, channel in started:
        await channel.close()
        await participant.stop(0)


# --- handlers and contexts ----------------------------------------------------------------


async def test_a_sync_handler_gets_the_decoded_request_and_runs_off_the_loop(
    serve: Callable[[Participant], Any],
) -> None:
    participant = Participant("accounts")
    seen: list[ExecuteContext] = []
    threads: list[int] = []

    @participant.action("OpenAccount")
    def open_account(ctx: ExecuteContext) -> dict[str, Any]:
        seen.append(ctx)
        threads.append(threading.get_ident())
        return {"account": "A-1", "for": ctx.input["owner"]}

    stub = await serve(participant)
    request = execute_request(
        "OpenAccount",
        b'{"owner": "ACME"}',
        attempt=3,
        previous_outputs={"check": b'{"ok": true}', "blob": b"\xff\x00", "empty": b""},
    )
    response = await stub.Execute(request, metadata=(("traceparent", "00-abc-def-01"),))

    assert json.loads(response.output) == {"account": "A-1", "for": "ACME"}
    ctx = seen[0]
    assert (ctx.saga_id, ctx.definition, ctx.definition_version) == ("s-1", "onboard", 2)
    assert (ctx.step, ctx.action, ctx.request_id, ctx.attempt) == (
        "debit",
        "OpenAccount",
        request.request_id,
        3,
    )
    assert ctx.input == {"owner": "ACME"}
    assert dict(ctx.previous_outputs) == {"check": {"ok": True}, "blob": b"\xff\x00", "empty": None}
    assert ctx.metadata["traceparent"] == "00-abc-def-01"
    assert ctx.tx is None
    assert threads[0] != threading.get_ident()


async def test_sync_handlers_do_not_block_each_other(serve: Callable[[Participant], Any]) -> None:
    participant = Participant("slow")
    both_inside = threading.Barrier(2, timeout=5)

    @participant.action("Wait")
    def wait(ctx: ExecuteContext) -> str:
        both_inside.wait()  # only returns when the two calls run at the same time
        return "done"

    stub = await serve(participant)
    answers = await asyncio.gather(
        stub.Execute(execute_request("Wait")), stub.Execute(execute_request("Wait"))
    )

    assert [a.output for a in answers] == [b'"done"', b'"done"']


async def test_async_and_raw_handlers(serve: Callable[[Participant], Any]) -> None:
    participant = Participant("cards")
    compensated: list[CompensateContext] = []

    @participant.action("Issue", raw=True)
    async def issue(ctx: ExecuteContext) -> bytes:
        await asyncio.sleep(0)
        assert ctx.previous_outputs == {"x": b"{}"}
        raw: bytes = ctx.input
        return b"card:" + raw

    @participant.compensation("Revoke", raw=True)
    async def revoke(ctx: CompensateContext) -> None:
        compensated.append(ctx)

    @participant.action("Nothing")
    def nothing(ctx: ExecuteContext) -> None:
        return None

    stub = await serve(participant)
    execute = execute_request("Issue", b"\x01raw", previous_outputs={"x": b"{}"})
    issued = await stub.Execute(execute)
    await stub.Compensate(compensate_request("Revoke", execute, issued.output))
    empty = await stub.Execute(execute_request("Nothing"))

    assert issued.output == b"card:\x01raw"
    assert compensated[0].execute_output == b"card:\x01raw"
    assert compensated[0].execute_request_id == execute.request_id
    assert empty.output == b""


async def test_a_compensation_gets_the_execute_output_decoded(
    serve: Callable[[Participant], Any],
) -> None:
    participant = Participant("accounts")
    got: list[CompensateContext] = []

    @participant.compensation("Close")
    def close(ctx: CompensateContext) -> None:
        got.append(ctx)

    stub = await serve(participant)
    execute = execute_request("Open")
    await stub.Compensate(compensate_request("Close", execute, b'{"account": "A-9"}'))
    await stub.Compensate(compensate_request("Close", execute))

    assert got[0].execute_output == {"account": "A-9"}
    assert got[0].input == {"amount": 5}
    assert got[1].execute_output is None


# --- errors -------------------------------------------------------------------------------


async def test_a_rejection_is_failed_precondition_with_its_error_info(
    serve: Callable[[Participant], Any],
) -> None:
    participant = Participant("accounts")

    @participant.action("Debit")
    def debit(ctx: ExecuteContext) -> None:
        raise Rejected("INSUFFICIENT_FUNDS", "balance 3 < 5")

    stub = await serve(participant)
    request = execute_request("Debit")
    error = await failure(stub.Execute(request))

    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert (error.reason, error.domain, error.message) == (
        "INSUFFICIENT_FUNDS",
        "accounts",
        "balance 3 < 5",
    )
    assert error.metadata["request_id"] == request.request_id


async def test_an_unknown_action_is_unimplemented_and_names_the_known_ones(
    serve: Callable[[Participant], Any],
) -> None:
    participant = Participant("accounts")

    @participant.action("Open")
    def open_(ctx: ExecuteContext) -> None: ...

    stub = await serve(participant)
    execute = await failure(stub.Execute(execute_request("Opne")))
    compensate = await failure(
        stub.Compensate(compensate_request("Close", execute_request("Open")))
    )

    assert execute.code == grpc.StatusCode.UNIMPLEMENTED
    assert execute.reason == "UNKNOWN_ACTION"
    assert "'Opne'" in execute.message
    assert "Open" in execute.message
    assert compensate.code == grpc.StatusCode.UNIMPLEMENTED


async def test_an_input_that_is_not_json_is_invalid_argument(
    serve: Callable[[Participant], Any],
) -> None:
    participant = Participant("accounts")
    called: list[ExecuteContext] = []
    participant.action("Open")(called.append)

    stub = await serve(participant)
    error = await failure(stub.Execute(execute_request("Open", b"{not json")))

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in error.field_violations] == ["input"]
    assert called == []


async def test_an_unexpected_exception_is_internal_and_logged(
    serve: Callable[[Participant], Any], caplog: pytest.LogCaptureFixture
) -> None:
    participant = Participant("accounts")

    @participant.action("Open")
    async def open_(ctx: ExecuteContext) -> None:
        raise KeyError("missing")

    @participant.action("Weird")
    def weird(ctx: ExecuteContext) -> object:
        return object()  # not JSON-serialisable

    stub = await serve(participant)
    with caplog.at_level(logging.ERROR, logger="saga_sdk.participant"):
        error = await failure(stub.Execute(execute_request("Open")))
        weird_error = await failure(stub.Execute(execute_request("Weird")))

    assert error.code == grpc.StatusCode.INTERNAL
    assert error.reason == "HANDLER_FAILED"
    assert "KeyError" in error.message
    assert weird_error.code == grpc.StatusCode.INTERNAL
    assert "TypeError" in weird_error.message
    assert any("Execute 'Open'" in r.getMessage() for r in caplog.records)


def test_registration_mistakes_are_refused_early() -> None:
    participant = Participant("p")
    participant.action("A")(lambda ctx: None)
    with pytest.raises(ValueError, match="twice"):
        participant.action("A")(lambda ctx: None)
    with pytest.raises(ValueError, match="UPPER_SNAKE"):
        Rejected("not snake", "")


# --- with a barrier -----------------------------------------------------------------------


def ledger(tmp_path: Path) -> SqliteBarrier:
    barrier = SqliteBarrier(tmp_path / "accounts.db")
    with barrier.connect() as connection:
        connection.execute("CREATE TABLE ledger (request_id TEXT, amount INTEGER)")
    return barrier


def entries(barrier: SqliteBarrier) -> list[tuple[str, int]]:
    with sqlite3.connect(barrier.path) as connection:
        return list(connection.execute("SELECT request_id, amount FROM ledger ORDER BY rowid"))


def accounts(barrier: SqliteBarrier) -> tuple[Participant, list[str]]:
    """A participant whose Debit and Refund write ledger entries through the barrier."""
    participant = Participant("accounts", barrier=barrier)
    calls: list[str] = []

    @participant.action("Debit")
    def debit(ctx: ExecuteContext) -> dict[str, str]:
        calls.append(ctx.request_id)
        if ctx.input.get("refuse"):
            raise Rejected("INSUFFICIENT_FUNDS")
        ctx.tx.execute("INSERT INTO ledger VALUES (?, ?)", (ctx.request_id, -ctx.input["amount"]))
        return {"entry": uuid.uuid4().hex}

    @participant.compensation("Refund")
    async def refund(ctx: CompensateContext) -> None:
        assert "entry" in ctx.execute_output
        ctx.tx.execute("INSERT INTO ledger VALUES (?, ?)", (ctx.request_id, ctx.input["amount"]))

    return participant, calls


async def test_with_a_barrier_a_duplicate_execute_answers_the_first_output_once(
    serve: Callable[[Participant], Any], tmp_path: Path
) -> None:
    barrier = ledger(tmp_path)
    participant, _ = accounts(barrier)
    stub = await serve(participant)
    request = execute_request("Debit")

    first = await stub.Execute(request)
    again = await stub.Execute(request)
    refund = compensate_request("Refund", request, first.output)
    await stub.Compensate(refund)
    await stub.Compensate(refund)

    assert first.output == again.output
    assert entries(barrier) == [(request.request_id, -5), (refund.request_id, 5)]


async def test_with_a_barrier_a_late_execute_is_refused_after_a_null_compensation(
    serve: Callable[[Participant], Any], tmp_path: Path
) -> None:
    barrier = ledger(tmp_path)
    participant, calls = accounts(barrier)
    stub = await serve(participant)
    request = execute_request("Debit")

    await stub.Compensate(compensate_request("Refund", request))
    late = await failure(stub.Execute(request))

    assert late.code == grpc.StatusCode.FAILED_PRECONDITION
    assert late.reason == "EXECUTE_AFTER_COMPENSATE"
    assert late.domain == "accounts"
    assert entries(barrier) == []
    assert calls == []


async def test_with_a_barrier_a_rejection_is_replayed_without_calling_the_handler(
    serve: Callable[[Participant], Any], tmp_path: Path
) -> None:
    barrier = ledger(tmp_path)
    participant, calls = accounts(barrier)
    stub = await serve(participant)
    request = execute_request("Debit", b'{"amount": 5, "refuse": true}')

    first = await failure(stub.Execute(request))
    again = await failure(stub.Execute(request))
    await stub.Compensate(compensate_request("Refund", request))

    assert first.reason == again.reason == "INSUFFICIENT_FUNDS"
    assert calls == [request.request_id]
    assert entries(barrier) == []


async def test_a_compensate_without_execute_request_id_is_refused_with_a_barrier(
    serve: Callable[[Participant], Any], tmp_path: Path
) -> None:
    stub = await serve(accounts(ledger(tmp_path))[0])
    request = compensate_request("Refund", execute_request("Debit"))
    request.execute_request_id = ""

    error = await failure(stub.Compensate(request))

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in error.field_violations] == ["execute_request_id"]


async def test_a_call_past_its_deadline_still_commits_and_the_retry_replays_it(
    serve: Callable[[Participant], Any], tmp_path: Path
) -> None:
    barrier = ledger(tmp_path)
    participant = Participant("accounts", barrier=barrier)
    finished = threading.Event()

    @participant.action("Debit")
    def slow_debit(ctx: ExecuteContext) -> str:
        ctx.tx.execute("INSERT INTO ledger VALUES (?, ?)", (ctx.request_id, -1))
        threading.Event().wait(0.5)
        finished.set()
        return uuid.uuid4().hex

    stub = await serve(participant)
    request = execute_request("Debit")
    late = await failure(stub.Execute(request, timeout=0.1))
    assert await asyncio.to_thread(finished.wait, 5)
    await asyncio.sleep(0.1)  # let the handler's transaction commit
    retried = await stub.Execute(request, timeout=5)
    again = await stub.Execute(request, timeout=5)

    assert late.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert retried.output == again.output
    assert entries(barrier) == [(request.request_id, -1)]


# --- serving ------------------------------------------------------------------------------


async def test_health_is_served_next_to_the_participant(
    serve: Callable[[Participant], Any],
) -> None:
    participant = Participant("accounts")
    port = await participant.start("127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            overall = await health.Check(health_pb2.HealthCheckRequest(service=""))
            service = await health.Check(
                health_pb2.HealthCheckRequest(service="saga.v1.ParticipantService")
            )
    finally:
        await participant.stop(0)

    assert overall.status == health_pb2.HealthCheckResponse.SERVING
    assert service.status == health_pb2.HealthCheckResponse.SERVING
    await participant.start()
    with pytest.raises(RuntimeError, match="already serving"):
        await participant.start()
    await participant.stop(0)


async def test_stop_lets_a_running_call_finish_within_the_grace(tmp_path: Path) -> None:
    participant = Participant("accounts")
    inside = asyncio.Event()

    @participant.action("Slow")
    async def slow(ctx: ExecuteContext) -> str:
        inside.set()
        await asyncio.sleep(0.3)
        return "finished"

    port = await participant.start("127.0.0.1:0")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = participant_service_pb2_grpc.ParticipantServiceStub(channel)
        call = asyncio.ensure_future(stub.Execute(execute_request("Slow")))
        await inside.wait()
        await participant.stop(grace=5)
        response = await call
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Execute(execute_request("Slow"), timeout=2)

    assert response.output == b'"finished"'
    assert refused.value.code() in {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
