"""Child processes the torture harness starts, SIGKILLs and restarts, and their health checks."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc


class ManagedProcess:
    """One child process at a time under a name, its output appended to a log file.

    Only this object's own child is ever signalled, by its pid."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log: Path,
        *,
        cwd: Path | None = None,
        program: Sequence[str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.program = list(program or [sys.executable])
        """What runs ``argv``: this Python, or e.g. strace and this Python."""
        self.log = log
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None
        self.spawned_at = 0.0
        self.starts = 0

    @property
    def pid(self) -> int | None:
        """The running child's pid."""
        return None if self.process is None else self.process.pid

    @property
    def returncode(self) -> int | None:
        """How the last child exited (None: it runs, or none was started)."""
        return None if self.process is None else self.process.poll()

    @property
    def alive(self) -> bool:
        """Whether the child runs (it may have died on its own)."""
        return self.process is not None and self.process.poll() is None

    def spawn(self, env: Mapping[str, str] | None = None) -> None:
        """Start the child; the previous one must be dead."""
        if self.alive:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.starts += 1
        with self.log.open("ab") as log:
            log.write(f"--- start {self.starts} env={dict(env or {})}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                [*self.program, *self.argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.cwd,
                env={**os.environ, **(env or {})},
            )
        self.spawned_at = time.monotonic()

    def kill(self) -> int | None:
        """SIGKILL the child (this pid only) and reap it; its exit code, None if not started."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        return self.process.wait(10)

    def pause(self) -> None:
        """SIGSTOP the child (this pid only): it stops in its tracks, its sockets stay open."""
        if self.alive:
            assert self.process is not None
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT the child after ``pause`` (harmless when it was not paused)."""
        if self.alive:
            assert self.process is not None
            self.process.send_signal(signal.SIGCONT)

    async def wait_exit(self, timeout: float) -> int | None:
        """The exit code, or None if the child still runs after ``timeout`` seconds."""
        if self.process is None:
            return None
        deadline = time.monotonic() + timeout
        while (code := self.process.poll()) is None:
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(0.01)
        return code

    async def terminate(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait for the exit code; SIGKILL after ``timeout`` seconds."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        code = await self.wait_exit(timeout)
        if code is None:
            self.kill()
        return code


def dial(
    target: str,
    credentials: grpc.ChannelCredentials | None,
    options: Sequence[tuple[str, Any]] | None = None,
) -> grpc.aio.Channel:
    """An asyncio channel to ``target``: over TLS with ``credentials``, else in plaintext."""
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, credentials, options=options)


async def health_serving(
    target: str, timeout: float = 0.5, credentials: grpc.ChannelCredentials | None = None
) -> bool:
    """Whether the gRPC server at ``target`` answers its health check SERVING (over TLS with
    ``credentials``)."""
    async with dial(target, credentials) as channel:
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        except grpc.aio.AioRpcError:
            return False
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


async def wait_serving(
    process: ManagedProcess,
    target: str,
    timeout: float,
    credentials: grpc.ChannelCredentials | None = None,
) -> bool:
    """Wait until ``process`` serves at ``target``: True, or False when it died or timed out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.alive:
            return False
        if await health_serving(target, timeout=0.25, credentials=credentials):
            return process.alive
        await asyncio.sleep(0.02)
    return False
