"""Without OpenTelemetry installed, a participant still serves and a client still builds calls.

The participant runs in a child process where every import of `opentelemetry` fails, as on a
machine where the `otel` extra was not installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
from saga.v1 import participant_service_pb2 as pb
from saga.v1 import participant_service_pb2_grpc as pb_grpc

CHILD = textwrap.dedent(
    """
    import importlib.abc
    import sys


    class NoOpenTelemetry(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "opentelemetry" or name.startswith("opentelemetry."):
                raise ImportError(f"No module named {name!r} (blocked)")
            return None


    sys.meta_path.insert(0, NoOpenTelemetry())

    import asyncio
    import json
    import signal

    from saga_sdk import telemetry
    from saga_sdk.participant import ExecuteContext, Participant
    from saga_sdk.requests import trace_headers
    from saga_sdk.sqlite_barrier import SqliteBarrier

    try:
        import opentelemetry  # noqa: F401
    except ImportError:
        blocked = True
    else:
        blocked = False

    participant = Participant("accounts", barrier=SqliteBarrier(sys.argv[1]))


    @participant.action("OpenAccount")
    def open_account(ctx: ExecuteContext) -> dict[str, str]:
        ctx.tx.execute("CREATE TABLE IF NOT EXISTS accounts (id TEXT)")
        ctx.tx.execute("INSERT INTO accounts VALUES (?)", (ctx.saga_id,))
        return {"account": ctx.saga_id}


    @participant.compensation("CloseAccount")
    def close_account(ctx) -> None:
        ctx.tx.execute("DELETE FROM accounts WHERE id = ?", (ctx.saga_id,))


    async def main() -> None:
        port = await participant.start("127.0.0.1:0")
        loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
        print(json.dumps({"port": port, "blocked": blocked, "available": telemetry.AVAILABLE,
                          "headers": list(trace_headers()), "loaded": loaded}), flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await participant.stop(1)


    asyncio.run(main())
    """
)


def test_a_participant_without_opentelemetry_serves_calls(tmp_path: Path) -> None:
    database = tmp_path / "accounts.db"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(database)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line, child.stderr.read() if child.stderr else ""
        started = json.loads(line)
        execute = pb.ExecuteRequest(
            saga="sagas/acme",
            definition="onboard",
            definition_version=1,
            step="open-account",
            action="OpenAccount",
            request_id="r-1",
            attempt=1,
            input=b"{}",
        )
        traceparent = (("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),)
        with grpc.insecure_channel(f"127.0.0.1:{started['port']}") as channel:
            stub = pb_grpc.ParticipantServiceStub(channel)
            first = stub.Execute(execute, timeout=10, metadata=traceparent)
            again = stub.Execute(execute, timeout=10)
            stub.Compensate(
                pb.CompensateRequest(
                    saga="sagas/acme",
                    definition="onboard",
                    definition_version=1,
                    step="open-account",
                    action="CloseAccount",
                    request_id="r-2",
                    attempt=1,
                    execute_request_id="r-1",
                ),
                timeout=10,
            )
        child.terminate()
        assert child.wait(10) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()

    assert started["blocked"] is True
    assert started["available"] is False
    assert started["headers"] == []
    assert started["loaded"] == []
    assert json.loads(first.output) == {"account": "acme"}
    assert again.output == first.output
