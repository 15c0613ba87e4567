"""What the participants must have seen of a case, and what differs from what they counted."""

from __future__ import annotations

from collections.abc import Mapping

from coordinator.bench.shape import (
    COMPENSATE,
    COMPENSATING,
    EXECUTE,
    REFUSED_STEP,
    SUCCEEDING,
    call_key,
    steps,
)


def expected_calls(variant: str, sagas: int) -> dict[str, int]:
    """Calls per participant, step and operation for ``sagas`` sagas of a variant.

    Succeeding: one Execute per step. Compensating: Executes of steps 1 to 3 (the third is
    refused), none of step 4, and a Compensate of steps 3, 2 and 1: the refused step is
    compensated too, as every step whose Execute was sent is.
    """
    calls: dict[str, int] = {}
    for index, step in enumerate(steps(variant)):
        sent = variant == SUCCEEDING or index <= REFUSED_STEP
        calls[call_key(step.participant, step.name, EXECUTE)] = sagas if sent else 0
        compensated = variant == COMPENSATING and sent
        calls[call_key(step.participant, step.name, COMPENSATE)] = sagas if compensated else 0
    return calls


def mismatches(
    variant: str, sagas: int, counted: Mapping[str, int], wrong_endings: int
) -> list[str]:
    """Every way a case differs from what it should have done; empty when it is right."""
    expected = expected_calls(variant, sagas)
    found = [
        f"{key}: {counted.get(key, 0)} calls, expected {calls}"
        for key, calls in expected.items()
        if counted.get(key, 0) != calls
    ]
    found.extend(
        f"{key}: {calls} calls, expected none"
        for key, calls in sorted(counted.items())
        if key not in expected and calls
    )
    if wrong_endings:
        found.append(f"{wrong_endings} of {sagas} sagas did not end as the variant should")
    return found
