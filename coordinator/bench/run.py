"""The orchestrator of ``saga bench``: starts every process, takes the readings, checks each case.

The participants run in one process for the whole run; each coordinator case gets a fresh
coordinator process on a fresh SQLite file; each measurement gets a client process. While a
client measures, this process only waits for its answer, so the CPU time of each side is its
own: read from /proc for the coordinator and the participants, reported by the client itself.

With a PostgreSQL server (``--database`` or ``--postgresql``), each concurrency and variant also
gets one case per replica count: that many coordinator processes on one fresh database, the
client's sagas spread over them, measured beside the SQLite coordinator of the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.bench import report
from coordinator.bench.measure import TRANSACTIONS, WRITES, Strace, cpu_seconds
from coordinator.bench.postgresql import SCHEMES, PostgreSQL, shown, throwaway_server
from coordinator.bench.processes import (
    BenchError,
    Coordinator,
    Coordinators,
    LineReader,
    Participants,
)
from coordinator.bench.shape import (
    COORDINATOR,
    COORDINATOR_OTLP,
    DIRECT,
    DURABLE,
    VARIANTS,
    replicas_mode,
)
from coordinator.bench.verify import mismatches

DEFAULT_REPLICAS = (1, 2, 3)
POOL_CONNECTIONS = 10
"""Connections one ``saga serve`` opens to PostgreSQL at most (its store's pool)."""
STATS_SETTLE = 1.2
"""Seconds to wait before reading PostgreSQL's statistics: its backends report them at most
once a second, and on going idle."""


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
    database: str | None = None
    """A PostgreSQL server (``postgresql://USER@HOST:PORT/DB``) to also run replicas on: each
    of their cases gets a fresh database created there, and dropped after."""
    start_postgresql: bool = False
    """Start a throwaway PostgreSQL server (durable defaults) to run the replicas on."""
    replicas: tuple[int, ...] = ()
    """The replica counts measured on PostgreSQL, one case each; empty without PostgreSQL."""

    @property
    def postgresql(self) -> bool:
        """Whether the replicas are measured too."""
        return self.database is not None or self.start_postgresql


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


def _postgresql_url(value: str) -> str:
    if not value.startswith(SCHEMES):
        raise argparse.ArgumentTypeError(
            f"expected postgresql://USER@HOST:PORT/DATABASE, got {shown(value)!r}"
        )
    return value


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
    server = parser.add_mutually_exclusive_group()
    server.add_argument(
        "--database",
        type=_postgresql_url,
        metavar="URL",
        help="also measure replicas sharing one PostgreSQL database, on the server at "
        "postgresql://USER@HOST:PORT/DATABASE: each of their cases gets a fresh database "
        "created there (the user needs CREATEDB) and dropped after",
    )
    server.add_argument(
        "--postgresql",
        dest="start_postgresql",
        action="store_true",
        help="as --database, on a throwaway PostgreSQL server the bench starts in a temporary "
        "directory, with PostgreSQL's durable defaults (fsync and synchronous_commit on)",
    )
    parser.add_argument(
        "--replicas",
        type=_list_of(_positive),
        metavar="N,N,...",
        help="with --database or --postgresql: the replica counts, one case each, beside the "
        "SQLite coordinator (default 1,2,3)",
    )


def options_from(args: argparse.Namespace) -> Options:
    """The options parsed by ``add_arguments``; BenchError for --replicas without PostgreSQL."""
    postgresql = args.database is not None or args.start_postgresql
    if args.replicas is not None and not postgresql:
        raise BenchError("--replicas needs --database postgresql://... or --postgresql")
    replicas = tuple(args.replicas or DEFAULT_REPLICAS) if postgresql else ()
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
        database=args.database,
        start_postgresql=args.start_postgresql,
        replicas=replicas,
    )


