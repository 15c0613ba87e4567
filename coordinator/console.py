"""Sagas, their events and definitions rendered for people at a terminal."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from itertools import pairwise

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from saga_sdk.model import (
    AuditEntry,
    DefinitionSummary,
    DefinitionVersion,
    RetryPolicy,
    Saga,
    SagaChange,
    SagaCounts,
    SagaDefinition,
    SagaEvent,
    SagaEventType,
    SagaState,
    SagaUpdate,
    StepDefinition,
    StepKind,
    StepState,
)

SAGA_STYLE = {
    SagaState.UNSPECIFIED: "dim",
    SagaState.RUNNING: "cyan",
    SagaState.COMPENSATING: "yellow",
    SagaState.SUCCEEDED: "bold green",
    SagaState.COMPENSATED: "bold yellow",
    SagaState.NEEDS_ATTENTION: "bold red",
}
STEP_STYLE = {
    StepState.UNSPECIFIED: "dim",
    StepState.PENDING: "dim",
    StepState.RUNNING: "cyan",
    StepState.SUCCEEDED: "green",
    StepState.REJECTED: "red",
    StepState.FAILED: "red",
    StepState.COMPENSATING: "yellow",
    StepState.COMPENSATED: "yellow",
    StepState.SKIPPED: "dim",
}
EVENT_STYLE = {
    SagaEventType.STEP_SUCCEEDED: "green",
    SagaEventType.STEP_REJECTED: "red",
    SagaEventType.STEP_ATTEMPT_FAILED: "red",
    SagaEventType.STEP_FAILED: "red",
    SagaEventType.COMPENSATION_SUCCEEDED: "yellow",
    SagaEventType.COMPENSATION_ATTEMPT_FAILED: "red",
    SagaEventType.COMPENSATION_FAILED: "bold red",
    SagaEventType.DEADLINE_EXCEEDED: "bold red",
}
OPERATOR_STYLE = "magenta"


def _payload(data: bytes | None, limit: int = 60) -> str:
    if data is None:
        return ""
    try:
        text = json.dumps(json.loads(data), separators=(",", ":"))
    except (ValueError, UnicodeDecodeError):
        text = f"<{len(data)} bytes>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _duration(start: datetime | None, end: datetime | None) -> str:
    if start is None or end is None:
        return ""
    return f"{(end - start).total_seconds() * 1000:.0f} ms"


def timestamp(value: datetime | None) -> str:
    """A time as people read it in a log: UTC, to the millisecond."""
    if value is None:
        return ""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def span(value: timedelta | None) -> str:
    """A duration in the units the definition files use: 500ms, 2s, 1m30s, 2h, 30d."""
    if value is None:
        return ""
    total = value.total_seconds()
    if total < 1 and total != 0:
        return f"{total * 1000:g}ms"
    parts = []
    seconds = int(total)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    fraction = total - int(total)
    if seconds or fraction or not parts:
        parts.append(f"{seconds + fraction:g}s")
    return "".join(parts)


def what(event_type: SagaEventType) -> str:
    """An event type as words: STEP_SUCCEEDED -> "step succeeded"."""
    return event_type.value.lower().replace("_", " ")


def _audit_table(audit: Sequence[AuditEntry]) -> Table:
    table = Table(box=None, pad_edge=False, title="audit", title_justify="left")
    for column in ("#", "time", "actor", "action", "step", "reason"):
        table.add_column(column, no_wrap=column != "reason")
    for entry in audit:
        table.add_row(
            str(entry.sequence),
            timestamp(entry.time),
            entry.actor or "unknown",
            Text(entry.action.value.lower().replace("_", " "), style=OPERATOR_STYLE),
            entry.step,
            entry.reason,
        )
    return table


def emitted_events(events: Iterable[SagaEvent]) -> dict[str, str]:
    """Step name -> the named event its success stood for, for the steps that succeeded (or
    that an operator completed)."""
    return {event.step: event.emits for event in events if event.emits}


def saga_panel(saga: Saga, events: Iterable[SagaEvent] = ()) -> Panel:
    """The saga as a panel: its steps, their attempts and outputs, how it ended, its labels
    and its audit trail.

    Given the saga's events, each step that succeeded also names the event its success stood
    for (e.g. UserCreated), even if it was compensated since."""
    emitted = emitted_events(events)
    table = Table(box=None, pad_edge=False, expand=False)
    table.add_column("#", no_wrap=True)
    table.add_column("step", no_wrap=True)
    table.add_column("participant", no_wrap=True)
    table.add_column("state", no_wrap=True)
    if emitted:
        table.add_column("event", no_wrap=True)
    table.add_column("exec/comp", no_wrap=True, justify="right")
    table.add_column("output or failure", overflow="ellipsis", no_wrap=True, max_width=36)
    for index, step in enumerate(saga.steps, start=1):
        kind = "" if step.kind.value == "COMPENSATABLE" else f" ({step.kind.value.lower()})"
        detail = Text(_payload(step.output, limit=36))
        if step.failure is not None and not step.output:
            detail = Text(step.failure.reason or step.failure.code, style="red")
        state = Text(step.state.value, style=STEP_STYLE[step.state])
        if step.by_operator:
            state.append(" by operator", style=OPERATOR_STYLE)
        cells: list[Text | str] = [str(index), step.name + kind, step.participant, state]
        if emitted:
            cells.append(Text(emitted.get(step.name, ""), style="green"))
        cells += [f"{step.execute_attempts}/{step.compensate_attempts}", detail]
        table.add_row(*cells)
    ending = Text.assemble(
        ("saga ", ""),
        (saga.saga_id, "bold"),
        (f" ({saga.definition} v{saga.definition_version}) ", "dim"),
        (saga.state.value, SAGA_STYLE[saga.state]),
    )
    lines: list[Text | Table] = [ending]
    took = _duration(saga.create_time, saga.end_time)
    if took:
        lines.append(Text(f"took {took}, {saga.version} events", style="dim"))
    if saga.labels:
        lines.append(
            Text("labels: " + ", ".join(f"{k}={v}" for k, v in saga.labels.items()), style="dim")
        )
    if saga.deadline_time is not None and saga.end_time is None:
        lines.append(Text(f"deadline: {timestamp(saga.deadline_time)}", style="dim"))
    if saga.failure is not None:
        lines.append(
            Text(
                f"because {saga.failure.step or 'the saga'} ({saga.failure.operation}) "
                f"{saga.failure.reason}: {saga.failure.message}",
                style=SAGA_STYLE[saga.state],
            )
        )
    if saga.cancel_reason:
        lines.append(Text(f"cancelled: {saga.cancel_reason}", style="yellow"))
    lines.append(table)
    if saga.audit:
        lines.append(_audit_table(saga.audit))
    return Panel(Group(*lines), expand=False)


def _event_detail(event: SagaEvent) -> Text:
    parts: list[Text] = []
    if event.type.by_operator:
        who = f"by {event.actor or 'unknown'}" + (f": {event.reason}" if event.reason else "")
        parts.append(Text(who, style=OPERATOR_STYLE))
    failure = event.failure
    if failure is not None and not event.type.by_operator:
        # A participant without an ErrorInfo of its own has its code as the reason: say it once.
        reason = "" if failure.reason == failure.code else failure.reason
        text = " ".join(part for part in (failure.code, reason) if part)
        if failure.message:
            text += f": {failure.message}"
        parts.append(Text(text, style="red"))
    if event.emits:
        parts.append(Text(f"emits {event.emits}", style="green"))
    return Text("  ").join(parts)


def event_lines(events: Iterable[SagaEvent]) -> list[Text]:
    """One aligned line per event: sequence, time, what happened, the step, the action or
    compensation sent, the attempt, and the failure, or who acted and why."""
    events = list(events)
    if not events:
        return []
    width_seq = max(len(str(e.sequence)) for e in events) + 1
    width_what = max(len(what(e.type)) for e in events)
    width_step = max(len(e.step) for e in events)
    width_action = max(len(e.action) for e in events)
    lines = []
    for event in events:
        attempt = f"attempt {event.attempt}" if event.attempt else ""
        line = Text.assemble(
            (f"#{event.sequence}".ljust(width_seq + 1), "dim"),
            (timestamp(event.time) + "  ", "dim"),
            (
                what(event.type).ljust(width_what),
                OPERATOR_STYLE if event.type.by_operator else EVENT_STYLE.get(event.type, ""),
            ),
            ("  " + event.step.ljust(width_step), "bold"),
            ("  " + event.action.ljust(width_action), "cyan"),
            ("  " + attempt.ljust(10) + "  ", "dim"),
        )
        line.append_text(_event_detail(event))
        line.rstrip()
        lines.append(line)
    return lines


def update_line(update: SagaUpdate) -> Text:
    """One watched change as a line, naming the action or compensation sent and, on a step's
    success, the event it stands for: "#2 step succeeded create-user CreateUser attempt 1,
    emits UserCreated -> RUNNING"."""
    event = update.event
    saga = update.saga
    if event is None:
        return Text(f"{saga.saga_id}: {saga.state.value} (version {saga.version})")
    return _event_text(event, saga.state)


