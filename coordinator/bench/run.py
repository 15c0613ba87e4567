"""The orchestrator of ``saga bench``: starts every process, takes the readings, checks each case.

The participants run in one process for the whole run; each coordinator case gets a fresh
coordinator process on a fresh SQLite file; each measurement gets a client process. While a
client measures, this process only waits for its answer, so the CPU time of each side is its
own: read from /proc for the coordinator and the participants, reported by the client itself.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml

from coordinator.bench import report
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
from coordinator.bench.shape import (
    COORDINATOR,
    COORDINATOR_OTLP,
    DIRECT,
    DURABLE,
    VARIANTS,
    definition,
)
from coordinator.bench.verify import mismatches


class BenchError(Exception):
    """A process of the bench did not do its part; the message says which and where its log is."""


@dataclass(frozen=True)
class Options:
    """What ``saga bench`` was asked to measure."""

    sagas: int = 2000
    concurrency: tuple[int, ...] = (1, 8, 32, 128)
    variants: tuple[str, ...] = VARIANTS
    repeat: int = 1
    synchronous: str = "FULL"
    output: str = "table"
    otlp_endpoint: str | None = None
    event_loop: str | None = None
    """The coordinator's ``event_loop`` setting; None leaves the coordinator's default."""
    fsyncs: bool = True
    """Count the coordinator's fsyncs by running it under strace, when strace is here."""
    warmup: int = 40


