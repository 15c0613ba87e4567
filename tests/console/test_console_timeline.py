"""A saga's timeline and attempts laid out from its log's protos: a whole log, and a long log
drawn from its two ends."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from saga.v1 import saga_pb2

from coordinator.web.timeline import LABEL_WIDTH, MAX_BARS_PER_LANE, WIDTH, build_timeline
from coordinator.web.views import ATTEMPTS_SHOWN, step_attempts
from saga_sdk.model import Saga, SagaState, StepKind, StepRun, StepState

T0 = datetime(2026, 5, 1, 12, tzinfo=UTC)
EVERY = timedelta(seconds=1)
TOTAL = 10_000
"""Events of the saga: created, 9,996 failed attempts of reserve, then its success, the refusal
of charge and the compensation of reserve failing for good."""


def _event(sequence: int) -> saga_pb2.SagaEvent:
    event = saga_pb2.SagaEvent(sequence=sequence)
    event.time.FromDatetime(T0 + EVERY * (sequence - 1))
    if sequence == 1:
        event.type = saga_pb2.SAGA_EVENT_TYPE_CREATED
        return event
    ending = {
        TOTAL - 2: ("reserve", "execute", saga_pb2.SAGA_EVENT_TYPE_STEP_SUCCEEDED),
        TOTAL - 1: ("charge", "execute", saga_pb2.SAGA_EVENT_TYPE_STEP_REJECTED),
        TOTAL: ("reserve", "compensate", saga_pb2.SAGA_EVENT_TYPE_COMPENSATION_FAILED),
    }
    step, operation, kind = ending.get(
        sequence, ("reserve", "execute", saga_pb2.SAGA_EVENT_TYPE_STEP_ATTEMPT_FAILED)
    )
    event.type, event.step, event.operation = kind, step, operation
    event.attempt = 1 if sequence == TOTAL else sequence - 1
    if kind != saga_pb2.SAGA_EVENT_TYPE_STEP_SUCCEEDED:
        event.failure.code, event.failure.reason = "UNAVAILABLE", "LEDGER_DOWN"
    return event


LOG = [_event(sequence) for sequence in range(1, TOTAL + 1)]


def _saga() -> Saga:
    def run(name: str, state: StepState, forward: int, back: int) -> StepRun:
        return StepRun(
            name, "p", StepKind.COMPENSATABLE, state, forward, back, None, None, T0, None, None
        )

    return Saga(
        saga_id="long-1",
        definition="long-haul",
        definition_version=1,
        state=SagaState.NEEDS_ATTENTION,
        input=b"",
        steps=(
            run("reserve", StepState.COMPENSATING, TOTAL - 3, 1),
            run("charge", StepState.FAILED, 1, 0),
        ),
        failure=None,
        cancel_reason="",
        create_time=T0,
        update_time=T0 + EVERY * (TOTAL - 1),
        end_time=None,
        version=TOTAL,
    )


NOW = T0 + EVERY * TOTAL


def _x(sequence: int) -> float:
    """Where the event ``sequence`` stands on the drawing."""
    return LABEL_WIDTH + (sequence - 1) / TOTAL * (WIDTH - LABEL_WIDTH)


def test_a_long_log_is_drawn_from_its_two_ends_with_the_gap_between_named() -> None:
    head, tail = LOG[:1000], LOG[-1000:]
    timeline = build_timeline(_saga(), head, NOW, tail=tail, unread=TOTAL - 2000)

    gap = timeline.gap
    assert gap is not None
    assert (gap.first, gap.last, gap.count) == (1001, 9000, 8000)
    assert abs(gap.x - _x(1000)) < 0.01
    assert abs(gap.x + gap.width - _x(9001)) < 0.01

    reserve, charge = timeline.lanes
    assert len(reserve.bars) == MAX_BARS_PER_LANE
    # The attempts read but not drawn one by one make one band on each side of the gap.
    assert [band.count for band in reserve.bands] == [999 - 120, 999 - 120]
    # (a bar is 2 units wide at the least, so the last one before the gap may overhang it)
    assert reserve.bands[0].x + reserve.bands[0].width <= gap.x + 2.0
    # The end of the log, where the saga got stuck, is drawn.
    last = reserve.bars[-1]
    assert (last.operation, last.outcome, last.anchor) == ("compensate", "failed", "event-10000")
    assert [(bar.outcome, bar.anchor) for bar in charge.bars] == [("rejected", "event-9999")]
    # The first event after the gap does not claim the gap as its own time.
    assert abs(reserve.bands[1].x - _x(9001)) < 0.01


def test_a_whole_log_has_no_gap_and_one_band_per_crowded_lane() -> None:
    timeline = build_timeline(_saga(), LOG, NOW)
    assert timeline.gap is None
    reserve, _ = timeline.lanes
    assert [band.count for band in reserve.bands] == [TOTAL - 2 - MAX_BARS_PER_LANE]
    assert reserve.bars[0].anchor == "event-2"
    assert reserve.bars[-1].anchor == "event-10000"
    # Two reads that meet (nothing unread between them) draw the same as one.
    assert build_timeline(_saga(), LOG[:1000], NOW, tail=LOG[1000:]) == timeline


def test_attempts_are_listed_from_both_ends_of_a_long_log() -> None:
    rows = step_attempts(_saga(), [*LOG[:1000], *LOG[-1000:]], NOW)
    reserve, charge = rows
    listed = [attempt.sequence for attempt in reserve.attempts]
    half = ATTEMPTS_SHOWN // 2
    # The first attempts, and the last ones (charge's refusal, 9999, is charge's own).
    assert listed == [*range(2, 2 + half), 9994, 9995, 9996, 9997, 9998, 10000]
    assert reserve.left_out == 999 + 999 - ATTEMPTS_SHOWN
    assert reserve.attempts[-1].operation == "compensate"
    assert [(a.sequence, a.outcome) for a in charge.attempts] == [(9999, "step rejected")]