def change_line(change: SagaChange) -> Text:
    """One change of the change feed: its position and saga, then the change as a watch tells
    it: "@42 acme-corp onboard-corporate-client v1 #2 step succeeded create-user ..."."""
    head = Text.assemble(
        (f"@{change.position} ", "dim"),
        (change.saga_id, "bold"),
        (f" {change.definition} v{change.definition_version} ", "dim"),
    )
    head.append_text(_event_text(change.event, change.state))
    return head


def _event_text(event: SagaEvent, state: SagaState) -> Text:
    where = f" {event.step}" if event.step else ""
    action = f" {event.action}" if event.action else ""
    emits = f", emits {event.emits}" if event.emits else ""
    attempt = f" attempt {event.attempt}" if event.attempt else ""
    failure = ""
    if event.failure is not None and (event.failure.reason or event.failure.message):
        failure = f" ({event.failure.code or ''} {event.failure.reason}: {event.failure.message})"
    operator = ""
    if event.type.by_operator:
        operator = f" by {event.actor or 'unknown'}" + (f": {event.reason}" if event.reason else "")
    return Text.assemble(
        (f"#{event.sequence} ", "dim"),
        (what(event.type), ""),
        (where, "bold"),
        (action, "cyan"),
        (attempt, "dim"),
        (emits, "green"),
        (failure, "red" if failure else ""),
        (operator, OPERATOR_STYLE),
        (" -> ", "dim"),
        (state.value, SAGA_STYLE.get(state, "")),
    )


