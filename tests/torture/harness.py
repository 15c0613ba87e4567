"""The torture run: a real coordinator and real participants, crashed and faulted on purpose.

One run, from its seed:

1. start the participant processes (``tests.torture.participant``), a fault-injecting proxy in
   front of each, and the coordinator (``python -m coordinator.cli serve``) dialling the
   proxies;
2. while a client submits sagas (recording each acknowledgement with fsync, retrying on
   UNAVAILABLE, sending concurrent duplicates, cancelling a few), the nemesis kills the
   coordinator with SIGKILL, at named crash points and at random instants, and restarts it,
   kills participants and restarts them, and the proxies drop, reset, black-hole and delay;
3. then the faults stop, everything drains until every acknowledged saga has settled, every
   process stops, and the offline checker (``tests.torture.checker``) reads what is left.

With several replicas (``replicas`` > 1), several coordinators share the store (a PostgreSQL
database, or the SQLite file) under short leases. The nemesis picks one replica at random for
each of its turns: it kills that one's running process at a random instant, then runs it through
lives that end at crash points, and leaves it running again; meanwhile the others serve, claim
the sagas of the dead one and are paused now and then (SIGSTOP) for longer than their lease,
so that their sagas are taken over and what they write on waking is refused. The client and
the change feed's consumer move to another replica when theirs refuses or is down.

A failing run is replayed with the same ``--seed``: the sagas and the faults are drawn from it
(the exact interleaving, being real time, varies).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import yaml
from saga.v1 import coordinator_service_pb2 as cpb
from saga.v1 import coordinator_service_pb2_grpc as cpb_grpc

from coordinator.config import parse_duration
from coordinator.crashpoints import ENVIRONMENT_VARIABLE, CrashPoint
from tests.support.processes import free_port
from tests.torture.checker import CheckReport, check_run, input_digest
from tests.torture.probe import ProbeFailed, StoreProbe
from tests.torture.processes import ManagedProcess, dial, health_serving, wait_serving
from tests.torture.proxy import FaultyLink
from tests.torture.scenario import (
    DEFINITION,
    PARTICIPANTS,
    STEP_TIMEOUT_MS,
    SagaPlan,
    definition,
    plan_saga,
)
from tests.torture.tls import TortureTls

ROOT = Path(__file__).resolve().parents[2]
CLIENT_OPTIONS = [
    # The coordinator restarts every second or so: reconnect at once rather than after
    # gRPC's default backoff of one second and more.
    ("grpc.initial_reconnect_backoff_ms", 20),
    ("grpc.min_reconnect_backoff_ms", 20),
    ("grpc.max_reconnect_backoff_ms", 200),
]
RETRIED_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)
REPLICA_RETRIED_CODES = RETRIED_CODES | {grpc.StatusCode.ABORTED}
"""With replicas, ABORTED too: an action lost the saga to another replica (its lease), retry."""
STALE_WRITE_LOGGED = "letting the saga go"
"""What a replica logs when a write is refused because another replica holds the saga now."""
LEASE_LAPSE_LOGGED = "ran out (was the process paused?)"
"""What a replica logs when it finds that its own lease ran out."""


@dataclass(frozen=True)
class TortureSettings:
    """How long and how hard one run tortures."""

    seed: int
    workdir: Path
    kills: int = 200
    """Coordinator kills (crash points and random instants) before the faults stop."""
    min_per_crash_point: int = 3
    """Kills at each named crash point before the faults stop."""
    min_sagas: int = 0
    """Sagas submitted before the faults stop (as well as the kills)."""
    crash_point_share: float = 0.6
    """Share of coordinator lives that end at a crash point rather than at a random instant."""
    max_fault_seconds: float = 3600.0
    """The faults stop after this long even if the kill counts are not reached."""
    drain_seconds: float = 240.0
    """How long every acknowledged saga has to settle once the faults stop."""
    max_unsettled: int = 48
    """The client waits while this many sagas are unsettled (keeps the drain short)."""
    submitters: int = 6
    """Sagas the client submits concurrently."""
    participant_kills: bool = True
    network_faults: bool = True
    feed_consumer: bool = True
    """Follow the change feed with a consumer that is SIGKILLed at random instants too."""
    replicas: int = 1
    """Coordinator processes sharing the store. Above 1, each has its own port, its name
    (``r0``, ``r1``...) and the short ``lease``; the nemesis kills one at a time, and the
    others are paused now and then."""
    database_url: str | None = None
    """The store the coordinators share: a ``postgresql://`` URL; None: a SQLite file in the
    run's directory."""
    lease: str = "2s"
    """Each replica's lease, with several replicas: short, so that takeovers happen in the run."""
    min_pauses: int = 0
    """With several replicas: pauses (SIGSTOP, longer than the lease) before the faults stop."""
    tls: bool = False
    """TLS on both hops, from a CA made for the run (``tests.torture.tls``): the coordinators
    serve mTLS to the client and the feed consumer, and call the participants over mTLS
    through the proxies, which forward the encrypted bytes unchanged."""
    progress: Callable[[str], None] | None = None
    """Called with a line of progress now and then."""


