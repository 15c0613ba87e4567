"""The handler test kit: calls a participant's handlers as the coordinator would, without one.

    from saga_sdk.testing import HandlerKit

    def test_open_account_is_safe_to_repeat(tmp_path):
        participant = build_participant(tmp_path / "accounts.db")   # your Participant
        with HandlerKit(participant) as kit:
            kit.assert_safe("OpenAccount", "CloseAccount", {"owner": "ACME"},
                            state=lambda saga_id: rows_of(saga_id))

The kit goes through the same code as a gRPC call (decoding, the barrier, the mapping of
exceptions to status codes), minus the network. Its single calls return a `Call` (the answer's
code, output, reason and retry delay):

- `execute(action, input)` a fresh Execute; `retry(call)` the same request again (same
  request_id, next attempt number), as after a timeout;
- `compensate(call, compensation)` the Compensate of an Execute; `retry` repeats it too;
- `compensate_first(action, compensation, input)` a Compensate whose Execute was never
  delivered (a null compensation), then `late_execute(that)` sends the Execute afterwards;
- `concurrently(call, copies)` the same request `copies` times at once.

`check(...)` runs all of these and says, per scenario, whether the answers are those of the
contract and whether the effects were applied once: it counts the handler's calls (with a
barrier, a duplicate never reaches the handler) and, when given `state(saga_id)` (the business
data of one saga, e.g. its rows), checks that duplicates leave it as the first call did.
`assert_safe(...)` raises `AssertionError` naming every scenario that failed. Usable from any
test runner; from pytest, plain or asyncio tests alike (the kit runs its own event loop).
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType
from typing import Any, TypeVar

import grpc
from google.rpc import status_pb2
from saga.v1 import participant_service_pb2 as pb

from saga_sdk.errors import STATUS_DETAILS_KEY, ExecuteAfterCompensate, error_from_status
from saga_sdk.participant import CompensateContext, ExecuteContext, Participant
from saga_sdk.requests import encode_payload

_T = TypeVar("_T")

DEFINITION = "handler-kit"


@dataclass(frozen=True)
class Call:
    """One call the kit sent, and the participant's answer."""

    request: pb.ExecuteRequest | pb.CompensateRequest
    code: grpc.StatusCode
    """OK, or the status code answered."""
    output: bytes = b""
    """The output on OK (b"" for a Compensate)."""
    message: str = ""
    reason: str = ""
    """The ErrorInfo reason of a non-OK answer."""
    retry_after: timedelta | None = None
    """The RetryInfo delay of a non-OK answer, when there was one."""

    @property
    def ok(self) -> bool:
        return self.code is grpc.StatusCode.OK

    @property
    def saga_id(self) -> str:
        return self.request.saga.removeprefix("sagas/")

    def json(self) -> Any:
        """The output decoded from JSON (None when empty)."""
        return json.loads(self.output) if self.output else None

    def describe(self) -> str:
        if self.ok:
            return f"OK {self.output[:40]!r}"
        return f"{self.code.name} [{self.reason}] {self.message}"


@dataclass(frozen=True)
class Finding:
    """The verdict of one scenario of `HandlerKit.check`."""

    name: str
    passed: bool
    detail: str


@dataclass
class _Scenario:
    problems: list[str] = field(default_factory=list)

    def expect(self, condition: bool, problem: str) -> None:
        if not condition:
            self.problems.append(problem)


