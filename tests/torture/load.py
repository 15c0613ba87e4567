"""Load and backpressure: thousands of sagas in flight at once against slow participants.

A real coordinator process and real participant processes (``tests.torture.participant``,
well-behaved, each call slowed down) on loopback; every saga is submitted at once, then the run
waits until all have ended. Sampled from ``/proc`` meanwhile: the coordinator's resident memory
(VmRSS, and the kernel's high-water mark VmHWM) and its open file descriptors. Each participant
records the most calls it ever had in flight at once, to compare with the coordinator's
``max_calls_per_participant``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import yaml
from saga.v1 import coordinator_service_pb2 as cpb
from saga.v1 import coordinator_service_pb2_grpc as cpb_grpc

from tests.support.processes import free_port
from tests.torture.checker import read_only
from tests.torture.harness import CLIENT_OPTIONS, RETRIED_CODES, ROOT
from tests.torture.processes import ManagedProcess, wait_serving

PARTICIPANTS = ("l0", "l1", "l2", "l3")
DEFINITION = {
    "name": "load",
    "version": 1,
    "retry": {"max_attempts": 5, "initial_backoff": "100ms", "max_backoff": "2s"},
    "compensation_retry": {"max_attempts": 100, "initial_backoff": "100ms", "max_backoff": "2s"},
    "steps": [
        {
            "name": f"step-{name}",
            "participant": name,
            "action": "Do",
            "compensation": "Undo",
            "timeout": "600s",
        }
        for name in PARTICIPANTS
    ],
}


@dataclass(frozen=True)
class LoadSettings:
    """One load run."""

    sagas: int
    workdir: Path
    delay_ms: tuple[int, int] = (500, 1500)
    """Every participant call waits this long (milliseconds, low to high) before it is served."""
    max_calls_per_participant: int = 64
    submitters: int = 128
    """CreateSaga calls in flight at once while submitting."""
    timeout: float = 1800.0
    """Seconds every saga has to end."""
    all_at_once: bool = True
    """Participants hold their calls until every saga is submitted: all are in flight together."""
    progress: Any = None


@dataclass
class LoadReport:
    """What a load run measured."""

    sagas: int
    max_calls_per_participant: int
    submit_seconds: float = 0.0
    total_seconds: float = 0.0
    peak_in_flight_sagas: int = 0
    states: dict[str, int] = field(default_factory=dict)
    peak_rss_mb: float = 0.0
    vm_hwm_mb: float = 0.0
    final_rss_mb: float = 0.0
    peak_fds: int = 0
    final_fds: int = 0
    participant_peak_calls: dict[str, int] = field(default_factory=dict)
    create_retries: int = 0
    coordinator_exit_code: int | None = None

    @property
    def ended(self) -> int:
        """Sagas that reached an ending."""
        return sum(n for s, n in self.states.items() if s not in ("RUNNING", "COMPENSATING"))

    @property
    def problems(self) -> list[str]:
        """What went wrong; empty when the run kept its promises."""
        found = []
        if self.states.get("SUCCEEDED", 0) != self.sagas:
            found.append(f"not every saga succeeded: {self.states}")
        over = {
            name: peak
            for name, peak in self.participant_peak_calls.items()
            if peak > self.max_calls_per_participant
        }
        if over:
            found.append(f"more than {self.max_calls_per_participant} calls in flight: {over}")
        if self.coordinator_exit_code not in (0, None):
            found.append(f"the coordinator exited with {self.coordinator_exit_code} on SIGTERM")
        return found

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return {
            **vars(self),
            "sagas_per_second": round(self.sagas / self.total_seconds, 1)
            if self.total_seconds
            else None,
            "problems": self.problems,
        }


def _proc_status(pid: int) -> tuple[float, float, int]:
    """VmRSS and VmHWM in MB, and the number of open file descriptors, of ``pid``."""
    rss = hwm = 0.0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    return rss, hwm, len(os.listdir(f"/proc/{pid}/fd"))


class LoadRun:
    """One run; see the module docstring."""

    def __init__(self, settings: LoadSettings) -> None:
        self.settings = settings
        self.report = LoadReport(settings.sagas, settings.max_calls_per_participant)
        work = settings.workdir
        self.ports = {name: free_port() for name in PARTICIPANTS}
        low, high = settings.delay_ms
        self.participants = {
            name: ManagedProcess(
                name,
                [
                    "-m",
                    "tests.torture.participant",
                    "--name",
                    name,
                    "--port",
                    str(self.ports[name]),
                    "--dir",
                    str(work / name),
                    "--seed",
                    "0",
                    "--well-behaved",
                    "--delay-ms",
                    f"{low}:{high}",
                    *(["--gate", str(work / "gate")] if settings.all_at_once else []),
                ],
                work / f"{name}.log",
                cwd=ROOT,
            )
            for name in PARTICIPANTS
        }
        self.port = free_port()
        self.database = work / "saga.db"
        self.coordinator = ManagedProcess(
            "coordinator",
            ["-m", "coordinator.cli", "serve", "--config", str(work / "saga.yaml")],
            work / "coordinator.log",
            cwd=ROOT,
        )

    def say(self, line: str) -> None:
        if self.settings.progress is not None:
            self.settings.progress(line)

    async def run(self) -> LoadReport:
        """Start, load, wait, measure, stop."""
        work = self.settings.workdir
        (work / "definitions").mkdir(parents=True, exist_ok=True)
        (work / "definitions" / "load.yaml").write_text(yaml.safe_dump(DEFINITION))
        (work / "saga.yaml").write_text(
            yaml.safe_dump(
                {
                    "database": f"sqlite:///{self.database}",
                    "listen": f"127.0.0.1:{self.port}",
                    "definitions": "definitions",
                    "log_level": "WARNING",
                    "max_calls_per_participant": self.settings.max_calls_per_participant,
                    "participants": {n: f"127.0.0.1:{p}" for n, p in self.ports.items()},
                }
            )
        )
        try:
            for name, process in self.participants.items():
                process.spawn()
                if not await wait_serving(process, f"127.0.0.1:{self.ports[name]}", 30):
                    raise RuntimeError(f"participant {name} did not start: {process.log}")
            self.coordinator.spawn()
            if not await wait_serving(self.coordinator, f"127.0.0.1:{self.port}", 30):
                raise RuntimeError(f"the coordinator did not start: {self.coordinator.log}")
            sampler = asyncio.create_task(self._sample())
            try:
                await self._load()
            finally:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
            pid = self.coordinator.pid
            assert pid is not None
            self.report.final_rss_mb, hwm, self.report.final_fds = _proc_status(pid)
            self.report.vm_hwm_mb = max(self.report.vm_hwm_mb, hwm)
        finally:
            if self.coordinator.alive:
                self.report.coordinator_exit_code = await self.coordinator.terminate(30)
            for process in self.participants.values():
                if process.alive:
                    await process.terminate(10)
        self._read_participants()
        return self.report

    async def _load(self) -> None:
        started = time.monotonic()
        target = f"127.0.0.1:{self.port}"
        async with grpc.aio.insecure_channel(target, options=CLIENT_OPTIONS) as channel:
            stub = cpb_grpc.CoordinatorServiceStub(channel)
            slots = asyncio.Semaphore(self.settings.submitters)

            async def submit(index: int) -> None:
                request = cpb.CreateSagaRequest(
                    saga_id=f"load-{index}", definition="load", input=b'{"n": %d}' % index
                )
                async with slots:
                    while True:
                        try:
                            await stub.CreateSaga(request, timeout=60)
                            return
                        except grpc.aio.AioRpcError as error:
                            if error.code() not in RETRIED_CODES:
                                raise
                        self.report.create_retries += 1
                        await asyncio.sleep(random.uniform(0.05, 0.2))

            counting = asyncio.create_task(self._count_in_flight())
            await asyncio.gather(*(submit(i) for i in range(self.settings.sagas)))
        self.report.submit_seconds = time.monotonic() - started
        self.say(f"{self.settings.sagas} sagas submitted in {self.report.submit_seconds:.1f}s")
        (self.settings.workdir / "gate").touch()  # the participants answer from now on
        deadline = started + self.settings.timeout
        try:
            await self._wait_for_the_end(deadline)
        finally:
            counting.cancel()
        self.report.total_seconds = time.monotonic() - started

    async def _count_in_flight(self) -> None:
        while True:
            states = await asyncio.to_thread(self._states)
            unsettled = states.get("RUNNING", 0) + states.get("COMPENSATING", 0)
            self.report.peak_in_flight_sagas = max(self.report.peak_in_flight_sagas, unsettled)
            await asyncio.sleep(0.5)

    async def _wait_for_the_end(self, deadline: float) -> None:
        last_said = time.monotonic()
        while time.monotonic() < deadline:
            states = await asyncio.to_thread(self._states)
            self.report.states = states
            unsettled = states.get("RUNNING", 0) + states.get("COMPENSATING", 0)
            self.report.peak_in_flight_sagas = max(self.report.peak_in_flight_sagas, unsettled)
            if unsettled == 0 and sum(states.values()) == self.settings.sagas:
                break
            if time.monotonic() - last_said > 10:
                last_said = time.monotonic()
                self.say(
                    f"{unsettled} sagas in flight, RSS {self.report.peak_rss_mb:.0f} MB peak, "
                    f"{self.report.peak_fds} fds peak"
                )
            await asyncio.sleep(0.5)

    def _states(self) -> dict[str, int]:
        try:
            with contextlib.closing(read_only(self.database)) as db:
                db.execute("PRAGMA busy_timeout = 2000")
                return dict(db.execute("SELECT state, count(*) FROM sagas GROUP BY state"))
        except Exception:
            return self.report.states

    async def _sample(self) -> None:
        pid = self.coordinator.pid
        assert pid is not None
        while True:
            with contextlib.suppress(OSError):
                rss, hwm, fds = _proc_status(pid)
                report = self.report
                report.peak_rss_mb = max(report.peak_rss_mb, rss)
                report.vm_hwm_mb = max(report.vm_hwm_mb, hwm)
                report.peak_fds = max(report.peak_fds, fds)
            await asyncio.sleep(0.2)

    def _read_participants(self) -> None:
        for name in PARTICIPANTS:
            path = self.settings.workdir / name / "ledger.db"
            with contextlib.closing(read_only(path)) as db:
                row = db.execute("SELECT value FROM meta WHERE key = 'max_in_flight'").fetchone()
            self.report.participant_peak_calls[name] = 0 if row is None else int(row[0])


async def run_load(settings: LoadSettings) -> LoadReport:
    """One load run; see the module docstring."""
    return await LoadRun(settings).run()
