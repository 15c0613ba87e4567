"""Sagas rendered for people at a terminal: a step table and a one-line ending."""

from __future__ import annotations

import json
from datetime import datetime

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from saga_sdk.model import Saga, SagaState, SagaUpdate, StepState

SAGA_STYLE = {
    SagaState.RUNNING: "cyan",
    SagaState.COMPENSATING: "yellow",
    SagaState.SUCCEEDED: "bold green",
    SagaState.COMPENSATED: "bold yellow",
    SagaState.NEEDS_ATTENTION: "bold red",
}
STEP_STYLE = {
    StepState.PENDING: "dim",
    StepState.RUNNING: "cyan",
    StepState.SUCCEEDED: "green",
    StepState.REJECTED: "red",
    StepState.FAILED: "red",
    StepState.COMPENSATING: "yellow",
    StepState.COMPENSATED: "yellow",
    StepState.SKIPPED: "dim",
}


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


def saga_panel(saga: Saga) -> Panel:
    """The saga as a panel: its steps, their attempts and outputs, and how it ended."""
    table = Table(box=None, pad_edge=False, expand=False)
    table.add_column("#", no_wrap=True)
    table.add_column("step", no_wrap=True)
    table.add_column("participant", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("exec/comp", no_wrap=True, justify="right")
    table.add_column("output or failure", overflow="ellipsis", no_wrap=True, max_width=36)
    for index, step in enumerate(saga.steps, start=1):
        kind = "" if step.kind.value == "COMPENSATABLE" else f" ({step.kind.value.lower()})"
        detail = Text(_payload(step.output, limit=36))
        if step.failure is not None and not step.output:
            detail = Text(step.failure.reason or step.failure.code, style="red")
        table.add_row(
            str(index),
            step.name + kind,
            step.participant,
            Text(step.state.value, style=STEP_STYLE[step.state]),
            f"{step.execute_attempts}/{step.compensate_attempts}",
            detail,
        )
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
    return Panel(Group(*lines), expand=False)


def update_line(update: SagaUpdate) -> Text:
    """One watched change as a line."""
    event = update.event
    saga = update.saga
    if event is None:
        return Text(f"{saga.saga_id}: {saga.state.value} (version {saga.version})")
    what = event.type.value.lower().replace("_", " ")
    where = f" {event.step}" if event.step else ""
    attempt = f" attempt {event.attempt}" if event.attempt else ""
    failure = ""
    if event.failure is not None and (event.failure.reason or event.failure.message):
        failure = f" ({event.failure.code or ''} {event.failure.reason}: {event.failure.message})"
    return Text.assemble(
        (f"#{event.sequence} ", "dim"),
        (what, ""),
        (where, "bold"),
        (attempt, "dim"),
        (failure, "red" if failure else ""),
        (" -> ", "dim"),
        (saga.state.value, SAGA_STYLE[saga.state]),
    )


def console() -> Console:
    """The console to print to: colour only on a terminal, 100 columns when not one."""
    terminal = Console(highlight=False)
    return terminal if terminal.is_terminal else Console(highlight=False, width=100)