@dataclass(frozen=True)
class Reading:
    """The CPU seconds of the other processes at one instant."""

    participants_cpu: float
    each_coordinator_cpu: list[float] | None
    """Each coordinator process's (one, or each replica's); None without a coordinator."""
    postgresql_cpu: float | None = None
    """The PostgreSQL server's processes', when the bench started it."""

    @property
    def coordinator_cpu(self) -> float | None:
        """Summed over the coordinator processes."""
        return None if self.each_coordinator_cpu is None else sum(self.each_coordinator_cpu)


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
    coordinators: Coordinators | None,
    postgresql: PostgreSQL | None = None,
) -> dict[str, Any]:
    """One measurement: a client process runs the case; the figures of its window.

    ``postgresql``: the server the ``coordinators`` share a database of; its WAL syncs and
    (when known) its CPU time are read too.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "coordinator.bench.client",
        "--mode",
        COORDINATOR if coordinators is not None else mode,
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
    if coordinators is not None:
        command += [f"--target={target}" for target in coordinators.targets]
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
                each_coordinator_cpu=None if coordinators is None else coordinators.cpu_each(),
                postgresql_cpu=None if postgresql is None else postgresql.cpu_seconds(),
            )

        def wal_syncs() -> int | None:
            if postgresql is None:
                return None
            time.sleep(STATS_SETTLE)  # so that the counts of the warm-up, or the run, are in
            return postgresql.wal_syncs()

        # Scrape before the CPU reading at the start and after it at the end, so that the
        # scrapes' own work falls outside the measured window.
        wal_before = wal_syncs()
        store_before = coordinators.store_counts() if coordinators else {}
        sizes_before = coordinators.trace_sizes() if coordinators else []
        before = read()
        assert client.stdin is not None
        client.stdin.write(b"go\n")
        client.stdin.flush()
        answer = reader.line(600 + options.sagas * 0.5)
        after = read()
        sizes_after = coordinators.trace_sizes() if coordinators else []
        store_after = coordinators.store_counts() if coordinators else {}
        wal_after = wal_syncs()
        client.wait(60)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    figures: dict[str, Any] = json.loads(answer)
    sagas = options.sagas
    commits = writes = fsyncs = None
    if coordinators is not None:
        commits = _per_saga(store_before.get(TRANSACTIONS), store_after.get(TRANSACTIONS), sagas)
        writes = _per_saga(store_before.get(WRITES), store_after.get(WRITES), sagas)
        syncs = coordinators.syncs_between(sizes_before, sizes_after)
        fsyncs = None if syncs is None else syncs / sagas
    measured: dict[str, Any] = {
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
    if postgresql is not None and coordinators is not None:
        cpu = measured["cpu_ms_per_saga"]
        cpu["postgresql"] = _per_saga(before.postgresql_cpu, after.postgresql_cpu, sagas, 1000)
        assert before.each_coordinator_cpu is not None
        assert after.each_coordinator_cpu is not None
        cpu["each_replica"] = {
            member.name: _per_saga(start, end, sagas, 1000)
            for member, start, end in zip(
                coordinators.members,
                before.each_coordinator_cpu,
                after.each_coordinator_cpu,
                strict=True,
            )
        }
        measured["replicas"] = len(coordinators.members)
        measured["wal_syncs_per_saga"] = _per_saga(
            None if wal_before is None else float(wal_before),
            None if wal_after is None else float(wal_after),
            sagas,
        )
    return measured


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


def _settings(
    options: Options, strace: Strace | None, postgresql: PostgreSQL | None
) -> dict[str, Any]:
    settings: dict[str, Any] = {
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
    if postgresql is not None:
        facts = postgresql.facts()
        settings["postgresql"] = {
            "server": "started by the bench"
            if options.start_postgresql
            else shown(options.database or postgresql.url),
            "version": facts.pop("server_version", None),
            "settings": facts,
            "replicas": list(options.replicas),
            "spread": "round robin (each saga awaited where it was created)",
            "wal_syncs_counted_with": "pg_stat_wal (the whole server)"
            if postgresql.counts_wal_syncs
            else None,
            "server_cpu_counted": postgresql.pid is not None,
        }
    return settings


def _coordinator_settings(options: Options, extra: Mapping[str, object]) -> dict[str, object]:
    """What a coordinator of the bench is configured with, beyond its addresses."""
    settings: dict[str, object] = {"synchronous": options.synchronous}
    if options.event_loop is not None:
        settings["event_loop"] = options.event_loop
    return {**settings, **extra}


def _coordinators(
    mode: str,
    replicas: int,
    options: Options,
    workdir: Path,
    participants: Participants,
    strace: Strace | None,
    database: str | None,
) -> Coordinators | None:
    """The fresh coordinator processes of a case: none, one on SQLite, or replicas on
    ``database``, started one after another (each registers the definitions)."""
    if mode in (COORDINATOR, COORDINATOR_OTLP):
        extra: dict[str, object] = {}
        if mode == COORDINATOR_OTLP:
            extra = {"otlp_endpoint": options.otlp_endpoint, "otlp_timeout": 1.0}
        settings = _coordinator_settings(options, extra)
        return Coordinators([Coordinator(workdir, participants.addresses, settings, strace)])
    if not replicas:
        return None
    started: list[Coordinator] = []
    try:
        for number in range(1, replicas + 1):
            settings = _coordinator_settings(
                options, {"database": database, "replica": f"bench-{number}"}
            )
            started.append(
                Coordinator(workdir / f"replica-{number}", participants.addresses, settings, strace)
            )
    except BaseException:
        Coordinators(started).stop()
        raise
    return Coordinators(started)


def _case(
    mode: str,
    variant: str,
    concurrency: int,
    case: str,
    options: Options,
    workdir: Path,
    participants: Participants,
    strace: Strace | None,
    postgresql: PostgreSQL | None = None,
    replicas: int = 0,
) -> tuple[dict[str, Any], list[str]]:
    """Measure one case, with fresh coordinators when it goes through them; check its calls.

    ``replicas``: that many coordinators on a fresh database of ``postgresql``.
    """
    database = None
    if replicas:
        assert postgresql is not None
        database = postgresql.create_database()
    try:
        coordinators = _coordinators(
            mode, replicas, options, workdir, participants, strace, database
        )
        try:
            figures = measure(
                mode,
                variant,
                concurrency,
                case,
                options,
                workdir,
                participants,
                coordinators,
                postgresql if replicas else None,
            )
        finally:
            if coordinators is not None:
                coordinators.stop()
    finally:
        if database is not None and postgresql is not None:
            postgresql.drop_database(database)
    counted = participants.counts().get(case, {})
    wrong = mismatches(variant, options.sagas, counted, figures["wrong_endings"])
    wrong += [f"{n} sagas: {problem}" for problem, n in figures.pop("problems").items()]
    if figures.pop("warmup_wrong_endings"):
        wrong.append("sagas of the warm-up did not end as they should")
    figures["verified"] = not wrong
    return figures, wrong


@contextlib.contextmanager
def _postgresql(options: Options) -> Iterator[PostgreSQL | None]:
    """The PostgreSQL server of the replicas' cases: started here, or the one named; None
    without one."""
    if not options.postgresql:
        yield None
        return
    if options.database is not None:
        server = PostgreSQL(options.database)
        try:
            yield server
        finally:
            server.close()
        return
    most = max(options.replicas)
    with throwaway_server(max_connections=most * POOL_CONNECTIONS + 20) as started:
        server = PostgreSQL(started.url(), started.pid)
        try:
            yield server
        finally:
            server.close()


def run(options: Options) -> dict[str, Any]:
    """Measure every case; the report's JSON document (with ``mismatches``, empty when right)."""
    strace = Strace.find() if options.fsyncs else None
    root = Path(tempfile.mkdtemp(prefix="saga-bench-"))
    modes = [DIRECT, DURABLE, COORDINATOR]
    if options.otlp_endpoint:
        modes.append(COORDINATOR_OTLP)
    replicas_of = {replicas_mode(count): count for count in options.replicas}
    modes.extend(replicas_of)
    runs: dict[tuple[int, str, str], list[dict[str, Any]]] = {}
    problems: list[str] = []
    # The logs stay when the run fails: the error names the one to read.
    with _postgresql(options) as postgresql:
        settings = _settings(options, strace, postgresql)
        participants = Participants(root)
        try:
            for repeat, concurrency, variant, mode in itertools.product(
                range(1, options.repeat + 1), options.concurrency, options.variants, modes
            ):
                case = f"r{repeat}-c{concurrency}-{variant}-{mode.replace('_', '-')}"
                figures, wrong = _case(
                    mode,
                    variant,
                    concurrency,
                    case,
                    options,
                    root / case,
                    participants,
                    strace,
                    postgresql,
                    replicas_of.get(mode, 0),
                )
                problems.extend(f"{case}: {line}" for line in wrong)
                runs.setdefault((concurrency, variant, mode), []).append(figures)
                print(report.progress_line(case, figures), file=sys.stderr, flush=True)
        finally:
            participants.stop()
    shutil.rmtree(root, ignore_errors=True)
    return report.document(
        settings=settings,
        figures={key: _merged(values) for key, values in runs.items()},
        mismatches=problems,
    )


def main(args: argparse.Namespace) -> int:
    """Run ``saga bench``; exit 1 when a case did not verify, 2 when it could not run."""
    try:
        options = options_from(args)
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
