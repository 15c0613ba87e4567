"""Real coordinator processes for tests: started with ``saga serve``, killed with SIGKILL."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.participants import ScriptedParticipant


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class CoordinatorProcess:
    """``saga serve`` in a child process, on a fixed port so that it can be restarted."""

    config: Path
    port: int
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @classmethod
    def configure(
        cls,
        config: Path,
        database: Path,
        participants: Mapping[str, ScriptedParticipant | str],
        **extra: object,
    ) -> CoordinatorProcess:
        """Write a configuration file next to ``definitions/`` and return the process."""
        port = free_port()
        config.write_text(
            yaml.safe_dump(
                {
                    "database": f"sqlite:///{database}",
                    "listen": f"127.0.0.1:{port}",
                    "definitions": "definitions",
                    "shutdown_grace": 2.0,
                    "participants": {
                        name: p if isinstance(p, str) else p.address
                        for name, p in participants.items()
                    },
                    **extra,
                }
            )
        )
        return cls(config, port, config.with_suffix(".log"))

    @property
    def target(self) -> str:
        """Where clients reach it."""
        return f"127.0.0.1:{self.port}"

    async def start(self, timeout: float = 20.0) -> None:
        """Start it and wait until its health check answers SERVING."""
        assert self.process is None or self.process.poll() is not None
        self.starts += 1
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "coordinator.cli", "serve", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
            )
        async with asyncio.timeout(timeout):
            while not await self._serving():
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"coordinator exited with {self.process.returncode}:\n"
                        + self.log.read_text()[-4000:]
                    )
                await asyncio.sleep(0.05)

    async def _serving(self) -> bool:
        async with grpc.aio.insecure_channel(self.target) as channel:
            try:
                response = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=0.5
                )
            except grpc.aio.AioRpcError:
                return False
            return bool(response.status == health_pb2.HealthCheckResponse.SERVING)

    def kill(self) -> None:
        """SIGKILL: no chance to flush or say goodbye."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    async def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then wait for the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.process.wait, timeout)


def start_console(target: str, log: Path, *options: str) -> tuple[subprocess.Popen[bytes], str]:
    """`saga console` against the coordinator at ``target`` on a free loopback port, its output
    in ``log``, once it answers: the process and its base URL. RuntimeError (with the end of
    its log) if it exits or does not answer within 30 s."""
    port = free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                *("-m", "coordinator.cli", "console"),
                *("--coordinator", target, "--listen", f"127.0.0.1:{port}"),
                *options,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"saga console exited: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/definitions", timeout=2) as answer:
                if answer.status == 200:
                    return process, url
        except OSError:
            pass
        if time.monotonic() > deadline:
            process.terminate()
            process.wait(10)
            raise RuntimeError(f"saga console did not start: {log.read_text()[-3000:]}")
        time.sleep(0.05)


@contextlib.contextmanager
def running_console(target: str, log: Path, *options: str) -> Iterator[str]:
    """`saga console` (``start_console``) while the block runs: its base URL. When the block
    ends normally, the console must have logged no traceback and no error; it is stopped in
    any case."""
    process, url = start_console(target, log, *options)
    try:
        yield url
        text = log.read_text()
        assert "Traceback" not in text, text[-3000:]
        assert "ERROR" not in text, text[-3000:]
    finally:
        process.terminate()
        process.wait(10)


def wait_serving(address: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Wait (30 s at most) until the gRPC health service at ``address`` answers; fail with the
    end of ``log`` if ``process`` exits first or it never answers."""
    deadline = time.monotonic() + 30
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            assert process.poll() is None, f"the service exited:\n{log.read_text()[-3000:]}"
            try:
                stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                return
            except grpc.RpcError:
                assert time.monotonic() < deadline, f"{address} did not start:\n{log.read_text()}"
                time.sleep(0.05)
