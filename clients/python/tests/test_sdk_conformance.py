"""The conformance kit against a well-behaved participant and against broken ones."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from saga.v1 import participant_service_pb2, participant_service_pb2_grpc

from saga_sdk.barrier import Barrier
from saga_sdk.conformance import CheckResult, main, mapping_problems, print_results, run_async
from saga_sdk.errors import PermanentFailure, Rejected, RetryLater, error_from_status
from saga_sdk.participant import CompensateContext, ExecuteContext, Participant
from saga_sdk.postgres_barrier import PostgresBarrier
from saga_sdk.sqlite_barrier import SqliteBarrier

ALL_CHECKS = [
    "execute-ok",
    "duplicate-execute",
    "duplicate-compensate",
    "null-compensation",
    "no-hanging-execute",
    "concurrent-duplicates",
    "past-deadline",
    "unknown-action",
]


def wallet(barrier: Barrier | None, placeholder: str = "?") -> Participant:
    """A participant whose Debit and Refund write to a `moves` table (through the barrier)."""
    participant = Participant("wallet", barrier=barrier)

    @participant.action("Debit")
    def debit(ctx: ExecuteContext) -> dict[str, Any]:
        if ctx.tx is not None:
            ctx.tx.execute(f"INSERT INTO moves VALUES ({placeholder})", (-ctx.input["amount"],))
        return {"move": uuid.uuid4().hex}  # a fresh value each time: only a barrier repeats it

    @participant.compensation("Refund")
    def refund(ctx: CompensateContext) -> None:
        if ctx.tx is not None:
            ctx.tx.execute(f"INSERT INTO moves VALUES ({placeholder})", (ctx.input["amount"],))

    return participant


@pytest.fixture
async def served() -> AsyncIterator[Callable[[Participant], Any]]:
    participants: list[Participant] = []

    async def start(participant: Participant) -> str:
        port = await participant.start("127.0.0.1:0")
        participants.append(participant)
        return f"127.0.0.1:{port}"

    yield start
    for participant in participants:
        await participant.stop(0)


def verdicts(results: list[CheckResult]) -> dict[str, bool]:
    return {r.name: r.passed for r in results}


async def test_a_participant_with_the_sqlite_barrier_passes_every_check(
    served: Callable[[Participant], Any], tmp_path: Path
) -> None:
    barrier = SqliteBarrier(tmp_path / "wallet.db")
    with barrier.connect() as connection:
        connection.execute("CREATE TABLE moves (amount INTEGER)")
    target = await served(wallet(barrier))

    results = await run_async(target, "Debit", "Refund", {"amount": 5})

    assert [r.name for r in results] == ALL_CHECKS
    assert all(r.passed for r in results), results
    late = next(r for r in results if r.name == "no-hanging-execute")
    assert "EXECUTE_AFTER_COMPENSATE" in late.detail


async def test_a_participant_with_the_postgres_barrier_passes_every_check(
    served: Callable[[Participant], Any], postgres_url: str
) -> None:
    barrier = PostgresBarrier(postgres_url)
    try:
        await asyncio.to_thread(barrier.migrate)
        import psycopg

        with psycopg.connect(postgres_url, autocommit=True) as connection:
            connection.execute("CREATE TABLE moves (amount INTEGER)")
        target = await served(wallet(barrier, "%s"))

        results = await run_async(target, "Debit", "Refund", {"amount": 5}, concurrency=12)
    finally:
        await barrier.aclose()

    assert all(r.passed for r in results), results


async def test_a_participant_without_a_barrier_fails_the_idempotency_checks(
    served: Callable[[Participant], Any],
) -> None:
    target = await served(wallet(None))

    results = await run_async(target, "Debit", "Refund", {"amount": 5})

    assert verdicts(results) == {
        "execute-ok": True,
        "duplicate-execute": False,
        "duplicate-compensate": True,  # its answers are identical; the effect is invisible
        "null-compensation": True,
        "no-hanging-execute": False,
        "concurrent-duplicates": False,
        "past-deadline": False,
        "unknown-action": True,
    }
    failed = {r.name: r.detail for r in results if not r.passed}
    assert failed["duplicate-execute"].startswith("outputs differ")
    assert failed["no-hanging-execute"].startswith("hanging")
    assert "8 different answers" in failed["concurrent-duplicates"]


class Sloppy(participant_service_pb2_grpc.ParticipantServiceServicer):
    """Answers every action, known or not, with a counter; refuses nothing."""

    def __init__(self, compensate_code: grpc.StatusCode | None = None) -> None:
        self.counter = itertools.count(1)
        self.compensate_code = compensate_code

    async def Execute(
        self,
        request: participant_service_pb2.ExecuteRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> participant_service_pb2.ExecuteResponse:
        if request.action != "Debit":
            await context.abort(grpc.StatusCode.INTERNAL, "no idea")
        return participant_service_pb2.ExecuteResponse(output=str(next(self.counter)).encode())

    async def Compensate(
        self,
        request: participant_service_pb2.CompensateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> participant_service_pb2.CompensateResponse:
        if self.compensate_code is not None and not request.HasField("execute_output"):
            await context.abort(self.compensate_code, "cannot compensate what never happened")
        return participant_service_pb2.CompensateResponse()


@pytest.fixture
async def sloppy() -> AsyncIterator[Callable[[Sloppy], Any]]:
    servers: list[grpc.aio.Server] = []

    async def start(servicer: Sloppy) -> str:
        server = grpc.aio.server()
        participant_service_pb2_grpc.add_ParticipantServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        await server.stop(0)


async def test_transient_answers_to_unknown_actions_fail(
    sloppy: Callable[[Sloppy], Any],
) -> None:
    target = await sloppy(Sloppy())

    results = verdicts(await run_async(target, "Debit", "Refund"))

    assert results["unknown-action"] is False
    assert results["duplicate-execute"] is False


async def test_a_failed_null_compensation_skips_the_late_execute_check(
    sloppy: Callable[[Sloppy], Any],
) -> None:
    target = await sloppy(Sloppy(compensate_code=grpc.StatusCode.NOT_FOUND))

    results = {r.name: r for r in await run_async(target, "Debit", "Refund")}

    assert results["null-compensation"].passed is False
    assert "NOT_FOUND" in results["null-compensation"].detail
    assert results["no-hanging-execute"].passed is False
    assert "not run" in results["no-hanging-execute"].detail


async def test_an_unreachable_participant_fails_every_check() -> None:
    results = await run_async("127.0.0.1:1", "Debit", "Refund", timeout=2)

    assert [r.passed for r in results] == [False] * len(ALL_CHECKS)
    assert "UNAVAILABLE" in results[0].detail


async def test_main_prints_a_row_per_check_and_returns_non_zero_on_failure(
    served: Callable[[Participant], Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good_barrier = SqliteBarrier(tmp_path / "good.db")
    with good_barrier.connect() as connection:
        connection.execute("CREATE TABLE moves (amount INTEGER)")
    good = await served(wallet(good_barrier))
    bad = await served(wallet(None))
    common = ["--action", "Debit", "--compensation", "Refund", "--payload", '{"amount": 2}']

    passed = await asyncio.to_thread(main, ["--target", good, *common])
    good_output = capsys.readouterr().out
    failed = await asyncio.to_thread(main, ["--target", bad, *common])
    bad_output = capsys.readouterr().out

    assert passed == 0
    assert all(name in good_output for name in ALL_CHECKS)
    assert "8 passed, 0 failed" in good_output
    assert failed == 1
    assert "failed: duplicate-execute, no-hanging-execute" in bad_output


def test_main_refuses_a_payload_that_is_not_json(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--target", "x:1", "--action", "A", "--compensation", "B", "--payload", "{"])

    assert exited.value.code == 2
    assert "--payload is not JSON" in capsys.readouterr().err


def test_plain_output_has_one_row_per_check(capsys: pytest.CaptureFixture[str]) -> None:
    print_results(
        [CheckResult("duplicate-execute", True, "same"), CheckResult("x", False, "[WHY]")],
        plain=True,
    )

    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("PASS  duplicate-execute")
    assert lines[1].startswith("FAIL  x")
    assert lines[1].endswith("[WHY]")
    assert lines[2] == "1 passed, 1 failed: x"


class Miswired(participant_service_pb2_grpc.ParticipantServiceServicer):
    """A participant with a barrier whose non-OK answers are rewritten the wrong way."""

    def __init__(self, participant: Participant, mode: str) -> None:
        self.participant = participant
        self.mode = mode

    async def _refuse(
        self, answer: grpc.Status, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        if self.mode == "bare-rejection" and answer.code is grpc.StatusCode.FAILED_PRECONDITION:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no")
        if answer.code is grpc.StatusCode.UNIMPLEMENTED and self.mode == "retry-info":
            delay = duration_pb2.Duration(seconds=30)
            retry = any_pb2.Any()
            retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
            status = status_pb2.Status(
                code=code_pb2.INVALID_ARGUMENT, message="no", details=[retry]
            )
            await context.abort_with_status(rpc_status.to_status(status))
        if answer.code is grpc.StatusCode.UNIMPLEMENTED and self.mode == "mismatch":
            status = status_pb2.Status(code=code_pb2.NOT_FOUND, message="no")
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                "no",
                trailing_metadata=(("grpc-status-details-bin", status.SerializeToString()),),
            )
        await context.abort_with_status(answer)

    async def Execute(
        self,
        request: participant_service_pb2.ExecuteRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> participant_service_pb2.ExecuteResponse:
        answer = await self.participant.execute(request, {})
        if not isinstance(answer, bytes):
            await self._refuse(answer, context)
        assert isinstance(answer, bytes)
        return participant_service_pb2.ExecuteResponse(output=answer)

    async def Compensate(
        self,
        request: participant_service_pb2.CompensateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> participant_service_pb2.CompensateResponse:
        answer = await self.participant.compensate(request, {})
        if not isinstance(answer, bytes):
            await self._refuse(answer, context)
        return participant_service_pb2.CompensateResponse()


@pytest.mark.parametrize(
    ("mode", "check", "problem"),
    [
        ("retry-info", "unknown-action", "a RetryInfo on INVALID_ARGUMENT, which is not retried"),
        ("mismatch", "unknown-action", "whose status details say code 5"),
        ("bare-rejection", "no-hanging-execute", "FAILED_PRECONDITION without an ErrorInfo reason"),
    ],
)
async def test_answers_that_do_not_map_as_documented_fail_the_check_they_came_up_in(
    tmp_path: Path, mode: str, check: str, problem: str
) -> None:
    barrier = SqliteBarrier(tmp_path / "wallet.db")
    with barrier.connect() as connection:
        connection.execute("CREATE TABLE moves (amount INTEGER)")
    server = grpc.aio.server()
    participant_service_pb2_grpc.add_ParticipantServiceServicer_to_server(
        Miswired(wallet(barrier), mode), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        results = {
            r.name: r
            for r in await run_async(f"127.0.0.1:{port}", "Debit", "Refund", {"amount": 1})
        }
    finally:
        await server.stop(0)

    assert [name for name, r in results.items() if not r.passed] == [check]
    assert results[check].detail.startswith("not as documented: ")
    assert problem in results[check].detail


async def test_the_sdks_own_refusals_map_as_documented() -> None:
    participant = Participant("wallet")
    refusals: dict[str, Exception] = {
        "Reject": Rejected("NO_FUNDS", "balance too low"),
        "Later": RetryLater("ledger busy", retry_after=timedelta(seconds=3), reason="LEDGER_BUSY"),
        "Never": PermanentFailure("no such currency", reason="CURRENCY_UNSUPPORTED"),
        "Crash": RuntimeError("boom"),
    }
    for action, error in refusals.items():

        def refuse(ctx: ExecuteContext, error: Exception = error) -> None:
            raise error

        participant.action(action)(refuse)
    seen = {}
    for action in refusals:
        request = participant_service_pb2.ExecuteRequest(
            saga="sagas/s", step="debit", action=action, request_id=action, attempt=1
        )
        answer = await participant.execute(request, {})
        assert isinstance(answer, grpc.Status)
        status, problems = mapping_problems(answer.code, answer.trailing_metadata)
        error = error_from_status(answer.code, answer.details, status)
        seen[action] = (answer.code.name, error.reason, error.retry_after, problems)

    assert seen == {
        "Reject": ("FAILED_PRECONDITION", "NO_FUNDS", None, []),
        "Later": ("UNAVAILABLE", "LEDGER_BUSY", timedelta(seconds=3), []),
        "Never": ("INVALID_ARGUMENT", "CURRENCY_UNSUPPORTED", None, []),
        "Crash": ("INTERNAL", "HANDLER_FAILED", None, []),
    }
