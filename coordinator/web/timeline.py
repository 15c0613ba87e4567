"""A saga's timeline: one lane per step, one bar per attempt, laid out for an SVG.

An attempt's bar runs from the saga's previous event (when the call could leave, at the
earliest) to the event that recorded its answer; the saga sends one call at a time, so bars
never overlap. Forward calls and compensations have their own classes, and so do refusals,
failures and the operators' marks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from saga_sdk.model import Saga, SagaEvent, SagaEventType, SagaState

WIDTH = 960
"""Width of the drawing area, in SVG units (the SVG scales to the page)."""
LABEL_WIDTH = 150
LANE_HEIGHT = 28
BAR_HEIGHT = 16
MAX_BARS_PER_LANE = 240
"""A lane with more attempts draws the first and last halves and one band for the rest."""

_BAR_CLASS = {
    SagaEventType.STEP_SUCCEEDED: ("execute", "ok"),
    SagaEventType.STEP_REJECTED: ("execute", "rejected"),
    SagaEventType.STEP_ATTEMPT_FAILED: ("execute", "failed"),
    SagaEventType.STEP_FAILED: ("execute", "failed"),
    SagaEventType.COMPENSATION_SUCCEEDED: ("compensate", "ok"),
    SagaEventType.COMPENSATION_ATTEMPT_FAILED: ("compensate", "failed"),
    SagaEventType.COMPENSATION_FAILED: ("compensate", "failed"),
    SagaEventType.STEP_COMPLETED: ("execute", "operator"),
    SagaEventType.STEP_MARKED_COMPENSATED: ("compensate", "operator"),
}
FAILURE_EVENTS = frozenset(
    {
        SagaEventType.STEP_REJECTED,
        SagaEventType.STEP_ATTEMPT_FAILED,
        SagaEventType.STEP_FAILED,
        SagaEventType.COMPENSATION_ATTEMPT_FAILED,
        SagaEventType.COMPENSATION_FAILED,
        SagaEventType.DEADLINE_EXCEEDED,
    }
)
"""The events the log's failures-only filter keeps."""


@dataclass(frozen=True)
class Bar:
    """One attempt on the drawing."""

    x: float
    width: float
    operation: str
    """"execute" or "compensate"."""
    outcome: str
    """"ok", "rejected", "failed", "operator" or "running"."""
    title: str
    anchor: str
    """The id of the attempt's row in the attempts table ("" when it has none)."""


@dataclass(frozen=True)
class Band:
    """Attempts too many to draw one by one."""

    x: float
    width: float
    count: int


@dataclass
class Lane:
    """One step's row."""

    step: str
    y: float
    bars: list[Bar] = field(default_factory=list)
    bands: list[Band] = field(default_factory=list)


@dataclass(frozen=True)
class Tick:
    """A time mark on the axis."""

    x: float
    label: str


@dataclass(frozen=True)
class Timeline:
    """What the SVG draws."""

    lanes: tuple[Lane, ...]
    ticks: tuple[Tick, ...]
    width: int
    height: int
    label_width: int
    bar_height: int
    span: str
    """The time the drawing covers, for people."""
    truncated: bool
    """Whether only the start of a longer log is drawn."""


def duration_text(value: timedelta | None) -> str:
    """A duration for people: 850 ms, 12.4 s, 3 min 20 s, 2 h 5 min, 3 d 4 h."""
    if value is None:
        return ""
    seconds = value.total_seconds()
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, second = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {second} s"
    hours, minute = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minute} min"
    days, hour = divmod(hours, 24)
    return f"{days} d {hour} h"


def attempt_title(event: SagaEvent) -> str:
    """A bar's tooltip: the step, the call, its attempt and outcome."""
    text = f"{event.step} {event.operation or ''} {event.action} attempt {event.attempt}: "
    text += event.type.value.replace("_", " ").lower()
    if event.failure is not None:
        text += f" ({event.failure.code} {event.failure.reason}: {event.failure.message})"
    if event.reason:
        text += f" ({event.actor}: {event.reason})"
    return " ".join(text.split())


def build_timeline(
    saga: Saga, events: Sequence[SagaEvent], now: datetime, *, truncated: bool = False
) -> Timeline:
    """Lay out the saga's attempts from its event log (oldest first)."""
    begin = saga.create_time or (events[0].time if events and events[0].time else now)
    end = saga.end_time or (events[-1].time if truncated and events[-1].time else now)
    if end <= begin:
        end = begin + timedelta(milliseconds=1)
    total = (end - begin).total_seconds()
    plot = WIDTH - LABEL_WIDTH

    def x_of(moment: datetime) -> float:
        return LABEL_WIDTH + max(0.0, min(1.0, (moment - begin).total_seconds() / total)) * plot

    lanes = {
        step.name: Lane(step.name, 24 + index * LANE_HEIGHT)
        for index, step in enumerate(saga.steps)
    }
    attempts: dict[str, list[Bar]] = {name: [] for name in lanes}
    previous = begin
    for event in events:
        at = event.time or previous
        kind = _BAR_CLASS.get(event.type)
        if kind is not None and event.step in lanes:
            start = x_of(previous)
            finish = x_of(at)
            attempts[event.step].append(
                Bar(
                    start,
                    max(2.0, finish - start),
                    kind[0],
                    kind[1],
                    attempt_title(event),
                    f"event-{event.sequence}",
                )
            )
        previous = at
    if not truncated and saga.state in (SagaState.RUNNING, SagaState.COMPENSATING):
        for step in saga.steps:
            if step.state.value in ("RUNNING", "COMPENSATING") and step.name in lanes:
                start = x_of(previous)
                operation = "execute" if step.state.value == "RUNNING" else "compensate"
                waiting = (
                    f"waiting until {step.next_attempt_time:%H:%M:%S} to try again"
                    if step.next_attempt_time
                    else "on its way"
                )
                attempts[step.name].append(
                    Bar(
                        start,
                        max(2.0, x_of(now) - start),
                        operation,
                        "running",
                        f"{step.name} {operation}: {waiting}",
                        "",
                    )
                )
    for name, bars in attempts.items():
        lane = lanes[name]
        if len(bars) <= MAX_BARS_PER_LANE:
            lane.bars = bars
            continue
        half = MAX_BARS_PER_LANE // 2
        first, middle, last = bars[:half], bars[half:-half], bars[-half:]
        lane.bars = [*first, *last]
        left = middle[0].x
        right = middle[-1].x + middle[-1].width
        lane.bands = [Band(left, max(2.0, right - left), len(middle))]
    ticks = tuple(
        Tick(LABEL_WIDTH + plot * i / 4, _tick_label(begin + (end - begin) * i / 4, total))
        for i in range(5)
    )
    return Timeline(
        lanes=tuple(lanes.values()),
        ticks=ticks,
        width=WIDTH,
        height=24 + LANE_HEIGHT * len(lanes) + 8,
        label_width=LABEL_WIDTH,
        bar_height=BAR_HEIGHT,
        span=duration_text(end - begin),
        truncated=truncated,
    )


def _tick_label(moment: datetime, total: float) -> str:
    if total < 10:
        return moment.strftime("%H:%M:%S.") + f"{moment.microsecond // 1000:03d}"
    if total < 2 * 86400:
        return moment.strftime("%H:%M:%S")
    return moment.strftime("%m-%d %H:%M")