def counts_table(counts: SagaCounts) -> Table:
    """Sagas per state, NEEDS_ATTENTION first, and the total."""
    table = Table("state", "sagas", box=None, pad_edge=False)
    table.columns[1].justify = "right"
    order = sorted(counts.counts, key=lambda s: s is not SagaState.NEEDS_ATTENTION)
    for state in order:
        table.add_row(Text(state.value, style=SAGA_STYLE[state]), str(counts.counts[state]))
    table.add_row(Text("total", style="bold"), Text(str(counts.total), style="bold"))
    return table


def retry_text(policy: RetryPolicy | None) -> str:
    """A retry policy in a few words: "3× 10ms..50ms" (attempts, then the backoff's bounds);
    "" for none. The multiplier and jitter are left to ``--output json``."""
    if policy is None:
        return ""
    parts = []
    if policy.max_attempts:
        parts.append(f"{policy.max_attempts}×")
    if policy.initial_backoff is not None or policy.max_backoff is not None:
        parts.append(f"{span(policy.initial_backoff) or '?'}..{span(policy.max_backoff) or '?'}")
    return " ".join(parts) or "defaults"


def _step_name(step: StepDefinition) -> Text:
    if step.kind is StepKind.PIVOT:
        return Text.assemble(step.name, (" (pivot)", "bold magenta"))
    if step.kind is StepKind.RETRIABLE:
        return Text.assemble(step.name, (" (retriable)", "cyan"))
    return Text(step.name)


def versions_table(name: str, versions: Sequence[DefinitionVersion], *, current: int = 0) -> Table:
    """A definition's versions: steps, unfinished sagas, registration time and digest."""
    table = Table(box=None, pad_edge=False)
    for column in ("definition", "version", "steps", "unfinished sagas", "registered", "digest"):
        table.add_column(column, no_wrap=True)
    for info in versions:
        marker = " *" if info.version == current else ""
        table.add_row(
            name,
            f"v{info.version}{marker}",
            str(info.step_count),
            Text(str(info.unfinished_sagas), style="bold" if info.unfinished_sagas else "dim"),
            timestamp(info.register_time),
            info.digest[:12],
        )
    return table


def definitions_table(summaries: Sequence[DefinitionSummary]) -> Table:
    """Every definition, one row per version, with its unfinished sagas."""
    table = Table(box=None, pad_edge=False)
    for column in ("definition", "version", "steps", "unfinished sagas", "registered", "about"):
        table.add_column(column, no_wrap=column != "about", overflow="ellipsis")
    for summary in summaries:
        newest = summary.newest
        for info in summary.versions:
            table.add_row(
                summary.name,
                f"v{info.version}",
                str(info.step_count),
                Text(str(info.unfinished_sagas), style="bold" if info.unfinished_sagas else "dim"),
                timestamp(info.register_time),
                summary.description if newest is not None and info is newest else "",
            )
    return table


