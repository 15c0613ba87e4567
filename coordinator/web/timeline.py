"""A saga's timeline: one lane per step, one bar per attempt, laid out for an SVG.

An attempt's bar runs from the saga's previous event (when the call could leave, at the
earliest) to the event that recorded its answer; the saga sends one call at a time, so bars
never overlap. Forward calls and compensations have their own classes, and so do refusals,
failures and the operators' marks.

A long log is drawn from its two ends (its first and its last events, two reads however long
it is): the stretch between them is one gap across every lane, which says how many events it
holds and where to read them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from saga.v1 import saga_pb2

from saga_sdk.model import Saga, SagaEvent, SagaEventType, SagaState, event_from_proto

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
class Gap:
    """The events between a long log's two ends, not drawn one by one."""

    x: float
    width: float
    first: int
    """The sequence of the first event not read."""
    last: int
    """The sequence of the last event not read."""

    @property
    def count(self) -> int:
        """How many events the gap holds."""
        return self.last - self.first + 1


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
    gap: Gap | None
    """The middle of a long log, drawn from its two ends (None: every event is drawn)."""


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


def event_words(kind: SagaEventType) -> str:
    """An event type for people: STEP_ATTEMPT_FAILED is "step attempt failed"."""
    return kind.value.replace("_", " ").lower()


def attempt_title(event: SagaEvent) -> str:
    """A bar's tooltip: the step, the call, its attempt and outcome."""
    text = f"{event.step} {event.operation or ''} {event.action} attempt {event.attempt}: "
    text += event_words(event.type)
    if event.failure is not None:
        text += f" ({event.failure.code} {event.failure.reason}: {event.failure.message})"
    if event.reason:
        text += f" ({event.actor}: {event.reason})"
    return " ".join(text.split())


_TYPES = {
    number: SagaEventType(name.removeprefix("SAGA_EVENT_TYPE_"))
    for name, number in saga_pb2.SagaEventType.items()
    if name.removeprefix("SAGA_EVENT_TYPE_") in SagaEventType.__members__
}


def event_type(event: saga_pb2.SagaEvent) -> SagaEventType:
    """An event's type, read straight from its proto."""
    return _TYPES.get(event.type, SagaEventType.UNSPECIFIED)


def _seconds(event: saga_pb2.SagaEvent) -> float | None:
    if not event.HasField("time"):
        return None
    return event.time.seconds + event.time.nanos / 1e9


def build_timeline(
    saga: Saga,
    head: Sequence[saga_pb2.SagaEvent],
    now: datetime,
    *,
    tail: Sequence[saga_pb2.SagaEvent] = (),
    unread: int = 0,
) -> Timeline:
    """Lay out the saga's attempts from its event log (oldest first): `head` is the whole log,
    or its start when `unread` events lie between it and `tail`, the log's end.

    The log is read from its protos and only the bars drawn are converted (a saga retried
    thousands of times has thousands of events, and a lane draws at most MAX_BARS_PER_LANE).
    """
    events = [*head, *tail]
    first = _seconds(events[0]) if events else None
    begin_s = saga.create_time.timestamp() if saga.create_time else (first or now.timestamp())
    end_s = saga.end_time.timestamp() if saga.end_time else now.timestamp()
    end_s = max(end_s, begin_s + 0.001)
    total = end_s - begin_s
    plot = WIDTH - LABEL_WIDTH

    def x_of(moment: float) -> float:
        return LABEL_WIDTH + max(0.0, min(1.0, (moment - begin_s) / total)) * plot

    lanes = {
        step.name: Lane(step.name, 24 + index * LANE_HEIGHT)
        for index, step in enumerate(saga.steps)
    }
    # (x, width, operation, outcome, index of the event in the log) per lane, then Bars.
    spans: dict[str, list[tuple[float, float, str, str, int]]] = {name: [] for name in lanes}
    previous = begin_s
    gap: Gap | None = None
    for index, event in enumerate(events):
        at = _seconds(event) or previous
        if unread and tail and index == len(head):
            # The event before this one was not read: its bar starts where it ends.
            left = x_of(previous)
            gap = Gap(left, max(2.0, x_of(at) - left), event.sequence - unread, event.sequence - 1)
            previous = at
        kind = _BAR_CLASS.get(event_type(event))
        if kind is not None and event.step in lanes:
            start = x_of(previous)
            spans[event.step].append((start, max(2.0, x_of(at) - start), kind[0], kind[1], index))
        previous = at

    def bar(span: tuple[float, float, str, str, int]) -> Bar:
        event = event_from_proto(events[span[4]])
        return Bar(*span[:4], attempt_title(event), f"event-{event.sequence}")

    attempts: dict[str, list[Bar]] = {}
    for name, found in spans.items():
        if len(found) <= MAX_BARS_PER_LANE:
            attempts[name] = [bar(span) for span in found]
            continue
        half = MAX_BARS_PER_LANE // 2
        middle = found[half:-half]
        attempts[name] = [bar(span) for span in (*found[:half], *found[-half:])]
        # One band on each side of the gap: a band holds only attempts that were read.
        split = len(head) if gap is not None else len(events)
        sides = [
            [span for span in middle if span[4] < split],
            [span for span in middle if span[4] >= split],
        ]
        lanes[name].bands = [_band(side) for side in sides if side]
    if saga.state in (SagaState.RUNNING, SagaState.COMPENSATING):
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
                        max(2.0, x_of(now.timestamp()) - start),
                        operation,
                        "running",
                        f"{step.name} {operation}: {waiting}",
                        "",
                    )
                )
    begin = datetime.fromtimestamp(begin_s, UTC)
    end = datetime.fromtimestamp(end_s, UTC)
    for name, bars in attempts.items():
        lanes[name].bars = bars
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
        gap=gap,
    )


def _band(spans: Sequence[tuple[float, float, str, str, int]]) -> Band:
    left = spans[0][0]
    right = spans[-1][0] + spans[-1][1]
    return Band(left, max(2.0, right - left), len(spans))


def _tick_label(moment: datetime, total: float) -> str:
    if total < 10:
        return moment.strftime("%H:%M:%S.") + f"{moment.microsecond // 1000:03d}"
    if total < 2 * 86400:
        return moment.strftime("%H:%M:%S")
    return moment.strftime("%m-%d %H:%M")