def _list_of(convert: Callable[[str], Any], allowed: tuple[str, ...] = ()) -> Callable[[str], Any]:
    def parse(value: str) -> tuple[Any, ...]:
        try:
            items = tuple(convert(item.strip()) for item in value.split(",") if item.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list: {value!r}"
            ) from None
        if not items or (allowed and not set(items) <= set(allowed)):
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {', '.join(allowed) or 'values'}: {value!r}"
            )
        return items

    return parse


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``saga bench``."""
    defaults = Options()
    parser.add_argument(
        "--sagas", type=_positive, default=defaults.sagas, help="sagas per case (default 2000)"
    )
    parser.add_argument(
        "--concurrency",
        type=_list_of(_positive),
        default=defaults.concurrency,
        metavar="C,C,...",
        help="sagas in flight, one case each (default 1,8,32,128)",
    )
    parser.add_argument(
        "--variant",
        dest="variants",
        type=_list_of(str, VARIANTS),
        default=defaults.variants,
        metavar="V,V",
        help="succeeding, compensating, or both (default both)",
    )
    parser.add_argument(
        "--repeat",
        type=_positive,
        default=defaults.repeat,
        metavar="K",
        help="run every case K times and report the medians (default 1)",
    )
    parser.add_argument("--synchronous", choices=("FULL", "NORMAL"), default="FULL")
    parser.add_argument("--output", choices=("table", "json"), default="table")
    parser.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        help="also run each case through a coordinator exporting traces and metrics here "
        "(a closed port measures what a collector that is down costs)",
    )
    parser.add_argument(
        "--event-loop",
        choices=("asyncio", "uvloop"),
        help="the coordinator's event loop (default: the coordinator's default, asyncio)",
    )
    parser.add_argument(
        "--fsyncs",
        action=argparse.BooleanOptionalAction,
        default=defaults.fsyncs,
        help="count the coordinator's fsyncs by running it under strace (default, when strace "
        "is installed); being traced slows the coordinator down, so --no-fsyncs gives the "
        "fastest figures",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=defaults.warmup,
        metavar="N",
        help="sagas each client runs before it is measured (default 40)",
    )


def options_from(args: argparse.Namespace) -> Options:
    """The options parsed by ``add_arguments``."""
    return Options(
        sagas=args.sagas,
        concurrency=tuple(args.concurrency),
        variants=tuple(args.variants),
        repeat=args.repeat,
        synchronous=args.synchronous,
        output=args.output,
        otlp_endpoint=args.otlp_endpoint,
        event_loop=args.event_loop,
        fsyncs=args.fsyncs,
        warmup=max(0, args.warmup),
    )


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


def _stop(process: subprocess.Popen[bytes], pid: int, timeout: float = 30) -> None:
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
        _stop(self.process, self.process.pid)


class Coordinator:
    """A fresh ``saga serve`` on a fresh SQLite file, under strace when it can count fsyncs."""

    def __init__(
        self,
        workdir: Path,
        addresses: dict[str, str],
        options: Options,
        extra: dict[str, object],
        strace: Strace | None,
    ) -> None:
        (workdir / "definitions").mkdir(parents=True)
        for variant in VARIANTS:
            spec = definition(variant)
            (workdir / "definitions" / f"{spec['name']}.yaml").write_text(yaml.safe_dump(spec))
        self.target = f"127.0.0.1:{free_port()}"
        metrics_port = free_port()
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        if options.event_loop is not None:
            extra = {"event_loop": options.event_loop, **extra}
        config = workdir / "saga.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "database": f"sqlite:///{workdir / 'saga.db'}",
                    "listen": self.target,
                    "definitions": "definitions",
                    "participants": addresses,
                    "synchronous": options.synchronous,
                    "log_level": "ERROR",
                    "shutdown_grace": 2.0,
                    "metrics_listen": f"127.0.0.1:{metrics_port}",
                    **extra,
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
        _stop(self.process, self.pid, timeout=60)


@dataclass(frozen=True)
class Reading:
    """The CPU seconds of the other processes at one instant."""

    participants_cpu: float
    coordinator_cpu: float | None


def _per_saga(
    before: float | None, after: float | None, sagas: int, scale: float = 1.0
) -> float | None:
    if before is None or after is None:
        return None
    return (after - before) * scale / sagas


def measure(
    mode: str,
    variant: str,
    concurrency: int,
    case: str,
    options: Options,
    workdir: Path,
    participants: Participants,
    coordinator: Coordinator | None,
) -> dict[str, Any]:
    """One measurement: a client process runs the case; the figures of its window."""
    workdir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "coordinator.bench.client",
        "--mode",
        COORDINATOR if coordinator is not None else mode,
        "--variant",
        variant,
        "--case",
        case,
        "--sagas",
        str(options.sagas),
        "--concurrency",
        str(concurrency),
        "--warmup",
        str(options.warmup),
        "--synchronous",
        options.synchronous,
    ]
    if coordinator is not None:
        command += ["--target", coordinator.target]
    else:
        command += [f"--participant={n}={a}" for n, a in participants.addresses.items()]
    if mode == DURABLE:
        command += ["--database", str(workdir / "journal.db")]
    log = workdir / "client.log"
    with log.open("wb") as stderr:
        client = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr
        )
    what = f"the {mode} client of {case}"
    reader = LineReader(client.stdout, what, log)
    try:
        if reader.line(300 + options.warmup) != "ready":
            raise BenchError(f"{what} did not say ready (see {log})")

        def read() -> Reading:
            return Reading(
                participants_cpu=cpu_seconds(participants.pid),
                coordinator_cpu=None if coordinator is None else cpu_seconds(coordinator.pid),
            )

        # Scrape before the CPU reading at the start and after it at the end, so that the
        # scrapes' own work falls outside the measured window.
        store_before = coordinator.store_counts() if coordinator else {}
        size_before = coordinator.trace_size() if coordinator else None
        before = read()
        assert client.stdin is not None
        client.stdin.write(b"go\n")
        client.stdin.flush()
        answer = reader.line(600 + options.sagas * 0.5)
        after = read()
        size_after = coordinator.trace_size() if coordinator else None
        store_after = coordinator.store_counts() if coordinator else {}
        client.wait(60)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    figures: dict[str, Any] = json.loads(answer)
    sagas = options.sagas
    commits = writes = fsyncs = None
    if coordinator is not None:
        commits = _per_saga(store_before.get(TRANSACTIONS), store_after.get(TRANSACTIONS), sagas)
        writes = _per_saga(store_before.get(WRITES), store_after.get(WRITES), sagas)
        syncs = coordinator.syncs_between(size_before, size_after)
        fsyncs = None if syncs is None else syncs / sagas
    return {
        "sagas_per_second": sagas / figures["elapsed_s"],
        "latency_ms": figures["latency_ms"],
        "cpu_ms_per_saga": {
            "coordinator": _per_saga(before.coordinator_cpu, after.coordinator_cpu, sagas, 1000),
            "client": figures["cpu_s"] * 1000 / sagas,
            "participants": _per_saga(before.participants_cpu, after.participants_cpu, sagas, 1000),
        },
        "commits_per_saga": commits,
        "writes_per_saga": writes,
        "fsyncs_per_saga": fsyncs,
        "elapsed_s": figures["elapsed_s"],
        "wrong_endings": figures["wrong"],
        "problems": figures["problems"],
        "warmup_wrong_endings": figures["warmup_wrong"],
    }


def _median(runs: list[Any]) -> Any:
    """The median of each figure over runs of the same case; None where one run has none."""
    first = runs[0]
    if isinstance(first, dict):
        return {key: _median([run[key] for run in runs]) for key in first}
    if isinstance(first, bool):
        return all(runs)
    if any(run is None for run in runs):
        return None
    return statistics.median(runs)


def _merged(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One case's figures over its runs: the medians, with every saga that ended wrong."""
    merged: dict[str, Any] = _median(runs)
    merged["wrong_endings"] = sum(run["wrong_endings"] for run in runs)
    merged["runs"] = len(runs)
    return merged


