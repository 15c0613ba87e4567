"""Retry arithmetic: capped exponential backoff, deterministic jitter, RetryInfo as a floor."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.core.model import RetryPolicy
from coordinator.core.retry import RETRY_AFTER_CAP, backoff

KEY = "sagas/s-1/steps/card:execute"
STEADY = RetryPolicy(
    initial_backoff=timedelta(milliseconds=100),
    max_backoff=timedelta(seconds=10),
    multiplier=2.0,
    jitter=0.0,
)


def _unjittered(policy: RetryPolicy, attempt: int) -> float:
    """The delay in seconds before jitter, grown one attempt at a time so it cannot overflow."""
    delay = policy.initial_backoff.total_seconds()
    cap = policy.max_backoff.total_seconds()
    for _ in range(attempt - 1):
        if delay >= cap:
            break
        delay *= policy.multiplier
    return min(delay, cap)


@pytest.mark.parametrize(
    ("attempt", "delay"),
    [
        (1, timedelta(milliseconds=100)),
        (2, timedelta(milliseconds=200)),
        (3, timedelta(milliseconds=400)),
        (7, timedelta(milliseconds=6400)),
        (8, timedelta(seconds=10)),
        (50, timedelta(seconds=10)),
    ],
)
def test_backoff_grows_by_the_multiplier_up_to_max_backoff(attempt: int, delay: timedelta) -> None:
    assert backoff(STEADY, attempt, KEY) == delay


def test_backoff_keeps_growing_past_attempt_65_with_a_small_multiplier() -> None:
    gentle = RetryPolicy(
        initial_backoff=timedelta(milliseconds=100),
        max_backoff=timedelta(seconds=10),
        multiplier=1.05,
        jitter=0.0,
    )

    # 0.1 s * 1.05**79 = 4.72 s, still under the 10 s cap.
    assert backoff(gentle, 80, KEY) > backoff(gentle, 66, KEY) > backoff(gentle, 65, KEY)
    assert backoff(gentle, 80, KEY).total_seconds() == pytest.approx(0.1 * 1.05**79, abs=1e-6)


policies = st.builds(
    RetryPolicy,
    max_attempts=st.integers(1, 10),
    initial_backoff=st.integers(0, 5_000).map(lambda ms: timedelta(milliseconds=ms)),
    max_backoff=st.integers(5_000, 120_000).map(lambda ms: timedelta(milliseconds=ms)),
    # Gentle multipliers take many attempts to reach the cap: retry-forever steps get there.
    multiplier=st.one_of(st.floats(1.0, 1.1), st.floats(1.0, 10.0)),
    jitter=st.floats(0.0, 1.0),
)


@settings(max_examples=300, deadline=None)
@given(policy=policies, attempt=st.integers(1, 400), key=st.text(max_size=30))
def test_backoff_is_the_capped_exponential_less_at_most_its_jitter_share(
    policy: RetryPolicy, attempt: int, key: str
) -> None:
    delay = backoff(policy, attempt, key).total_seconds()
    full = _unjittered(policy, attempt)

    assert full * (1 - policy.jitter) - 1e-6 <= delay <= full + 1e-6


@settings(max_examples=200, deadline=None)
@given(policy=policies, attempt=st.integers(1, 400), key=st.text(max_size=30))
def test_backoff_is_the_same_for_the_same_key_and_attempt(
    policy: RetryPolicy, attempt: int, key: str
) -> None:
    assert backoff(policy, attempt, key) == backoff(policy, attempt, key)


def test_backoff_jitter_differs_between_calls() -> None:
    jittery = RetryPolicy(jitter=0.5)

    delays = {backoff(jittery, 3, f"sagas/s-{n}/steps/card:execute") for n in range(20)}

    assert len(delays) > 10


def test_backoff_honours_retry_after_as_a_floor() -> None:
    assert backoff(STEADY, 1, KEY, retry_after=timedelta(seconds=30)) == timedelta(seconds=30)
    assert backoff(STEADY, 3, KEY, retry_after=timedelta(milliseconds=1)) == timedelta(
        milliseconds=400
    )


@pytest.mark.parametrize("multiplier", [1.0, 1.5, 2.0, 10.0])
def test_backoff_does_not_overflow_for_a_step_retried_ten_thousand_times(multiplier: float) -> None:
    policy = RetryPolicy(
        initial_backoff=timedelta(milliseconds=100),
        max_backoff=timedelta(seconds=30),
        multiplier=multiplier,
        jitter=0.2,
    )

    delay = backoff(policy, 10_000, KEY)

    expected = _unjittered(policy, 10_000)
    assert expected * 0.8 - 1e-6 <= delay.total_seconds() <= expected + 1e-6


def test_a_participants_retry_after_is_capped_so_no_answer_parks_a_saga_for_years() -> None:
    policy = RetryPolicy(max_backoff=timedelta(seconds=10))

    delay = backoff(policy, 1, "key", retry_after=timedelta(days=365 * 9000))

    assert delay == RETRY_AFTER_CAP
    assert backoff(policy, 1, "key", retry_after=timedelta(minutes=5)) == timedelta(minutes=5)
