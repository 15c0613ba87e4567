"""The bench's figures for people (rich tables) and for machines (one JSON document)."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table

from coordinator.bench.shape import COORDINATOR, DIRECT, DURABLE, replicas_mode
from coordinator.bench.shape import COORDINATOR_OTLP as OTLP
from coordinator.console import console


def machine() -> dict[str, Any]:
    """The machine the figures were taken on."""
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "cpu": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def ratios(case: dict[str, Any]) -> dict[str, float | None]:
    """The coordinator against the floors of the same concurrency and variant."""
    coordinator, direct, durable = case[COORDINATOR], case[DIRECT], case[DURABLE]
    return {
        "coordinator_over_direct": _ratio(
            coordinator["sagas_per_second"], direct["sagas_per_second"]
        ),
        "coordinator_over_durable": _ratio(
            coordinator["sagas_per_second"], durable["sagas_per_second"]
        ),
        "coordinator_cpu_over_direct_client_cpu": _ratio(
            coordinator["cpu_ms_per_saga"]["coordinator"], direct["cpu_ms_per_saga"]["client"]
        ),
    }


def over_sqlite(replicas: dict[str, Any], sqlite: dict[str, Any]) -> dict[str, float | None]:
    """Replicas on PostgreSQL against the one coordinator on SQLite of the same case."""
    return {
        "sagas_per_second": _ratio(replicas["sagas_per_second"], sqlite["sagas_per_second"]),
        "coordinator_cpu": _ratio(
            replicas["cpu_ms_per_saga"]["coordinator"], sqlite["cpu_ms_per_saga"]["coordinator"]
        ),
    }


def document(
    *,
    settings: dict[str, Any],
    figures: dict[tuple[int, str, str], dict[str, Any]],
    mismatches: list[str],
) -> dict[str, Any]:
    """Every figure of the run, one entry per case (concurrency x variant in ``settings``)."""
    cases = []
    for concurrency in settings["concurrency"]:
        for variant in settings["variants"]:
            case: dict[str, Any] = {"concurrency": concurrency, "variant": variant}
            for mode in (COORDINATOR, OTLP, DIRECT, DURABLE):
                if (concurrency, variant, mode) in figures:
                    case[mode] = figures[(concurrency, variant, mode)]
            case["ratios"] = ratios(case)
            if "postgresql" in settings:
                case["postgresql"] = [
                    {
                        **figures[(concurrency, variant, replicas_mode(count))],
                        "over_sqlite": over_sqlite(
                            figures[(concurrency, variant, replicas_mode(count))], case[COORDINATOR]
                        ),
                    }
                    for count in settings["postgresql"]["replicas"]
                ]
            cases.append(case)
    return {
        "machine": machine(),
        "settings": settings,
        "cases": cases,
        "verified": not mismatches,
        "mismatches": mismatches,
    }


def _number(value: float | None, digits: int = 1) -> str:
    """A figure in few characters: fewer decimals as it grows, ``?`` when unknown."""
    if value is None:
        return "?"
    if abs(value) >= 1000:
        digits = 0
    elif abs(value) >= 100:
        digits = min(digits, 1)
    return f"{value:.{digits}f}"


def progress_line(case: str, figures: dict[str, Any]) -> str:
    """One line while the run goes on."""
    latency = figures["latency_ms"]
    verdict = "ok" if figures["verified"] else "MISMATCH"
    return (
        f"{case:<40} {figures['sagas_per_second']:9.1f} sagas/s  p50 {latency['p50']:7.2f} ms  "
        f"{verdict}"
    )


def _table(title: str, caption: str, *headers: str) -> Table:
    table = Table(
        title=title,
        caption=caption,
        title_justify="left",
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for header in headers:
        if header == "variant":
            table.add_column(header, min_width=len("compensating"), no_wrap=True)
        else:
            table.add_column(header, justify="right", min_width=len(header))
    return table


def render(report: dict[str, Any]) -> None:
    """The report as tables, on stdout."""
    out = console()
    settings, host = report["settings"], report["machine"]
    runs = "one run" if settings["repeat"] == 1 else f"medians of {settings['repeat']} runs"
    out.print(
        f"[bold]saga bench[/]: {settings['sagas']} four-step sagas per case, closed loop "
        f"({runs}, after {settings['warmup_sagas']} to warm up)"
    )
    out.print(
        f"machine: {host['cores']} cores ({host['usable_cores']} usable), "
        f"{host['cpu'] or 'unknown CPU'}, Python {host['python']}"
    )
    fsyncs = (
        f"fsyncs counted with {settings['fsyncs_counted_with']} (it slows the coordinator)"
        if settings["fsyncs_counted_with"]
        else f"fsyncs not counted ({settings['fsyncs_not_counted_because']})"
    )
    out.print(
        f"event loop: {settings['event_loop'] or 'the coordinator default'}; "
        f"SQLite synchronous={settings['synchronous']}; {fsyncs}"
    )
    out.print("the coordinator, the client and the participants each run in a process of their own")
    if settings["otlp_endpoint"]:
        out.print(
            f"+OTLP: the coordinator exports traces and metrics to {settings['otlp_endpoint']}"
        )

    out.print()
    table = _table(
        "Through the coordinator",
        "latency in ms; CPU in ms per saga, of each process; SQLite commits and fsyncs per saga",
        *("C", "variant", "sagas/s", "p50", "p95", "p99"),
        *("coord.", "client", "partic.", "commits", "fsyncs"),
    )
    for case in report["cases"]:
        for mode, label in ((COORDINATOR, case["variant"]), (OTLP, "+OTLP")):
            if mode not in case:
                continue
            figures = case[mode]
            latency, cpu = figures["latency_ms"], figures["cpu_ms_per_saga"]
            table.add_row(
                str(case["concurrency"]),
                label,
                _number(figures["sagas_per_second"]),
                _number(latency["p50"]),
                _number(latency["p95"]),
                _number(latency["p99"]),
                _number(cpu["coordinator"], 2),
                _number(cpu["client"], 2),
                _number(cpu["participants"], 2),
                _number(figures["commits_per_saga"], 2),
                _number(figures["fsyncs_per_saga"], 2),
            )
    out.print(table)
    out.print()
    floors = _table(
        "Floors: the same participant calls without a coordinator",
        "direct: the client calls the participants itself; durable: and commits one SQLite row "
        "per call;\ndirect, durable: sagas/s; p50 in ms; CPU: the client's ms per saga;\n"
        "÷direct, ÷durable: the coordinator's sagas/s over the floor's;\n"
        "CPU÷: the coordinator's CPU per saga over the direct client's",
        *("C", "variant", "direct", "p50", "CPU", "durable", "p50", "CPU"),
        *("÷direct", "÷durable", "CPU÷"),
    )
    for case in report["cases"]:
        direct, durable, ratio = case[DIRECT], case[DURABLE], case["ratios"]
        floors.add_row(
            str(case["concurrency"]),
            case["variant"],
            _number(direct["sagas_per_second"]),
            _number(direct["latency_ms"]["p50"]),
            _number(direct["cpu_ms_per_saga"]["client"], 2),
            _number(durable["sagas_per_second"]),
            _number(durable["latency_ms"]["p50"]),
            _number(durable["cpu_ms_per_saga"]["client"], 2),
            _number(ratio["coordinator_over_direct"], 2),
            _number(ratio["coordinator_over_durable"], 2),
            _number(ratio["coordinator_cpu_over_direct_client_cpu"], 1),
        )
    out.print(floors)
    if "postgresql" in settings:
        out.print()
        _render_replicas(report)
    if report["mismatches"]:
        out.print(f"[bold red]{len(report['mismatches'])} mismatches[/] (listed on stderr)")
    else:
        out.print("[green]verified[/]: every case made exactly the calls it should have")
    sys.stdout.flush()


def _render_replicas(report: dict[str, Any]) -> None:
    """The replicas on one PostgreSQL database, each case under its SQLite coordinator."""
    out = console()
    postgresql = report["settings"]["postgresql"]
    server = postgresql["settings"]
    where = postgresql["server"]
    out.print(
        f"PostgreSQL {postgresql['version'] or '?'}, {where}: "
        + ", ".join(f"{name}={value}" for name, value in sorted(server.items()))
    )
    out.print(
        "PG ×N: N saga serve replicas on one fresh database, the client's sagas spread over "
        "them round robin"
    )
    syncs = (
        "PG: the server's WAL syncs (pg_stat_wal)"
        if postgresql["wal_syncs_counted_with"]
        else "PG: not counted (no pg_stat_wal)"
    )
    server_cpu = (
        "PG: the PostgreSQL server's processes"
        if postgresql["server_cpu_counted"]
        else "PG: not read (a server the bench did not start)"
    )
    table = _table(
        "Replicas on one PostgreSQL database, against one coordinator on SQLite",
        "latency in ms; ÷SQLite: sagas/s over the SQLite coordinator's;\n"
        f"CPU ms per saga: coord. summed over the replicas; {server_cpu};\n"
        f"syncs per saga: SQLite: the coordinator's fsyncs; {syncs}",
        *("C", "variant", "store", "sagas/s", "÷SQLite", "p50", "p95", "p99"),
        *("coord.", "PG", "syncs"),
    )
    for case in report["cases"]:
        sqlite = case[COORDINATOR]
        rows = [("SQLite", sqlite, sqlite["fsyncs_per_saga"], 1.0, None)]
        rows.extend(
            (
                f"PG ×{replicas['replicas']}",
                replicas,
                replicas["wal_syncs_per_saga"],
                replicas["over_sqlite"]["sagas_per_second"],
                replicas["cpu_ms_per_saga"]["postgresql"],
            )
            for replicas in case["postgresql"]
        )
        for index, (label, figures, syncs_per_saga, speed, database_cpu) in enumerate(rows):
            latency = figures["latency_ms"]
            table.add_row(
                str(case["concurrency"]) if index == 0 else "",
                case["variant"] if index == 0 else "",
                label,
                _number(figures["sagas_per_second"]),
                _number(speed, 2),
                _number(latency["p50"]),
                _number(latency["p95"]),
                _number(latency["p99"]),
                _number(figures["cpu_ms_per_saga"]["coordinator"], 2),
                "" if index == 0 else _number(database_cpu, 2),
                _number(syncs_per_saga, 2),
            )
    out.print(table)
