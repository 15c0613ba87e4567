"""Retry arithmetic: capped exponential backoff with deterministic jitter."""

from __future__ import annotations

import hashlib
from datetime import timedelta

from coordinator.core.model import RetryPolicy


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
    ``retry_after`` (gRPC RetryInfo) is a floor: we never retry sooner than it asked.
    """
    # Retry-forever steps reach large attempt numbers: bound the exponent, not just the result.
    growth = policy.multiplier ** min(attempt - 1, 64)
    base = policy.initial_backoff.total_seconds() * growth
    capped = min(base, policy.max_backoff.total_seconds())
    delay = timedelta(seconds=capped * (1.0 - policy.jitter * jitter_fraction(key, attempt)))
    if retry_after is not None and retry_after > delay:
        return retry_after
    return delay