def _settings(options: Options, strace: Strace | None) -> dict[str, Any]:
    return {
        "sagas": options.sagas,
        "concurrency": list(options.concurrency),
        "variants": list(options.variants),
        "repeat": options.repeat,
        "synchronous": options.synchronous,
        "durable_floor": f"one commit per call, WAL, synchronous={options.synchronous}",
        "warmup_sagas": options.warmup,
        "otlp_endpoint": options.otlp_endpoint,
        "event_loop": options.event_loop,
        "fsyncs_counted_with": strace.label if strace is not None else None,
        "fsyncs_not_counted_because": None
        if strace is not None
        else ("--no-fsyncs" if not options.fsyncs else "strace is not available"),
    }


def _case(
    mode: str,
    variant: str,
    concurrency: int,
    case: str,
    options: Options,
    workdir: Path,
    participants: Participants,
    strace: Strace | None,
) -> tuple[dict[str, Any], list[str]]:
    """Measure one case, with a fresh coordinator when it goes through one; check its calls."""
    coordinator = None
    if mode in (COORDINATOR, COORDINATOR_OTLP):
        extra: dict[str, object] = {}
        if mode == COORDINATOR_OTLP:
            extra = {"otlp_endpoint": options.otlp_endpoint, "otlp_timeout": 1.0}
        coordinator = Coordinator(workdir, participants.addresses, options, extra, strace)
    try:
        figures = measure(
            mode, variant, concurrency, case, options, workdir, participants, coordinator
        )
    finally:
        if coordinator is not None:
            coordinator.stop()
    counted = participants.counts().get(case, {})
    wrong = mismatches(variant, options.sagas, counted, figures["wrong_endings"])
    wrong += [f"{n} sagas: {problem}" for problem, n in figures.pop("problems").items()]
    if figures.pop("warmup_wrong_endings"):
        wrong.append("sagas of the warm-up did not end as they should")
    figures["verified"] = not wrong
    return figures, wrong


def run(options: Options) -> dict[str, Any]:
    """Measure every case; the report's JSON document (with ``mismatches``, empty when right)."""
    strace = Strace.find() if options.fsyncs else None
    root = Path(tempfile.mkdtemp(prefix="saga-bench-"))
    modes = [DIRECT, DURABLE, COORDINATOR]
    if options.otlp_endpoint:
        modes.append(COORDINATOR_OTLP)
    runs: dict[tuple[int, str, str], list[dict[str, Any]]] = {}
    problems: list[str] = []
    participants = Participants(root)
    try:
        for repeat, concurrency, variant, mode in itertools.product(
            range(1, options.repeat + 1), options.concurrency, options.variants, modes
        ):
            case = f"r{repeat}-c{concurrency}-{variant}-{mode.replace('_', '-')}"
            figures, wrong = _case(
                mode, variant, concurrency, case, options, root / case, participants, strace
            )
            problems.extend(f"{case}: {line}" for line in wrong)
            runs.setdefault((concurrency, variant, mode), []).append(figures)
            print(report.progress_line(case, figures), file=sys.stderr, flush=True)
    finally:
        participants.stop()
    shutil.rmtree(root, ignore_errors=True)
    return report.document(
        settings=_settings(options, strace),
        figures={key: _merged(values) for key, values in runs.items()},
        mismatches=problems,
    )


def main(args: argparse.Namespace) -> int:
    """Run ``saga bench``; exit 1 when a case did not verify."""
    options = options_from(args)
    try:
        document = run(options)
    except BenchError as error:
        print(f"saga bench: {error}", file=sys.stderr)
        return 2
    if options.output == "json":
        print(json.dumps(document, indent=2))
    else:
        report.render(document)
    for line in document["mismatches"]:
        print(f"saga bench: MISMATCH {line}", file=sys.stderr)
    return 1 if document["mismatches"] else 0