@dataclass
class RunStats:
    """What the harness did and saw, besides what the checker reads from the files."""

    crash_point_kills: Counter[str] = field(default_factory=Counter)
    crash_points_not_reached: int = 0
    random_kills: int = 0
    kills_before_serving: int = 0
    participant_kills: int = 0
    feed_consumer_kills: int = 0
    feed_catch_up_seconds: float = 0.0
    recovery_seconds: list[float] = field(default_factory=list)
    unexpected_exits: list[str] = field(default_factory=list)
    sagas_submitted: int = 0
    create_requests: int = 0
    create_retries: int = 0
    duplicate_requests: int = 0
    conflicts_checked: int = 0
    cancels: Counter[str] = field(default_factory=Counter)
    fault_seconds: float = 0.0
    drain_seconds: float = 0.0
    final_exit_code: int | None = None
    pauses: int = 0
    """Replicas paused (SIGSTOP) for longer than their lease, then resumed."""
    aborted_retries: int = 0
    """Requests a replica refused as ABORTED (it lost the saga to another one), retried."""
    stale_writes: int = 0
    """Writes refused because another replica held the saga (from the replicas' logs)."""
    lease_lapses: int = 0
    """Times a replica found its own lease run out (from the replicas' logs)."""
    sagas_claimed_again: int = 0
    """Sagas claimed (or taken) after the hold they were created with, at least once."""
    claims_after_creation: int = 0
    """Claims and takes of sagas after their creation, in all (each moved the saga's epoch)."""

    @property
    def coordinator_kills(self) -> int:
        """Every SIGKILL of the coordinator, whoever sent it."""
        return (
            sum(self.crash_point_kills.values()) + self.crash_points_not_reached + self.random_kills
        )


@dataclass
class TortureReport:
    """The run's figures: the checker's, and the harness's own."""

    seed: int
    check: CheckReport
    stats: RunStats
    links: dict[str, dict[str, int]]
    workdir: Path
    replicas: int = 1
    store: str = "sqlite"
    """``sqlite`` or ``postgresql``."""
    lease: str | None = None
    """The replicas' lease (None: one coordinator, with the default lease)."""
    tls: bool = False
    """Whether both hops ran over TLS."""

    @property
    def figures(self) -> dict[str, int]:
        """Every figure that must be zero."""
        figures = dict(self.check.figures)
        figures["unexpected_coordinator_exits"] = len(self.stats.unexpected_exits)
        return figures

    @property
    def ok(self) -> bool:
        """Whether every guarantee held."""
        return not any(self.figures.values())

    def _replay_store(self) -> str:
        """The options that replay the run on its kind of store, besides its seed."""
        options = ""
        if self.replicas > 1:
            options += f" --replicas {self.replicas} --lease {self.lease}"
        if self.store == "postgresql":
            options += " --postgresql"
        if self.tls:
            options += " --tls"
        return options

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        recovery = self.stats.recovery_seconds
        stats = {
            name: dict(value) if isinstance(value, Counter) else value
            for name, value in vars(self.stats).items()
            if name not in ("recovery_seconds", "unexpected_exits")
        }
        stats["crash_point_kills"] = {
            p.value: self.stats.crash_point_kills[p.value] for p in CrashPoint
        }
        return {
            "seed": self.seed,
            "ok": self.ok,
            "replicas": self.replicas,
            "store": self.store,
            "lease": self.lease,
            "tls": self.tls,
            "must_be_zero": self.figures,
            "coordinator_kills": self.stats.coordinator_kills,
            "recovery_seconds": {
                "count": len(recovery),
                "p50": _percentile(recovery, 50),
                "p95": _percentile(recovery, 95),
                "max": max(recovery, default=None),
            },
            "run": stats,
            "checker": self.check.info,
            "links": self.links,
            "examples": {k: v for k, v in self.check.examples.items() if v},
            "unexpected_exits": self.stats.unexpected_exits[:10],
            "workdir": str(self.workdir),
            "replay": f"--seed {self.seed}{self._replay_store()}",
        }


def _percentile(values: list[float], percent: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 3)
    return round(statistics.quantiles(values, n=100, method="inclusive")[percent - 1], 3)