def definition_view(
    definition: SagaDefinition, versions: Sequence[DefinitionVersion] = ()
) -> Group:
    """A definition: its steps, their kinds, actions, compensations, timeouts and retry
    policies, then its registered versions with their unfinished sagas."""
    header = Text.assemble(
        ("definition ", ""), (definition.name, "bold"), (f" v{definition.version}", "dim")
    )
    lines: list[Text | Table] = [header]
    if definition.description:
        lines.append(Text(definition.description, style="italic"))
    settings = []
    if definition.deadline is not None:
        settings.append(f"deadline {span(definition.deadline)}")
    if definition.retry is not None:
        settings.append(f"retry {retry_text(definition.retry)}")
    if definition.compensation_retry is not None:
        settings.append(f"compensation retry {retry_text(definition.compensation_retry)}")
    if settings:
        lines.append(Text("; ".join(settings), style="dim"))
    columns = ["step", "participant", "action", "compensation", "timeout", "retry"]
    if any(step.max_attempts for step in definition.steps):
        columns.append("max attempts")
    if any(step.emits for step in definition.steps):
        columns.append("emits")
    table = Table(box=None, pad_edge=False)
    for column in columns:
        table.add_column(column, no_wrap=column != "retry")
    for step in definition.steps:
        row: list[Text | str] = [
            _step_name(step),
            step.participant,
            step.action,
            step.compensation,
            span(step.timeout),
            retry_text(step.retry),
        ]
        if "max attempts" in columns:
            row.append(str(step.max_attempts) if step.max_attempts else "")
        if "emits" in columns:
            row.append(step.emits)
        table.add_row(*row)
    lines.append(table)
    if versions:
        lines.append(Text(""))
        lines.append(versions_table(definition.name, versions, current=definition.version))
    return Group(*lines)


def _mermaid_text(text: str) -> str:
    return text.replace('"', "#quot;")


def definition_mermaid(definition: SagaDefinition) -> str:
    """A Mermaid flowchart of the definition: the steps in order, the pivot and the retriable
    steps marked, and each compensation drawn as a dotted edge going backwards."""
    ids = {step.name: f"s{index}" for index, step in enumerate(definition.steps, start=1)}
    lines = [
        "flowchart LR",
        f"    %% {definition.name} v{definition.version}",
        "    start([start])",
    ]
    for step in definition.steps:
        label = [step.name, f"{step.participant}: {step.action}"]
        if step.kind is StepKind.PIVOT:
            label.append("pivot")
        elif step.kind is StepKind.RETRIABLE:
            label.append("retriable")
        if step.max_attempts:
            label.append(f"max {step.max_attempts} attempts")
        if step.emits:
            label.append(f"emits {step.emits}")
        text = _mermaid_text("<br/>".join(label))
        node = ids[step.name]
        if step.kind is StepKind.PIVOT:
            lines.append(f'    {node}{{{{"{text}"}}}}')
        elif step.kind is StepKind.RETRIABLE:
            lines.append(f'    {node}(["{text}"])')
        else:
            lines.append(f'    {node}["{text}"]')
    lines.append("    succeeded([succeeded])")
    compensatable = any(s.compensation for s in definition.steps)
    if compensatable:
        lines.append("    compensated([compensated])")
    order = ["start", *(ids[s.name] for s in definition.steps), "succeeded"]
    lines.extend(f"    {a} --> {b}" for a, b in pairwise(order))
    for index, step in enumerate(definition.steps):
        before = ids[definition.steps[index - 1].name] if index else "compensated"
        node = ids[step.name]
        if step.compensation:
            lines.append(f'    {node} -.->|"{_mermaid_text(step.compensation)}"| {before}')
        elif step.kind is StepKind.PIVOT and index and compensatable:
            lines.append(f'    {node} -.->|"rejected"| {before}')
    pivots = [ids[s.name] for s in definition.steps if s.kind is StepKind.PIVOT]
    retriable = [ids[s.name] for s in definition.steps if s.kind is StepKind.RETRIABLE]
    if pivots:
        lines.append("    classDef pivot stroke-width:3px")
        lines.append(f"    class {','.join(pivots)} pivot")
    if retriable:
        lines.append("    classDef retriable stroke-dasharray:4 2")
        lines.append(f"    class {','.join(retriable)} retriable")
    return "\n".join(lines) + "\n"


def labels_text(labels: Mapping[str, str]) -> str:
    """Labels as k=v, comma-separated."""
    return ", ".join(f"{k}={v}" for k, v in labels.items())


def console() -> Console:
    """The console to print to: colour only on a terminal, 100 columns when not one."""
    terminal = Console(highlight=False)
    return terminal if terminal.is_terminal else Console(highlight=False, width=100)
