"""The torture report, as rich tables for people and as JSON for machines."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from coordinator.crashpoints import CrashPoint
from tests.torture.harness import TortureReport


def print_report(report: TortureReport, console: Console) -> None:
    """Print the figures that must be zero, then what the run did."""
    data = report.to_json()
    verdict = "[green]ALL GUARANTEES HELD[/]" if report.ok else "[red]GUARANTEES BROKEN[/]"
    guarantees = Table(title=f"Torture run, seed {report.seed}: {verdict}", title_justify="left")
    guarantees.add_column("must be 0")
    guarantees.add_column("count", justify="right")
    for name, value in data["must_be_zero"].items():
        style = "green" if value == 0 else "bold red"
        guarantees.add_row(name.replace("_", " "), f"[{style}]{value}[/]")
    console.print(guarantees)

    run = data["run"]
    checker = data["checker"]
    recovery = data["recovery_seconds"]
    facts = Table(title="What the run did", title_justify="left")
    facts.add_column("figure")
    facts.add_column("value", justify="right")
    rows: list[tuple[str, Any]] = [
        ("TLS on both hops (mTLS)", "yes" if data["tls"] else "no"),
        ("coordinator kills (SIGKILL)", data["coordinator_kills"]),
        *(
            (f"  at crash point {point.value}", run["crash_point_kills"][point.value])
            for point in CrashPoint
        ),
        ("  at random instants", run["random_kills"]),
        ("    of which before serving (mid-recovery)", run["kills_before_serving"]),
        ("  crash point armed, not reached in 5 s (killed)", run["crash_points_not_reached"]),
        *_replica_rows(data),
        ("participant kills (SIGKILL)", run["participant_kills"]),
        (
            "recovery to SERVING p50 / p95 / max (s)",
            f"{recovery['p50']} / {recovery['p95']} / {_round(recovery['max'])}",
        ),
        (
            "sagas submitted / acknowledged / stored",
            f"{run['sagas_submitted']} / {checker.get('sagas_acknowledged')} / "
            f"{checker.get('sagas_stored')}",
        ),
        ("sagas by state", _mapping(checker.get("sagas_by_state", {}))),
        (
            "CreateSaga requests / retried / concurrent duplicates",
            f"{run['create_requests']} / {run['create_retries']} / {run['duplicate_requests']}",
        ),
        ("conflicting creates checked", run["conflicts_checked"]),
        ("cancels", _mapping(run["cancels"])),
        ("deliveries / effects", f"{checker.get('deliveries')} / {checker.get('effects')}"),
        ("duplicate deliveries absorbed", checker.get("duplicate_deliveries_absorbed")),
        ("participant answers", _mapping(checker.get("participant_answers", {}))),
        (
            "participant peak calls in flight",
            _mapping(checker.get("participant_peak_calls_in_flight", {})),
        ),
        ("proxy faults (all links)", _mapping(_link_totals(data["links"]))),
        ("feed consumer kills (SIGKILL)", run["feed_consumer_kills"]),
        ("feed changes stored / delivered / seen again", _feed(checker.get("feed"))),
        ("fault / drain time (s)", f"{run['fault_seconds']:.1f} / {run['drain_seconds']:.1f}"),
        ("seed (replay with)", data["replay"]),
    ]
    for name, value in rows:
        facts.add_row(name, str(value))
    console.print(facts)
    for figure, examples in data["examples"].items():
        console.print(f"[red]{figure}[/]:")
        for example in examples:
            console.print(f"  {example}", markup=False)
    for exit_ in data["unexpected_exits"]:
        console.print(f"[red]unexpected exit[/]: {exit_}", markup=False)


def _replica_rows(data: dict[str, Any]) -> list[tuple[str, Any]]:
    """What several replicas on one store went through (nothing with one coordinator)."""
    if data["replicas"] == 1:
        return []
    run = data["run"]
    return [
        (
            "replicas on one store / lease",
            f"{data['replicas']} on {data['store']} / {data['lease']}",
        ),
        ("replica pauses (SIGSTOP, longer than the lease)", run["pauses"]),
        ("lease lapses found by the replicas", run["lease_lapses"]),
        ("stale writes refused (replicas' logs)", run["stale_writes"]),
        (
            "sagas claimed again / claims after creation",
            f"{run['sagas_claimed_again']} / {run['claims_after_creation']}",
        ),
        ("requests refused ABORTED, retried on the next replica", run["aborted_retries"]),
    ]


def _feed(feed: dict[str, int] | None) -> str:
    if feed is None:
        return "- (no consumer)"
    return (
        f"{feed['changes_stored']} / {feed['changes_delivered']} / "
        f"{feed['duplicates_after_restarts']} in {feed['consumer_lives']} lives"
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _mapping(values: dict[str, Any]) -> str:
    return ", ".join(f"{key} {value}" for key, value in values.items()) or "-"


def _link_totals(links: dict[str, dict[str, int]]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for stats in links.values():
        for key, value in stats.items():
            totals[key] = totals.get(key, 0) + value
    return totals
