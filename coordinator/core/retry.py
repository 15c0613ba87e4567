"""Retry arithmetic: capped exponential backoff with deterministic jitter."""

from __future__ import annotations

import hashlib
import math
from datetime import timedelta

from coordinator.core.model import RetryPolicy

RETRY_AFTER_CAP = timedelta(hours=1)
"""The longest wait a participant's RetryInfo can impose beyond the step's own max_backoff."""


def jitter_fraction(key: str, attempt: int) -> float:
    """A number in [0, 1) drawn from the call's identity, so that replay decides the same."""
    digest = hashlib.blake2b(f"{key}#{attempt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def backoff(
    policy: RetryPolicy, attempt: int, key: str, retry_after: timedelta | None = None
) -> timedelta:
    """How long to wait after failed attempt number ``attempt`` (from 1) before the next one.

    The delay grows by ``multiplier`` per attempt up to ``max_backoff``; ``jitter`` takes a
    random share of it off so that retries from many sagas spread out. A participant's
    ``retry_after`` (gRPC RetryInfo) is a floor: we never retry sooner than it asked, up to
    ``max(max_backoff, RETRY_AFTER_CAP)``, so that no answer can park a saga for years.
    """
    initial = policy.initial_backoff.total_seconds()
    cap = policy.max_backoff.total_seconds()
    exponent = attempt - 1
    # Retry-forever steps reach large attempt numbers: stop the exponent once the delay has
    # reached the cap, so that the power cannot overflow and the growth is exact up to it.
    if policy.multiplier <= 1 or initial <= 0 or initial >= cap:
        exponent = min(exponent, 1)
    else:
        exponent = min(exponent, math.ceil(math.log(cap / initial, policy.multiplier)) + 1)
    capped = min(initial * policy.multiplier**exponent, cap)
    delay = timedelta(seconds=capped * (1.0 - policy.jitter * jitter_fraction(key, attempt)))
    if retry_after is not None and retry_after > delay:
        return min(retry_after, max(policy.max_backoff, RETRY_AFTER_CAP))
    return delay
