"""The bench's long-lived child processes: the participants and each ``saga serve``.

Each is started, awaited until it serves, and stopped by its own pid; none outlives the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import yaml

from coordinator.bench.measure import (
    TRANSACTIONS,
    WRITES,
    Strace,
    children,
    command_line,
    count_syncs,
    cpu_seconds,
    scrape,
)
from coordinator.bench.shape import VARIANTS, definition


class BenchError(Exception):
    """A process of the bench did not do its part; the message says which and where its log is."""


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class LineReader:
    """Lines from a child's stdout, each awaited with a deadline."""

    def __init__(self, stream: IO[bytes] | None, what: str, log: Path) -> None:
        assert stream is not None
        self._fd = stream.fileno()
        self._buffer = b""
        self._what = what
        self._log = log

    def line(self, timeout: float) -> str:
        """The next line; BenchError when none comes in time or the stream ends."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"{self._what} said nothing for {timeout:.0f}s (see {self._log})")
            readable, _, _ = select.select([self._fd], [], [], remaining)
            if readable:
                chunk = os.read(self._fd, 65536)
                if not chunk:
                    raise BenchError(f"{self._what} ended early (see {self._log})")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode().strip()


def stop_process(process: subprocess.Popen[bytes], pid: int, timeout: float = 30) -> None:
    """SIGTERM ``pid`` (``process``, or strace's tracee), wait for ``process``; kill if stuck."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if pid != process.pid and sig == signal.SIGKILL:
            process.kill()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            continue


class Participants:
    """The four no-op participants' process, for the whole run."""

    def __init__(self, workdir: Path) -> None:
        self.log = workdir / "participants.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "coordinator.bench.participants"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
            )
        self._reader = LineReader(self.process.stdout, "the participants", self.log)
        self.addresses: dict[str, str] = json.loads(self._reader.line(60))

    @property
    def pid(self) -> int:
        """The participants' pid."""
        return self.process.pid

    def counts(self) -> dict[str, dict[str, int]]:
        """The calls counted so far, by case key."""
        assert self.process.stdin is not None
        self.process.stdin.write(b"counts\n")
        self.process.stdin.flush()
        counts: dict[str, dict[str, int]] = json.loads(self._reader.line(60))
        return counts

    def stop(self) -> None:
        """SIGTERM the participants and wait for them."""
        stop_process(self.process, self.process.pid)


class Coordinator:
    """A fresh ``saga serve``, under strace when it can count fsyncs.

    Its store is a fresh SQLite file in ``workdir`` unless ``settings`` names a ``database``
    (the replicas of one case share one PostgreSQL database, each with its own ``workdir``).
    """

    def __init__(
        self,
        workdir: Path,
        addresses: Mapping[str, str],
        settings: Mapping[str, object],
        strace: Strace | None,
    ) -> None:
        self.name = str(settings.get("replica") or "coordinator")
        (workdir / "definitions").mkdir(parents=True)
        for variant in VARIANTS:
            spec = definition(variant)
            (workdir / "definitions" / f"{spec['name']}.yaml").write_text(yaml.safe_dump(spec))
        self.target = f"127.0.0.1:{free_port()}"
        metrics_port = free_port()
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        config = workdir / "saga.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "database": f"sqlite:///{workdir / 'saga.db'}",
                    "listen": self.target,
                    "definitions": "definitions",
                    "participants": dict(addresses),
                    "log_level": "ERROR",
                    "shutdown_grace": 2.0,
                    "metrics_listen": f"127.0.0.1:{metrics_port}",
                    **settings,
                }
            )
        )
        command = [sys.executable, "-m", "coordinator.cli", "serve", "--config", str(config)]
        self.trace = workdir / "fsyncs.strace" if strace is not None else None
        self.log = workdir / "coordinator.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                strace.wrap(command, self.trace) if strace and self.trace else command,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.pid = self.process.pid
        try:
            if strace is not None:
                self.pid = self._tracee(command)
            self._wait_serving()
        except BaseException:
            self.stop()
            raise

    def _tracee(self, command: list[str]) -> int:
        # strace may fork short-lived children of its own (to probe seccomp, for one): the
        # coordinator is the child that runs the command.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for child in children(self.process.pid):
                if command_line(child) == command:
                    return child
            if self.process.poll() is not None:
                break
            time.sleep(0.01)
        raise BenchError(f"the coordinator did not start under strace (see {self.log})")

    def _wait_serving(self) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + 60
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise BenchError(f"the coordinator exited at start (see {self.log})")
                try:
                    answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.05)
        raise BenchError(f"the coordinator was not SERVING within 60s (see {self.log})")

    def store_counts(self) -> dict[str, float]:
        """The store's commits and writes so far, scraped from the coordinator's /metrics."""
        try:
            return scrape(self.metrics_url)
        except OSError as error:
            raise BenchError(f"cannot read {self.metrics_url}: {error} (see {self.log})") from None

    def trace_size(self) -> int | None:
        """Bytes strace has written so far (None without strace)."""
        return None if self.trace is None else self.trace.stat().st_size

    def syncs_between(self, start: int | None, end: int | None) -> int | None:
        """fsync and fdatasync calls strace wrote between two sizes of its output."""
        if self.trace is None or start is None or end is None:
            return None
        with self.trace.open("rb") as trace:
            trace.seek(start)
            return count_syncs(trace.read(end - start))

    def stop(self) -> None:
        """SIGTERM the coordinator (strace then ends with it) and wait."""
        stop_process(self.process, self.pid, timeout=60)


class Coordinators:
    """The coordinator processes of one case: one on SQLite, or the replicas on one database.

    Readings of the group are sums over its processes: a saga's cost is what every replica
    spent on it, whichever replica ran it.
    """

    def __init__(self, members: Sequence[Coordinator]) -> None:
        self.members = tuple(members)

    @property
    def targets(self) -> list[str]:
        """Each member's gRPC address, in order."""
        return [member.target for member in self.members]

    def cpu_each(self) -> list[float]:
        """The CPU seconds each member has used so far, in order."""
        return [cpu_seconds(member.pid) for member in self.members]

    def store_counts(self) -> dict[str, float]:
        """Commits and writes so far, summed over the members that count them."""
        totals: dict[str, float] = {}
        for member in self.members:
            for name, value in member.store_counts().items():
                if name in (TRANSACTIONS, WRITES):
                    totals[name] = totals.get(name, 0.0) + value
        return totals

    def trace_sizes(self) -> list[int | None]:
        """strace's output size of each member."""
        return [member.trace_size() for member in self.members]

    def syncs_between(self, start: list[int | None], end: list[int | None]) -> int | None:
        """fsyncs of every member between two lists of sizes; None when not counted."""
        total = 0
        for member, before, after in zip(self.members, start, end, strict=True):
            syncs = member.syncs_between(before, after)
            if syncs is None:
                return None
            total += syncs
        return total

    def stop(self) -> None:
        """SIGTERM every member at once, then wait for each."""
        for member in self.members:
            if member.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(member.pid, signal.SIGTERM)
        for member in self.members:
            member.stop()