class HandlerKit:
    """Sends Execute and Compensate calls straight to a `Participant`'s handlers."""

    def __init__(self, participant: Participant, *, timeout: float = 30.0) -> None:
        self.participant = participant
        self._timeout = timeout
        self._calls: Counter[tuple[str, str]] = Counter()
        self._calls_lock = threading.Lock()
        self._late: dict[str, pb.ExecuteRequest] = {}
        self._stop_observing = participant.observe_handler_calls(self._count)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="handler-kit", daemon=True
        )
        self._thread.start()

    # --- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the kit's event loop and stop counting the participant's handler calls."""
        if self._loop.is_closed():
            return
        self._stop_observing()
        barrier = self.participant.barrier
        if barrier is not None:
            # Resources that run_async opened belong to the kit's loop: release them there.
            self._run(barrier.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(self._timeout)
        self._loop.close()

    def __enter__(self) -> HandlerKit:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # --- single calls -------------------------------------------------------------------------

    def execute(
        self,
        action: str,
        input: object = None,
        *,
        saga_id: str = "",
        step: str = "step",
        request_id: str = "",
        previous_outputs: Mapping[str, object] | None = None,
    ) -> Call:
        """A fresh Execute of `action` (attempt 1): new saga and request ids unless given.
        `input` and the previous outputs are sent as JSON, or as they are when bytes."""
        request = _execute_request(action, input, saga_id, step, request_id, previous_outputs)
        return self._send(request)

    def retry(self, call: Call) -> Call:
        """The same request again, with the same request_id and the next attempt number."""
        request = type(call.request).FromString(call.request.SerializeToString())
        request.attempt += 1
        return self._send(request)

    def compensate(self, call: Call, compensation: str) -> Call:
        """The Compensate of the Execute `call`, carrying its output when it answered OK."""
        request = self._compensate_request(call.request, compensation)
        if isinstance(call.request, pb.ExecuteRequest) and call.ok:
            request.execute_output = call.output
        return self._send(request)

    def compensate_first(
        self, action: str, compensation: str, input: object = None, *, saga_id: str = ""
    ) -> Call:
        """A Compensate for an Execute of `action` that was never delivered (a null
        compensation). `late_execute` then sends that Execute."""
        execute = _execute_request(action, input, saga_id)
        call = self._send(self._compensate_request(execute, compensation))
        self._late[call.request.request_id] = execute
        return call

    def late_execute(self, compensated: Call) -> Call:
        """The Execute whose Compensate `compensate_first` sent, arriving after it."""
        execute = self._late.get(compensated.request.request_id)
        if execute is None:
            raise ValueError("late_execute takes a Call returned by compensate_first")
        return self._send(execute)

    def concurrently(self, call: Call, copies: int = 8) -> list[Call]:
        """The request of `call` sent `copies` times at once (duplicates racing)."""
        if copies < 2:
            raise ValueError(f"concurrent duplicates need at least 2 copies, not {copies}")

        async def race() -> list[Call]:
            return list(await asyncio.gather(*(self._answer(call.request) for _ in range(copies))))

        return self._run(race())

    def handler_calls(self, call: Call) -> int:
        """How many times a handler ran for the request_id of `call` (replays do not count)."""
        with self._calls_lock:
            return self._calls[(call.request.action, call.request.request_id)]

    # --- the scenarios ------------------------------------------------------------------------

    def check(
        self,
        action: str,
        compensation: str,
        input: object = None,
        *,
        state: Callable[[str], object] | None = None,
        copies: int = 8,
    ) -> list[Finding]:
        """Run every scenario once (each on sagas of its own); see the module docstring.

        `state(saga_id)` returns the business data of one saga, comparable with ==. The
        handler-call counts are checked only when the participant has a barrier (without one,
        a handler that dedupes by itself is called again by design).
        """
        counted = self.participant.barrier is not None
        return [
            self._scenario("retries-apply-once", lambda s: self._retries(s, action, input, state)),
            self._scenario(
                "compensation-applies-once",
                lambda s: self._compensation(s, action, compensation, input, state, counted),
            ),
            self._scenario(
                "compensation-before-execution",
                lambda s: self._null_compensation(s, action, compensation, input, state, counted),
            ),
            self._scenario(
                "concurrent-duplicates",
                lambda s: self._concurrent(s, action, input, state, copies, counted),
            ),
        ]

    def assert_safe(
        self,
        action: str,
        compensation: str,
        input: object = None,
        *,
        state: Callable[[str], object] | None = None,
        copies: int = 8,
    ) -> None:
        """`check`, raising `AssertionError` that names every failed scenario and why."""
        failed = [
            f"{f.name}: {f.detail}"
            for f in self.check(action, compensation, input, state=state, copies=copies)
            if not f.passed
        ]
        if failed:
            raise AssertionError("the handlers are not safe to retry:\n  " + "\n  ".join(failed))

    def _retries(
        self, s: _Scenario, action: str, input: object, state: Callable[[str], object] | None
    ) -> str:
        saga_id = _new_id("saga")
        before = None if state is None else state(saga_id)
        first = self.execute(action, input, saga_id=saga_id)
        s.expect(first.ok, f"the first Execute answered {first.describe()}")
        if not first.ok:
            return ""
        after_first = None if state is None else state(first.saga_id)
        retries = [self.retry(first), self.retry(first)]
        for retry in retries:
            s.expect(retry.ok, f"a retry answered {retry.describe()}")
            s.expect(
                retry.output == first.output,
                f"a retry answered {retry.output!r}, the first call {first.output!r}",
            )
        if self.participant.barrier is not None:
            s.expect(
                self.handler_calls(first) == 1,
                f"the handler ran {self.handler_calls(first)} times for one request_id",
            )
        if state is not None:
            s.expect(
                after_first != before,
                "the saga's state did not change with the first Execute: `state` does not "
                "show this action's effect",
            )
            s.expect(
                state(first.saga_id) == after_first,
                "the retries changed the saga's state again",
            )
        return "the first Execute and two retries answered OK, identically"

    def _compensation(
        self,
        s: _Scenario,
        action: str,
        compensation: str,
        input: object,
        state: Callable[[str], object] | None,
        counted: bool,
    ) -> str:
        execute = self.execute(action, input)
        s.expect(execute.ok, f"the Execute answered {execute.describe()}")
        if not execute.ok:
            return ""
        undo = self.compensate(execute, compensation)
        s.expect(undo.ok, f"the Compensate answered {undo.describe()}")
        after_undo = None if state is None else state(execute.saga_id)
        again = self.retry(undo)
        s.expect(again.ok, f"the repeated Compensate answered {again.describe()}")
        if counted:
            s.expect(
                self.handler_calls(undo) == 1,
                f"the compensation handler ran {self.handler_calls(undo)} times",
            )
        if state is not None:
            s.expect(
                state(execute.saga_id) == after_undo,
                "the repeated Compensate changed the saga's state again",
            )
        return "the Compensate and its repetition answered OK"

    def _null_compensation(
        self,
        s: _Scenario,
        action: str,
        compensation: str,
        input: object,
        state: Callable[[str], object] | None,
        counted: bool,
    ) -> str:
        saga_id = _new_id("saga")
        before = None if state is None else state(saga_id)
        null = self.compensate_first(action, compensation, input, saga_id=saga_id)
        s.expect(null.ok, f"the Compensate of an undelivered Execute answered {null.describe()}")
        late = self.late_execute(null)
        s.expect(
            late.code is grpc.StatusCode.FAILED_PRECONDITION,
            f"the Execute arriving after its Compensate answered {late.describe()}, not "
            "FAILED_PRECONDITION: it applied after its compensation (hanging)",
        )
        if counted:
            s.expect(
                self.handler_calls(null) == 0,
                "the compensation handler ran for an Execute that never took effect",
            )
            s.expect(self.handler_calls(late) == 0, "the handler ran for the late Execute")
            s.expect(
                late.reason == ExecuteAfterCompensate.REASON,
                f"the late Execute's reason is {late.reason!r}",
            )
        if state is not None:
            s.expect(
                state(null.saga_id) == before,
                "the null compensation or the late Execute changed the saga's state",
            )
        return f"null compensation OK; late Execute refused ({late.reason})"

    def _concurrent(
        self,
        s: _Scenario,
        action: str,
        input: object,
        state: Callable[[str], object] | None,
        copies: int,
        counted: bool,
    ) -> str:
        request = _execute_request(action, input)
        template = Call(request, grpc.StatusCode.UNKNOWN)
        answers = self.concurrently(template, copies)
        seen = sorted({a.describe() for a in answers})
        s.expect(len(seen) == 1, f"{copies} identical Executes answered differently: {seen}")
        s.expect(all(a.ok for a in answers), f"identical Executes answered {seen}")
        if counted:
            s.expect(
                self.handler_calls(template) == 1,
                f"the handler ran {self.handler_calls(template)} times for {copies} duplicates",
            )
        if state is not None and all(a.ok for a in answers):
            settled = state(template.saga_id)
            self.retry(answers[0])
            s.expect(state(template.saga_id) == settled, "a retry after the race changed the state")
        return f"{copies} identical Executes all answered {seen[0] if seen else 'nothing'}"

    def _scenario(self, name: str, run: Callable[[_Scenario], str]) -> Finding:
        scenario = _Scenario()
        try:
            detail = run(scenario)
        except Exception as error:  # a broken handler must not hide the other scenarios
            return Finding(name, False, f"{type(error).__name__}: {error}")
        if scenario.problems:
            return Finding(name, False, "; ".join(scenario.problems))
        return Finding(name, True, detail)

    # --- plumbing -----------------------------------------------------------------------------

    def _count(self, context: ExecuteContext | CompensateContext) -> None:
        with self._calls_lock:
            self._calls[(context.action, context.request_id)] += 1

    def _compensate_request(
        self, execute: pb.ExecuteRequest | pb.CompensateRequest, compensation: str
    ) -> pb.CompensateRequest:
        if not isinstance(execute, pb.ExecuteRequest):
            raise TypeError("compensate takes the Call of an Execute")
        return pb.CompensateRequest(
            saga=execute.saga,
            definition=execute.definition,
            definition_version=execute.definition_version,
            step=execute.step,
            action=compensation,
            request_id=_new_id("compensate"),
            attempt=1,
            input=execute.input,
            execute_request_id=execute.request_id,
        )

    def _send(self, request: pb.ExecuteRequest | pb.CompensateRequest) -> Call:
        return self._run(self._answer(request))

    async def _answer(self, request: pb.ExecuteRequest | pb.CompensateRequest) -> Call:
        metadata: Mapping[str, str] = {}
        if isinstance(request, pb.ExecuteRequest):
            answer = await self.participant.execute(request, metadata)
        else:
            answer = await self.participant.compensate(request, metadata)
        if isinstance(answer, bytes):
            return Call(request, grpc.StatusCode.OK, answer)
        status: status_pb2.Status | None = None
        for key, value in answer.trailing_metadata or ():
            if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
                status = status_pb2.Status.FromString(value)
        error = error_from_status(answer.code, answer.details or "", status)
        return Call(request, answer.code, b"", error.message, error.reason, error.retry_after)

    def _run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        if self._loop.is_closed():
            coroutine.close()
            raise RuntimeError("the kit is closed")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(self._timeout)


def _execute_request(
    action: str,
    input: object,
    saga_id: str = "",
    step: str = "step",
    request_id: str = "",
    previous_outputs: Mapping[str, object] | None = None,
) -> pb.ExecuteRequest:
    """A first Execute of `action`, as the coordinator sends it: new saga and request ids
    unless given; `input` and the previous outputs as JSON, or as they are when bytes."""
    return pb.ExecuteRequest(
        saga=f"sagas/{saga_id or _new_id('saga')}",
        definition=DEFINITION,
        definition_version=1,
        step=step,
        action=action,
        request_id=request_id or _new_id("execute"),
        attempt=1,
        input=_payload(input),
        previous_outputs={
            name: _payload(value) for name, value in (previous_outputs or {}).items()
        },
    )


def _new_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:12]}"


def _payload(value: object) -> bytes:
    return value if isinstance(value, bytes) else b"" if value is None else encode_payload(value)


__all__: Sequence[str] = ("Call", "Finding", "HandlerKit")
