"""The conformance kit: checks any participant, in any language, against the contract over gRPC.

    saga conformance --target localhost:50051 --action Debit --compensation Refund \\
        --payload '{"amount": 5}'

What it can check is what the contract makes observable from outside: the answers. It sends
real Execute and Compensate calls (each check with fresh saga ids and request ids) and checks:

- execute-ok            a fresh Execute of `action` with `payload` answers OK (if not, the
                        other checks say little: fix the payload first);
- duplicate-execute     the same Execute twice: both OK, with identical outputs;
- duplicate-compensate  the same Compensate twice after an Execute: both OK;
- null-compensation     a Compensate for an Execute that never arrived answers OK;
- no-hanging-execute    that Execute arriving afterwards is refused: FAILED_PRECONDITION with
                        an ErrorInfo (an OK means it applied after its compensation: hanging);
- concurrent-duplicates N identical Executes at once: all OK, with identical outputs;
- past-deadline         an Execute whose deadline expires, then retried with the same
                        request_id: the retry and a second retry answer OK and identically,
                        and the step can then be compensated, twice;
- unknown-action        an Execute and a Compensate of an action the participant does not
                        have: a non-OK code that is not retried (e.g. UNIMPLEMENTED).

Every non-OK answer, in every check, must also map as the contract's table "How a
participant's answer is read" documents, or the check it came up in fails:

- its `google.rpc.Status` details (if any) parse, and carry the call's own status code (a
  status the coordinator cannot classify otherwise);
- a `RetryInfo` only on a transient code (UNAVAILABLE, RESOURCE_EXHAUSTED, ...): on any other
  code it is ignored, since those are not retried; and its delay is not negative;
- FAILED_PRECONDITION (a business "no") carries an `ErrorInfo` with an UPPER_SNAKE reason.

What it cannot see: the participant's side effects. A participant that answers the same output
twice but applied the effect twice, or whose null compensation still changed something, passes
here; those need the participant's own tests (the SDK's barrier has them). The payload is
applied for real: point the kit at a test instance.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import grpc
import grpc.aio
from google.protobuf.message import DecodeError
from google.rpc import status_pb2
from saga.v1 import participant_service_pb2, participant_service_pb2_grpc

from saga_sdk.errors import (
    REASON_PATTERN,
    STATUS_DETAILS_KEY,
    SagaRpcError,
    error_from_status,
)
from saga_sdk.requests import encode_payload

TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
    }
)
"""Codes the coordinator retries (the contract's table)."""

DEFINITION = "saga-conformance"
STEP = "conformance-step"


@dataclass(frozen=True)
class CheckResult:
    """The verdict of one check, and what was seen."""

    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class Answer:
    """One call's answer: an output on OK, else the parsed error."""

    output: bytes | None
    error: SagaRpcError | None

    @property
    def ok(self) -> bool:
        return self.error is None

    def describe(self) -> str:
        if self.error is None:
            return f"OK {_show(self.output or b'')}"
        reason = f" [{self.error.reason}]" if self.error.reason else ""
        return f"{self.error.code.name}{reason}"


def mapping_problems(
    code: grpc.StatusCode, trailing: Iterable[tuple[str, str | bytes]] | None
) -> tuple[status_pb2.Status | None, list[str]]:
    """Parse a non-OK answer's rich status, and say how it departs from the documented
    mapping (see the module docstring); an empty list when it does not."""
    problems: list[str] = []
    status: status_pb2.Status | None = None
    for key, value in trailing or ():
        if key != STATUS_DETAILS_KEY:
            continue
        try:
            status = status_pb2.Status.FromString(value if isinstance(value, bytes) else b"")
        except DecodeError:
            problems.append(f"{code.name} with status details that are not a google.rpc.Status")
    if status is not None and status.code != code.value[0]:
        problems.append(
            f"{code.name} whose status details say code {status.code}: the coordinator "
            "reads the call's code, the details disagree"
        )
    # Read as the SDK reads any failed call: its ErrorInfo reason and RetryInfo delay.
    read = error_from_status(code, "", status)
    reason, retry_after = read.reason, read.retry_after
    if retry_after is not None and code not in TRANSIENT_CODES:
        problems.append(
            f"a RetryInfo on {code.name}, which is not retried: the delay means nothing there "
            "(send UNAVAILABLE to be retried later)"
        )
    if retry_after is not None and retry_after.total_seconds() < 0:
        problems.append(f"a negative RetryInfo delay on {code.name}")
    if code is grpc.StatusCode.FAILED_PRECONDITION and not reason:
        problems.append("FAILED_PRECONDITION without an ErrorInfo reason (a rejection needs one)")
    elif code is grpc.StatusCode.FAILED_PRECONDITION and not REASON_PATTERN.match(reason):
        problems.append(f"a rejection whose ErrorInfo reason {reason!r} is not UPPER_SNAKE")
    return status, problems


def _show(output: bytes, limit: int = 40) -> str:
    text = repr(output)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Failed(Exception):
    """A check's verdict: failed, with what was seen."""


class _Caller:
    """Sends the kit's calls to one participant."""

    def __init__(
        self,
        stub: participant_service_pb2_grpc.ParticipantServiceAsyncStub,
        action: str,
        compensation: str,
        payload: bytes,
        timeout: float,
        previous_outputs: Mapping[str, bytes],
    ) -> None:
        self.stub = stub
        self.action = action
        self.compensation = compensation
        self.payload = payload
        self.timeout = timeout
        self.previous_outputs = dict(previous_outputs)
        self.problems: list[str] = []
        """How answers departed from the documented mapping, as they came."""

    def _read_error(self, what: str, exc: grpc.aio.AioRpcError) -> SagaRpcError:
        status, problems = mapping_problems(exc.code(), exc.trailing_metadata())
        self.problems.extend(f"{what} answered {problem}" for problem in problems)
        return error_from_status(exc.code(), exc.details() or "", status)

    def execute_request(
        self, saga_id: str, request_id: str = "", action: str = ""
    ) -> participant_service_pb2.ExecuteRequest:
        return participant_service_pb2.ExecuteRequest(
            saga=f"sagas/{saga_id}",
            definition=DEFINITION,
            definition_version=1,
            step=STEP,
            action=action or self.action,
            request_id=request_id or uuid.uuid4().hex,
            attempt=1,
            input=self.payload,
            previous_outputs=self.previous_outputs,
        )

    def compensate_request(
        self, execute: participant_service_pb2.ExecuteRequest, output: bytes | None
    ) -> participant_service_pb2.CompensateRequest:
        request = participant_service_pb2.CompensateRequest(
            saga=execute.saga,
            definition=execute.definition,
            definition_version=execute.definition_version,
            step=execute.step,
            action=self.compensation,
            request_id=uuid.uuid4().hex,
            attempt=1,
            input=execute.input,
            execute_request_id=execute.request_id,
        )
        if output is not None:
            request.execute_output = output
        return request

    async def execute(
        self, request: participant_service_pb2.ExecuteRequest, timeout: float | None = None
    ) -> Answer:
        try:
            response = await self.stub.Execute(request, timeout=timeout or self.timeout)
        except grpc.aio.AioRpcError as exc:
            return Answer(None, self._read_error(f"Execute {request.action!r}", exc))
        return Answer(response.output, None)

    async def compensate(self, request: participant_service_pb2.CompensateRequest) -> Answer:
        try:
            await self.stub.Compensate(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            return Answer(None, self._read_error(f"Compensate {request.action!r}", exc))
        return Answer(b"", None)


def _saga_id() -> str:
    return f"conformance-{uuid.uuid4().hex[:12]}"


def _expect_ok(what: str, answer: Answer) -> bytes:
    if answer.error is not None:
        raise _Failed(f"{what} answered {answer.describe()}: {answer.error.message}")
    return answer.output or b""


async def _execute_ok(c: _Caller) -> str:
    answer = await c.execute(c.execute_request(_saga_id()))
    _expect_ok("Execute", answer)
    return f"answered {answer.describe()}"


async def _duplicate_execute(c: _Caller) -> str:
    request = c.execute_request(_saga_id())
    first = _expect_ok("first Execute", await c.execute(request))
    second = _expect_ok("repeated Execute", await c.execute(request))
    if first != second:
        raise _Failed(f"outputs differ: {_show(first)} then {_show(second)}")
    return f"both OK, same output {_show(first)}"


async def _duplicate_compensate(c: _Caller) -> str:
    execute = c.execute_request(_saga_id())
    output = _expect_ok("Execute", await c.execute(execute))
    request = c.compensate_request(execute, output)
    _expect_ok("first Compensate", await c.compensate(request))
    _expect_ok("repeated Compensate", await c.compensate(request))
    return "both OK"


async def _null_compensation_then_late_execute(c: _Caller) -> list[CheckResult]:
    # Two checks on one saga: the late Execute only means something once the Compensate that
    # came before it answered OK.
    execute = c.execute_request(_saga_id())
    try:
        null = await c.compensate(c.compensate_request(execute, None))
    except Exception as error:
        null = Answer(None, None)
        detail = f"{type(error).__name__}: {error}"
    else:
        detail = "" if null.error is None else f"answered {null.describe()}: {null.error.message}"
    if detail:
        return [
            CheckResult("null-compensation", False, f"Compensate of an unsent Execute {detail}"),
            CheckResult("no-hanging-execute", False, "not run: the null compensation failed"),
        ]
    return [
        CheckResult("null-compensation", True, "Compensate of an unsent Execute answered OK"),
        await _check("no-hanging-execute", lambda: _late_execute(c, execute), c),
    ]


async def _late_execute(c: _Caller, execute: participant_service_pb2.ExecuteRequest) -> str:
    late = await c.execute(execute)
    if late.error is None:
        raise _Failed(
            f"hanging: the Execute sent after its Compensate answered {late.describe()}, "
            "so it applied after its compensation"
        )
    if late.error.code != grpc.StatusCode.FAILED_PRECONDITION:
        raise _Failed(f"the late Execute answered {late.describe()}, not FAILED_PRECONDITION")
    if not late.error.reason:
        raise _Failed("the late Execute answered FAILED_PRECONDITION without an ErrorInfo")
    return f"the late Execute was refused: {late.describe()}"


async def _concurrent_duplicates(c: _Caller, copies: int) -> str:
    request = c.execute_request(_saga_id())
    answers = await asyncio.gather(*(c.execute(request) for _ in range(copies)))
    seen = sorted({a.describe() for a in answers})
    if len(seen) > 1:
        raise _Failed(
            f"{copies} identical Executes gave {len(seen)} different answers, "
            f"e.g. {seen[0]} and {seen[1]}"
        )
    if not answers[0].ok:
        raise _Failed(f"{copies} identical Executes all answered {seen[0]}")
    await c.compensate(c.compensate_request(request, answers[0].output))
    return f"{copies} identical Executes all answered {seen[0]}"


async def _past_deadline(c: _Caller) -> str:
    request = c.execute_request(_saga_id())
    hurried = await c.execute(request, timeout=0.001)
    retried = _expect_ok("the retry after the deadline", await c.execute(request))
    again = _expect_ok("a second retry", await c.execute(request))
    if retried != again:
        raise _Failed(f"retries answered different outputs: {_show(retried)}, {_show(again)}")
    compensate = c.compensate_request(request, retried)
    _expect_ok("the Compensate after the retries", await c.compensate(compensate))
    _expect_ok("the repeated Compensate", await c.compensate(compensate))
    return f"first call {hurried.describe()}; retries OK and identical; compensated"


async def _unknown_action(c: _Caller) -> str:
    name = f"NoSuchAction{uuid.uuid4().hex[:8]}"
    execute = c.execute_request(_saga_id(), action=name)
    compensate = c.compensate_request(execute, None)
    compensate.action = name
    seen = []
    for what, answer in (
        ("Execute", await c.execute(execute)),
        ("Compensate", await c.compensate(compensate)),
    ):
        if answer.error is None:
            raise _Failed(f"{what} of unknown action {name!r} answered OK")
        if answer.error.code in TRANSIENT_CODES:
            raise _Failed(f"{what} of an unknown action answered {answer.describe()}, retried")
        seen.append(f"{what} {answer.describe()}")
    return ", ".join(seen)


async def _check(name: str, run: Callable[[], Awaitable[str]], caller: _Caller) -> CheckResult:
    seen = len(caller.problems)
    try:
        result = CheckResult(name, True, await run())
    except _Failed as failed:
        result = CheckResult(name, False, str(failed))
    except Exception as error:  # a broken participant must not stop the other checks
        result = CheckResult(name, False, f"{type(error).__name__}: {error}")
    if len(caller.problems) == seen:
        return result
    # The answers' mapping outranks the check's own verdict: the coordinator would misread them.
    unique = list(dict.fromkeys(caller.problems[seen:]))
    return CheckResult(name, False, "not as documented: " + "; ".join(unique))


async def run_async(
    target: str,
    action: str,
    compensation: str,
    payload: object = b"{}",
    *,
    credentials: grpc.ChannelCredentials | None = None,
    timeout: float = 10.0,
    concurrency: int = 8,
    previous_outputs: Mapping[str, bytes] | None = None,
) -> list[CheckResult]:
    """Run every check against the participant at `target`; see the module docstring.

    `payload` is the saga input sent with each call: bytes as they are, anything else as JSON.
    `timeout` is each call's deadline; `concurrency` the number of concurrent duplicates;
    `previous_outputs` the earlier steps' outputs each Execute carries (by step name), for a
    participant that reads them.
    """
    body = encode_payload(payload)
    if credentials is None:
        channel = grpc.aio.insecure_channel(target)
    else:
        channel = grpc.aio.secure_channel(target, credentials)
    async with channel:
        stub = participant_service_pb2_grpc.ParticipantServiceStub(channel)
        c = _Caller(stub, action, compensation, body, timeout, previous_outputs or {})
        results = [
            await _check("execute-ok", lambda: _execute_ok(c), c),
            await _check("duplicate-execute", lambda: _duplicate_execute(c), c),
            await _check("duplicate-compensate", lambda: _duplicate_compensate(c), c),
        ]
        results.extend(await _null_compensation_then_late_execute(c))
        results.append(
            await _check("concurrent-duplicates", lambda: _concurrent_duplicates(c, concurrency), c)
        )
        results.append(await _check("past-deadline", lambda: _past_deadline(c), c))
        results.append(await _check("unknown-action", lambda: _unknown_action(c), c))
        return results


def run(
    target: str,
    action: str,
    compensation: str,
    payload: object = b"{}",
    *,
    credentials: grpc.ChannelCredentials | None = None,
    timeout: float = 10.0,
    concurrency: int = 8,
    previous_outputs: Mapping[str, bytes] | None = None,
) -> list[CheckResult]:
    """Blocking form of `run_async`."""
    return asyncio.run(
        run_async(
            target,
            action,
            compensation,
            payload,
            credentials=credentials,
            timeout=timeout,
            concurrency=concurrency,
            previous_outputs=previous_outputs,
        )
    )


def print_results(results: Sequence[CheckResult], *, plain: bool = False) -> None:
    """Print one row per check: with `rich` when it is installed (and not `plain`), else as
    plain text; then a summary line naming the failed checks."""
    try:
        if plain:
            raise ImportError("plain text asked for")
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text
    except ImportError:
        for result in results:
            verdict = "PASS" if result.passed else "FAIL"
            print(f"{verdict}  {result.name:<22} {result.detail}")
    else:
        table = Table("check", "result", "what was seen", title="participant conformance")
        for result in results:
            mark = Text("PASS", "green") if result.passed else Text("FAIL", "bold red")
            # Text, not markup: details quote reasons in brackets, e.g. [NO_FUNDS].
            table.add_row(result.name, mark, Text(result.detail))
        Console().print(table)
    failed = [r.name for r in results if not r.passed]
    print(
        f"{len(results) - len(failed)} passed, {len(failed)} failed"
        + (f": {', '.join(failed)}" if failed else "")
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run the checks, print them, return 0 when all pass and 1 otherwise."""
    parser = argparse.ArgumentParser(
        prog="saga conformance", description="Check a participant against the saga contract."
    )
    parser.add_argument("--target", required=True, help="participant address, HOST:PORT")
    parser.add_argument("--action", required=True, help="an Execute action it implements")
    parser.add_argument("--compensation", required=True, help="that action's compensation")
    parser.add_argument("--payload", default="{}", help="saga input, as JSON (default {})")
    parser.add_argument("--timeout", type=float, default=10.0, help="deadline of each call, s")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent duplicates")
    parser.add_argument("--tls", action="store_true", help="use TLS with the system's roots")
    parser.add_argument(
        "--previous",
        action="append",
        default=[],
        metavar="STEP=JSON",
        help="an earlier step's output sent with each Execute (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        json.loads(args.payload)
    except json.JSONDecodeError as error:
        parser.error(f"--payload is not JSON: {error}")
    previous: dict[str, bytes] = {}
    for entry in args.previous:
        step, sep, value = entry.partition("=")
        if not sep or not step:
            parser.error(f"--previous {entry!r}: expected STEP=JSON")
        try:
            json.loads(value)
        except json.JSONDecodeError as error:
            parser.error(f"--previous {entry!r}: the output is not JSON: {error}")
        previous[step] = value.encode("utf-8")
    results = run(
        args.target,
        args.action,
        args.compensation,
        args.payload.encode("utf-8"),
        credentials=grpc.ssl_channel_credentials() if args.tls else None,
        timeout=args.timeout,
        concurrency=args.concurrency,
        previous_outputs=previous,
    )
    print_results(results)
    return 0 if all(r.passed for r in results) else 1