@dataclass(eq=False)
class Replica:
    """One coordinator process of the run, under its name, on its own port."""

    name: str
    port: int
    config: Path
    process: ManagedProcess

    @property
    def target(self) -> str:
        """The replica's address."""
        return f"127.0.0.1:{self.port}"


class Torture:
    """One run; see the module docstring."""

    def __init__(self, settings: TortureSettings) -> None:
        if settings.replicas < 1:
            raise ValueError(f"replicas must be at least 1, not {settings.replicas}")
        self.settings = settings
        self.rng = random.Random(settings.seed)
        self.stats = RunStats()
        work = settings.workdir
        self.coordinator_dir = work / "coordinator"
        self.database = self.coordinator_dir / "saga.db"
        self.probe = StoreProbe(self.database, settings.database_url)
        self.client_log = work / "client" / "acks.jsonl"
        self.participant_dirs = {name: work / "participants" / name for name in PARTICIPANTS}
        self.participant_ports = {name: free_port() for name in PARTICIPANTS}
        self.tls = TortureTls(work / "pki") if settings.tls else None
        self._credentials: grpc.ChannelCredentials | None = None
        """The client's TLS credentials, once the run's certificates are made."""
        tls_flags = [] if self.tls is None else ["--tls-dir", str(self.tls.directory)]
        self.participants = {
            name: ManagedProcess(
                name,
                [
                    "-m",
                    "tests.torture.participant",
                    "--name",
                    name,
                    "--port",
                    str(self.participant_ports[name]),
                    "--dir",
                    str(self.participant_dirs[name]),
                    "--seed",
                    str(settings.seed),
                    *tls_flags,
                ],
                self.participant_dirs[name] / "participant.log",
                cwd=ROOT,
            )
            for name in PARTICIPANTS
        }
        self.links = {
            name: FaultyLink(
                name, self.participant_ports[name], random.Random(f"{settings.seed}/{name}")
            )
            for name in PARTICIPANTS
        }
        self.replicas = [self._replica(index) for index in range(settings.replicas)]
        self.feed_dir = work / "feed-consumer"
        self.feed_consumer = ManagedProcess(
            "feed consumer",
            [
                "-m",
                "tests.torture.feed_consumer",
                *(arg for replica in self.replicas for arg in ("--target", replica.target)),
                "--dir",
                str(self.feed_dir),
                *tls_flags,
            ],
            self.feed_dir / "consumer.log",
            cwd=ROOT,
        )
        self.lease_seconds = parse_duration(settings.lease).total_seconds()
        self.dying: Replica | None = None
        """The replica the coordinator nemesis is killing and restarting (never paused)."""
        self.paused: Replica | None = None
        """The replica stopped by SIGSTOP right now (never killed meanwhile)."""
        self.recovering: set[Replica] = set()
        """Replicas restarted by the nemesis that do not answer SERVING yet (never paused)."""
        self.unsettled = 0
        self.faults_over = asyncio.Event()
        self.submitting = True
        self._stubs: list[cpb_grpc.CoordinatorServiceAsyncStub] = []
        self._turn = 0
        self._retried = RETRIED_CODES if settings.replicas == 1 else REPLICA_RETRIED_CODES
        self._log_fd = -1
        self._started = time.monotonic()

    def _replica(self, index: int) -> Replica:
        if self.settings.replicas == 1:  # as the run has always been laid out
            name, config, log = "coordinator", "saga.yaml", "coordinator.log"
        else:
            name = f"r{index}"
            config, log = f"{name}.yaml", f"{name}.log"
        process = ManagedProcess(
            name,
            ["-m", "coordinator.cli", "serve", "--config", str(self.coordinator_dir / config)],
            self.coordinator_dir / log,
            cwd=ROOT,
        )
        return Replica(name, free_port(), self.coordinator_dir / config, process)

    @property
    def coordinator(self) -> ManagedProcess:
        """The first (with one replica: the only) coordinator process."""
        return self.replicas[0].process

    @property
    def target(self) -> str:
        """The first (with one replica: the only) coordinator's address."""
        return self.replicas[0].target

    def say(self, line: str) -> None:
        """Report progress."""
        if self.settings.progress is not None:
            elapsed = time.monotonic() - self._started
            self.settings.progress(f"[{elapsed:7.1f}s] {line}")

    # --- the run ---------------------------------------------------------------------------------

    async def run(self) -> TortureReport:
        """Torture, drain, stop everything, check."""
        self._prepare()
        try:
            for name, process in self.participants.items():
                process.spawn()
                address = f"127.0.0.1:{self.participant_ports[name]}"
                if not await self._serving(process, address, 20):
                    raise RuntimeError(f"participant {name} did not start: see {process.log}")
            for link in self.links.values():
                await link.start()
            self._write_config()
            for replica in self.replicas:
                replica.process.spawn()
            for replica in self.replicas:
                if not await self._serving(replica.process, replica.target, 30):
                    raise RuntimeError(
                        f"the coordinator {replica.name} did not start: see {replica.process.log}"
                    )
            if self.tls is not None:
                await self._refuse_plaintext()
            await self._torture_then_drain()
        finally:
            await self._stop_everything()
        self._read_replica_logs()
        with contextlib.suppress(ProbeFailed):
            self.stats.sagas_claimed_again, self.stats.claims_after_creation = self.probe.claims()
        check = check_run(
            self.settings.database_url or self.database,
            self.client_log,
            self.participant_dirs,
            self.feed_dir if self.settings.feed_consumer else None,
        )
        return TortureReport(
            self.settings.seed,
            check,
            self.stats,
            {name: asdict(link.stats) for name, link in self.links.items()},
            self.settings.workdir,
            replicas=self.settings.replicas,
            store="sqlite" if self.settings.database_url is None else "postgresql",
            lease=self.settings.lease if self.settings.replicas > 1 else None,
            tls=self.settings.tls,
        )

    def _prepare(self) -> None:
        (self.coordinator_dir / "definitions").mkdir(parents=True, exist_ok=True)
        (self.coordinator_dir / "definitions" / f"{DEFINITION}.yaml").write_text(
            yaml.safe_dump(definition(), sort_keys=False)
        )
        for directory in self.participant_dirs.values():
            directory.mkdir(parents=True, exist_ok=True)
        self.client_log.parent.mkdir(parents=True, exist_ok=True)
        self.feed_dir.mkdir(parents=True, exist_ok=True)
        if self.tls is not None:
            TortureTls.create(self.tls.directory)
            self._credentials = self.tls.client_credentials()
        self._log_fd = os.open(self.client_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    async def _refuse_plaintext(self) -> None:
        """With TLS, check that no port of the run answers in plaintext: what the run tortures
        is the encrypted path."""
        targets = [replica.target for replica in self.replicas]
        targets += [f"127.0.0.1:{port}" for port in self.participant_ports.values()]
        targets += [f"127.0.0.1:{link.port}" for link in self.links.values()]
        for target in targets:
            if await health_serving(target, timeout=1.0):
                raise RuntimeError(f"{target} answers in plaintext in a run with TLS")

    async def _serving(self, process: ManagedProcess, target: str, timeout: float) -> bool:
        """Wait until ``process`` serves at ``target`` (over TLS when the run has it)."""
        return await wait_serving(process, target, timeout, self._credentials)

    def _write_config(self) -> None:
        for replica in self.replicas:
            config: dict[str, Any] = {
                "database": self.settings.database_url or f"sqlite:///{self.database}",
                "listen": replica.target,
                "definitions": "definitions",
                "shutdown_grace": 1.0,
                "log_level": "WARNING",
                "participants": {
                    name: f"127.0.0.1:{link.port}"
                    if self.tls is None
                    else self.tls.participant_endpoint(f"127.0.0.1:{link.port}")
                    for name, link in self.links.items()
                },
            }
            if self.tls is not None:
                config["tls"] = self.tls.coordinator_config()
            if self.settings.replicas > 1:
                config["replica"] = replica.name
                config["lease"] = self.settings.lease
            replica.config.write_text(yaml.safe_dump(config))

    async def _torture_then_drain(self) -> None:
        background = [
            asyncio.create_task(self._watch_backlog(), name="backlog"),
        ]
        if self.settings.replicas == 1:
            faults = [asyncio.create_task(self._kill_coordinator(), name="coordinator nemesis")]
        else:
            faults = [asyncio.create_task(self._kill_replicas(), name="replica nemesis")]
            faults.append(asyncio.create_task(self._pause_replicas(), name="pause nemesis"))
            background.append(asyncio.create_task(self._watch_replicas(), name="replica exits"))
        if self.settings.participant_kills:
            faults.append(
                asyncio.create_task(self._kill_participants(), name="participant nemesis")
            )
        if self.settings.network_faults:
            faults.append(asyncio.create_task(self._break_network(), name="network faults"))
        if self.settings.feed_consumer:
            faults.append(asyncio.create_task(self._kill_feed_consumer(), name="feed nemesis"))
        client = asyncio.create_task(self._client(), name="client")
        started = time.monotonic()
        try:
            await faults[0]
            self.faults_over.set()
            for task in faults[1:]:
                task.cancel()
            await asyncio.gather(*faults[1:], return_exceptions=True)
            self.stats.fault_seconds = time.monotonic() - started
            self.say(
                f"faults over: {self.stats.coordinator_kills} coordinator kills, "
                f"{self.stats.participant_kills} participant kills"
                + (f", {self.stats.pauses} pauses" if self.settings.replicas > 1 else "")
                + "; draining"
            )
            drain_started = time.monotonic()
            self.submitting = False  # the sagas already submitted are retried until answered
            for link in self.links.values():
                link.heal()
            for name, process in self.participants.items():
                if not process.alive:
                    process.spawn()
                    await self._serving(process, f"127.0.0.1:{self.participant_ports[name]}", 20)
            for replica in self.replicas:
                if not replica.process.alive:
                    replica.process.spawn()
            for replica in self.replicas:
                if not await self._serving(replica.process, replica.target, 30):
                    self.stats.unexpected_exits.append(
                        f"the coordinator {replica.name} did not restart for the drain"
                        if self.settings.replicas > 1
                        else "the coordinator did not restart for the drain"
                    )
            deadline = time.monotonic() + self.settings.drain_seconds
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.drain_seconds):
                    await asyncio.shield(client)
            while time.monotonic() < deadline:
                if client.done() and self._count_unsettled() == 0:
                    break
                await asyncio.sleep(0.2)
            self.stats.drain_seconds = time.monotonic() - drain_started
            self.say(f"drained in {self.stats.drain_seconds:.1f}s")
            if self.settings.feed_consumer:
                await self._feed_catch_up()
        finally:
            self.submitting = False
            for task in [*faults, client, *background]:
                task.cancel()
            await asyncio.gather(*faults, client, *background, return_exceptions=True)

    async def _stop_everything(self) -> None:
        for replica in self.replicas:
            process = replica.process
            process.resume()  # a pause cut short by a failure
            if process.alive:
                code = await process.terminate(20)
                self.stats.final_exit_code = code
                if code != 0:
                    self.stats.unexpected_exits.append(
                        f"{self._named(replica)}SIGTERM at the end: exit code {code}"
                    )
            else:
                process.kill()
        self.feed_consumer.kill()
        for participant in self.participants.values():
            if participant.alive:
                await participant.terminate(10)
        for link in self.links.values():
            await link.close()
        if self._log_fd >= 0:
            os.close(self._log_fd)
            self._log_fd = -1

    def _named(self, replica: Replica) -> str:
        """How a message about a replica starts: its name, when there are several."""
        return f"{replica.name}: " if self.settings.replicas > 1 else ""

    def _read_replica_logs(self) -> None:
        """Count, from what the replicas logged, the writes refused for a lost lease and the
        lapses of their own leases."""
        for replica in self.replicas:
            with contextlib.suppress(FileNotFoundError):
                text = replica.process.log.read_text(errors="replace")
                self.stats.stale_writes += text.count(STALE_WRITE_LOGGED)
                self.stats.lease_lapses += text.count(LEASE_LAPSE_LOGGED)

    # --- the nemeses -----------------------------------------------------------------------------

    def _enough_kills(self) -> bool:
        settings = self.settings
        if time.monotonic() - self._started > settings.max_fault_seconds:
            self.say("the fault period is over before the kill counts were reached")
            return True
        per_point = min(self.stats.crash_point_kills[p.value] for p in CrashPoint)
        return (
            self.stats.coordinator_kills >= settings.kills
            and per_point >= settings.min_per_crash_point
            and self.stats.sagas_submitted >= settings.min_sagas
            and (settings.replicas == 1 or self.stats.pauses >= settings.min_pauses)
        )

    def _pick_crash_point(self) -> CrashPoint:
        if self.rng.random() < 0.5:
            return min(
                CrashPoint, key=lambda p: (self.stats.crash_point_kills[p.value], self.rng.random())
            )
        return self.rng.choice(list(CrashPoint))

    async def _kill_coordinator(self) -> None:
        """Kill the coordinator at a crash point or a random instant, restart it, repeat."""
        coordinator = self.replicas[0]
        coordinator.process.kill()
        while not self._enough_kills():
            if self.rng.random() < self.settings.crash_point_share:
                await self._life_ending_at_crash_point(coordinator, self._pick_crash_point())
            else:
                await self._life_ending_at_random(coordinator)
            kills = self.stats.coordinator_kills
            if kills % 25 == 0:
                self._say_kills()

    def _say_kills(self) -> None:
        self.say(
            f"{self.stats.coordinator_kills} coordinator kills, "
            f"{self.stats.sagas_submitted} sagas submitted, {self.unsettled} unsettled"
            + (f", {self.stats.pauses} pauses" if self.settings.replicas > 1 else "")
        )

    async def _kill_replicas(self) -> None:
        """With several replicas: pick one at random, SIGKILL its running process at a random
        instant (in the middle of its recovery if it was just restarted), run it through lives
        that end at crash points (each drawn with the crash point share), and restart it: it
        recovers while the next turn begins. The others serve meanwhile and take its sagas
        over. Repeat."""
        next_say = 25
        recoveries: dict[Replica, asyncio.Task[None]] = {}
        try:
            while not self._enough_kills():
                replica = self.rng.choice([r for r in self.replicas if r is not self.paused])
                self.dying = replica
                try:
                    await self._turn_of(replica, recoveries.pop(replica, None))
                finally:
                    self.dying = None
                recoveries[replica] = asyncio.create_task(self._recover_in_background(replica))
                if self.stats.coordinator_kills >= next_say:
                    next_say += 25
                    self._say_kills()
        finally:
            for recovery in recoveries.values():
                recovery.cancel()
            await asyncio.gather(*recoveries.values(), return_exceptions=True)

    async def _turn_of(self, replica: Replica, recovery: asyncio.Task[None] | None) -> None:
        """One turn of the nemesis on ``replica``; ``recovery`` waits for its last restart."""
        process = replica.process
        await asyncio.sleep(self.rng.uniform(0.02, 0.8))
        if process.alive:
            if replica in self.recovering:
                self.stats.kills_before_serving += 1
            process.kill()
            self.stats.random_kills += 1
        else:
            self._unexpected_exit(replica, process.returncode, "running")
        if recovery is not None:
            recovery.cancel()
            await asyncio.gather(recovery, return_exceptions=True)
        while not self._enough_kills() and self.rng.random() < self.settings.crash_point_share:
            await self._life_ending_at_crash_point(replica, self._pick_crash_point())
        process.spawn()

    async def _recover_in_background(self, replica: Replica) -> None:
        self.recovering.add(replica)
        try:
            await self._measure_recovery(replica)
        finally:
            self.recovering.discard(replica)

    async def _watch_replicas(self) -> None:
        """With several replicas: a replica that exits when nobody killed it is an unexpected
        exit; it is restarted."""
        while True:
            await asyncio.sleep(0.5)
            for replica in self.replicas:
                process = replica.process
                if replica is self.dying or process.alive or process.process is None:
                    continue
                self._unexpected_exit(replica, process.returncode, "running")
                process.spawn()

    async def _pause_replicas(self) -> None:
        """With several replicas: now and then SIGSTOP one (never the one being killed) for
        longer than its lease, so that the others claim its sagas, then SIGCONT it: what it
        then tries to write for them must be refused."""
        while True:
            await asyncio.sleep(self.rng.uniform(4.0, 10.0))
            candidates = [
                r
                for r in self.replicas
                if r is not self.dying and r not in self.recovering and r.process.alive
            ]
            if not candidates:
                continue
            replica = self.rng.choice(candidates)
            self.paused = replica
            replica.process.pause()
            try:
                await asyncio.sleep(self.lease_seconds * self.rng.uniform(1.25, 2.0))
            finally:
                replica.process.resume()
                self.paused = None
            self.stats.pauses += 1

    async def _life_ending_at_crash_point(self, replica: Replica, point: CrashPoint) -> None:
        count = self.rng.randint(1, 3)
        replica.process.spawn({ENVIRONMENT_VARIABLE: f"{point.value}:{count}"})
        await self._measure_recovery(replica)
        code = await replica.process.wait_exit(5.0)
        if code is None:
            replica.process.kill()
            self.stats.crash_points_not_reached += 1
        elif code == -9:
            self.stats.crash_point_kills[point.value] += 1
        else:
            self._unexpected_exit(replica, code, f"armed at {point.value}:{count}")

    async def _life_ending_at_random(self, replica: Replica) -> None:
        process = replica.process
        process.spawn()
        if self.rng.random() < 0.15:
            # Before (or while) it answers its health check: in the middle of recovery.
            await asyncio.sleep(self.rng.uniform(0.05, 0.7))
            self.stats.kills_before_serving += 1
        else:
            await self._measure_recovery(replica)
            await asyncio.sleep(self.rng.uniform(0.02, 0.8))
        if not process.alive:
            code = process.process.returncode if process.process else None
            self._unexpected_exit(replica, code, "not armed")
            return
        process.kill()
        self.stats.random_kills += 1

    async def _measure_recovery(self, replica: Replica) -> None:
        if await self._serving(replica.process, replica.target, 30):
            self.stats.recovery_seconds.append(time.monotonic() - replica.process.spawned_at)

    def _unexpected_exit(self, replica: Replica, code: int | None, context: str) -> None:
        tail = replica.process.log.read_text(errors="replace")[-1500:]
        self.stats.unexpected_exits.append(
            f"{self._named(replica)}exit code {code} ({context}): ...{tail}"
        )
        self.say(f"UNEXPECTED coordinator exit {code} ({self._named(replica)}{context})")

    async def _kill_participants(self) -> None:
        """SIGKILL a participant now and then; restart it after a short pause."""
        while True:
            await asyncio.sleep(self.rng.uniform(1.0, 3.5))
            name = self.rng.choice(PARTICIPANTS)
            process = self.participants[name]
            process.kill()
            self.stats.participant_kills += 1
            await asyncio.sleep(self.rng.uniform(0.0, 0.4))
            process.spawn()
            await self._serving(process, f"127.0.0.1:{self.participant_ports[name]}", 20)

    async def _kill_feed_consumer(self) -> None:
        """Follow the feed with a consumer; SIGKILL it at random instants, restart it."""
        while True:
            self.feed_consumer.spawn()
            # It takes about half a second to start: most lives get to read, some do not.
            await asyncio.sleep(self.rng.uniform(0.3, 3.5))
            self.feed_consumer.kill()
            self.stats.feed_consumer_kills += 1
            await asyncio.sleep(self.rng.uniform(0.0, 0.5))

    async def _feed_catch_up(self) -> None:
        """Let the feed's consumer (restarted once more) reach the newest change, then stop it."""
        started = time.monotonic()
        newest = await asyncio.to_thread(self._newest_position)
        if not self.feed_consumer.alive:
            self.feed_consumer.spawn()
        position = self.feed_dir / "position"
        while time.monotonic() - started < 120:
            with contextlib.suppress(FileNotFoundError, ValueError):
                if int(position.read_text()) >= newest:
                    break
            await asyncio.sleep(0.1)
        self.stats.feed_catch_up_seconds = time.monotonic() - started
        await self.feed_consumer.terminate(5)
        self.feed_consumer.kill()

    def _newest_position(self) -> int:
        return self.probe.newest_position()

    async def _break_network(self) -> None:
        """Latency, black holes, late answers, resets and closes, on one link at a time."""
        periods: set[asyncio.Task[None]] = set()
        timeout = STEP_TIMEOUT_MS / 1000
        try:
            while True:
                await asyncio.sleep(self.rng.uniform(0.1, 0.6))
                link = self.links[self.rng.choice(PARTICIPANTS)]
                draw = self.rng.random()
                period = None
                if draw < 0.3:
                    link.reset_connections()
                elif draw < 0.45:
                    link.close_one()
                elif draw < 0.65:
                    period = link.latency(self.rng.uniform(0.3, 2.0), 0.001, 0.03)
                elif draw < 0.8:
                    period = link.black_hole(
                        self.rng.uniform(0.1, 0.8), reset_after=self.rng.random() < 0.5
                    )
                else:
                    period = link.late_answers(
                        self.rng.uniform(0.3, 1.2), hold=timeout * self.rng.uniform(1.2, 2.5)
                    )
                if period is not None:
                    task = asyncio.create_task(period)
                    periods.add(task)
                    task.add_done_callback(periods.discard)
        finally:
            for task in list(periods):
                task.cancel()
            await asyncio.gather(*periods, return_exceptions=True)

    # --- the client ------------------------------------------------------------------------------

    def _log(self, entry: dict[str, Any]) -> None:
        """Append one line to the client's log and fsync it: the acknowledgement is on disk."""
        os.write(self._log_fd, (json.dumps(entry, sort_keys=True) + "\n").encode())
        os.fsync(self._log_fd)

    def _count_unsettled(self) -> int:
        with contextlib.suppress(ProbeFailed):
            self.unsettled = self.probe.unsettled()
        return self.unsettled

    async def _watch_backlog(self) -> None:
        while True:
            await asyncio.to_thread(self._count_unsettled)
            await asyncio.sleep(0.25)

    def _stub(self) -> cpb_grpc.CoordinatorServiceAsyncStub:
        """The replica for the next request: each in turn (with one, always the same)."""
        stub = self._stubs[self._turn % len(self._stubs)]
        self._turn += 1
        return stub

    async def _client(self) -> None:
        """Submit sagas until told to stop; each until acknowledged."""
        async with contextlib.AsyncExitStack() as channels:
            for replica in self.replicas:
                channel = await channels.enter_async_context(
                    dial(replica.target, self._credentials, CLIENT_OPTIONS)
                )
                self._stubs.append(cpb_grpc.CoordinatorServiceStub(channel))
            slots = asyncio.Semaphore(self.settings.submitters)
            pending: set[asyncio.Task[None]] = set()

            def finished(task: asyncio.Task[None]) -> None:
                pending.discard(task)
                slots.release()

            index = 0
            while self._may_submit():
                if self.unsettled + len(pending) >= self.settings.max_unsettled:
                    await asyncio.sleep(0.05)
                    continue
                await slots.acquire()
                if not self._may_submit():
                    slots.release()
                    break
                plan = plan_saga(self.settings.seed, index)
                index += 1
                self.stats.sagas_submitted += 1
                task = asyncio.create_task(self._submit(plan))
                pending.add(task)
                task.add_done_callback(finished)
            await asyncio.gather(*pending)

    def _may_submit(self) -> bool:
        return self.submitting

    async def _submit(self, plan: SagaPlan) -> None:
        request = cpb.CreateSagaRequest(
            saga_id=plan.saga_id, definition=DEFINITION, input=plan.payload()
        )
        self.stats.duplicate_requests += plan.duplicates
        first_timeout = self.rng.uniform(0.0001, 0.005) if plan.hurried else 3.0
        answers = await asyncio.gather(
            *(
                self._create_until_answered(request, first_timeout)
                for _ in range(1 + plan.duplicates)
            )
        )
        digest = input_digest(request.input)
        for answer in answers:
            if isinstance(answer, cpb.CreateSagaResponse):
                self._log(
                    {
                        "kind": "ack",
                        "saga_id": plan.saga_id,
                        "created": answer.created,
                        "input_sha256": digest,
                    }
                )
            else:
                self._log(
                    {
                        "kind": "error",
                        "saga_id": plan.saga_id,
                        "code": answer[0],
                        "message": answer[1],
                    }
                )
        if plan.conflict:
            await self._check_conflict(plan)
        if plan.cancel:
            await asyncio.sleep(self.rng.uniform(0.0, 0.3))
            await self._cancel(plan)

    async def _create_until_answered(
        self, request: cpb.CreateSagaRequest, first_timeout: float = 3.0
    ) -> cpb.CreateSagaResponse | tuple[str, str]:
        """CreateSaga until answered, each attempt to the next replica."""
        timeout = first_timeout
        while True:
            self.stats.create_requests += 1
            try:
                return await self._stub().CreateSaga(request, timeout=timeout)
            except grpc.aio.AioRpcError as error:
                if error.code() not in self._retried:
                    return (error.code().name, error.details() or "")
                if error.code() is grpc.StatusCode.ABORTED:
                    self.stats.aborted_retries += 1
            self.stats.create_retries += 1
            timeout = 3.0
            await asyncio.sleep(self.rng.uniform(0.02, 0.2))

    async def _check_conflict(self, plan: SagaPlan) -> None:
        request = cpb.CreateSagaRequest(
            saga_id=plan.saga_id, definition=DEFINITION, input=plan.conflicting_payload()
        )
        answer = await self._create_until_answered(request)
        code = "OK" if isinstance(answer, cpb.CreateSagaResponse) else answer[0]
        self.stats.conflicts_checked += 1
        if code != "ALREADY_EXISTS":
            self._log({"kind": "conflict", "saga_id": plan.saga_id, "code": code})

    async def _cancel(self, plan: SagaPlan) -> None:
        request = cpb.CancelSagaRequest(name=f"sagas/{plan.saga_id}", reason="torture")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                await self._stub().CancelSaga(request, timeout=3.0)
                code = "OK"
            except grpc.aio.AioRpcError as error:
                if error.code() in self._retried:
                    if error.code() is grpc.StatusCode.ABORTED:
                        self.stats.aborted_retries += 1
                    await asyncio.sleep(self.rng.uniform(0.02, 0.2))
                    continue
                code = error.code().name
            self.stats.cancels[code] += 1
            if code not in ("OK", "FAILED_PRECONDITION"):
                self._log(
                    {"kind": "error", "saga_id": plan.saga_id, "code": code, "message": "cancel"}
                )
            return
        self.stats.cancels["GAVE_UP"] += 1


async def run_torture(settings: TortureSettings) -> TortureReport:
    """One torture run; see the module docstring."""
    return await Torture(settings).run()


def new_seed() -> int:
    """A fresh seed for a run."""
    return random.SystemRandom().randrange(1, 2**31)


def temporary_workdir(seed: int) -> Path:
    """A fresh directory for a run's files."""
    return Path(tempfile.mkdtemp(prefix=f"torture-{seed}-"))
