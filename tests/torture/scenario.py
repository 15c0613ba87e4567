"""The torture run's world, derived from the seed: the definition, each saga's plan, and the
misbehaviour every participant derives from the requests it receives.

Everything here is a pure function of the seed and of what it is asked about, so that the
participant processes (killed and restarted at any time), the harness and the offline checker
agree without talking to each other.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Any

DEFINITION = "torture"
PARTICIPANTS = ("p0", "p1", "p2")
STEPS = (("s0", "p0"), ("s1", "p1"), ("s2", "p2"), ("s3", "p0"))
"""(step, participant) in saga order; p0 serves two steps."""
STEP_NAMES = tuple(step for step, _ in STEPS)
ACTION = "Do"
COMPENSATION = "Undo"
STEP_TIMEOUT_MS = 300
"""The deadline of every call; the proxy holds answers past it to make calls time out."""
EXECUTE_ATTEMPTS = 6
"""Execute attempts before a step fails for good (and the saga compensates)."""
COMPENSATION_ATTEMPTS = 1_000_000
"""Practically unbounded: only a compensation marked as impossible may park a saga."""

REJECT_REASON = "TORTURE_REJECTED"
STUCK_REASON = "TORTURE_CANNOT_UNDO"


def definition() -> dict[str, Any]:
    """The saga definition of the run, as written to the coordinator's definitions folder."""
    return {
        "name": DEFINITION,
        "version": 1,
        "description": "Four steps on three participants, for the torture run",
        "retry": {
            "max_attempts": EXECUTE_ATTEMPTS,
            "initial_backoff": "10ms",
            "max_backoff": "100ms",
        },
        "compensation_retry": {
            "max_attempts": COMPENSATION_ATTEMPTS,
            "initial_backoff": "10ms",
            "max_backoff": "200ms",
        },
        "steps": [
            {
                "name": step,
                "participant": participant,
                "action": ACTION,
                "compensation": COMPENSATION,
                "timeout": f"{STEP_TIMEOUT_MS}ms",
            }
            for step, participant in STEPS
        ],
    }


def unit(seed: int, *parts: object) -> float:
    """A number in [0, 1) drawn from the seed and ``parts``, the same in every process."""
    digest = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@dataclass(frozen=True)
class SagaPlan:
    """One saga the client submits, and how it is meant to go wrong."""

    saga_id: str
    index: int
    reject_step: str | None
    """This step's Execute answers a business "no": the saga must compensate."""
    stuck_step: str | None
    """This step's compensation can never succeed: the saga may park in NEEDS_ATTENTION."""
    cancel: bool
    """The client cancels the saga soon after it is acknowledged."""
    duplicates: int
    """Concurrent identical CreateSaga requests sent besides the first."""
    conflict: bool
    """After the acknowledgement, a different request with the same id must be refused."""
    pad: int
    """Bytes of padding in the input."""
    hurried: bool = False
    """The first CreateSaga has an absurdly short deadline (the client retries)."""

    def payload(self) -> bytes:
        """The saga's input: what the participants read their instructions from."""
        return encode_input(
            {
                "n": self.index,
                "reject": self.reject_step,
                "stuck": self.stuck_step,
                "pad": "x" * self.pad,
            }
        )

    def conflicting_payload(self) -> bytes:
        """Another request under the same id."""
        return encode_input({"n": self.index, "conflict": True})


def encode_input(value: dict[str, Any]) -> bytes:
    """Canonical JSON, so that the same plan gives the same bytes in every process."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def plan_saga(seed: int, index: int) -> SagaPlan:
    """The ``index``-th saga of the run with this seed."""
    rng = random.Random(f"{seed}/saga/{index}")
    reject_step = stuck_step = None
    if rng.random() < 0.3:
        at = rng.randrange(len(STEPS))
        reject_step = STEP_NAMES[at]
        if at > 0 and rng.random() < 0.35:
            stuck_step = STEP_NAMES[rng.randrange(at)]
    return SagaPlan(
        saga_id=f"t{seed}-{index}",
        index=index,
        reject_step=reject_step,
        stuck_step=stuck_step,
        cancel=reject_step is None and rng.random() < 0.06,
        duplicates=rng.choice((1, 2)) if rng.random() < 0.2 else 0,
        conflict=rng.random() < 0.03,
        pad=rng.choice((0, 16, 200, 2000)),
        hurried=rng.random() < 0.05,
    )


def plan_of_input(data: bytes) -> tuple[str | None, str | None]:
    """(reject_step, stuck_step) read back from a saga's stored input."""
    try:
        value = json.loads(data)
    except ValueError:
        return None, None
    if not isinstance(value, dict):
        return None, None
    reject, stuck = value.get("reject"), value.get("stuck")
    return (
        reject if isinstance(reject, str) else None,
        stuck if isinstance(stuck, str) else None,
    )


def injected_transient(seed: int, request_id: str, attempt: int) -> str | None:
    """Whether this attempt of this call answers UNAVAILABLE on purpose, and when.

    ``"before"``: before the barrier, nothing applied. ``"after"``: the effect is committed,
    then the answer is lost. A call fails this way on at most its first two attempts, so a
    compensation always gets through in the end.
    """
    draw = unit(seed, "transient", request_id)
    if draw < 0.75:
        return None
    failing = 1 if draw < 0.92 else 2
    if attempt > failing:
        return None
    return "before" if unit(seed, "transient-when", request_id, attempt) < 0.5 else "after"
