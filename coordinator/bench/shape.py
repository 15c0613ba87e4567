"""What every side of the bench agrees on: the four steps, the two variants, the case keys."""

from __future__ import annotations

from dataclasses import dataclass

PARTICIPANTS = ("identity", "accounts", "cards", "billing")
"""The four no-op participants, in step order."""

ACTION = "Do"
REFUSED_ACTION = "Refuse"
"""The action the participants refuse (FAILED_PRECONDITION): step 3's, compensating variant."""
COMPENSATION = "Undo"
REFUSED_STEP = 2
"""Index of the refused step in the compensating variant (step 3)."""

OUTPUT = b'{"ok":true}'
"""What every Execute answers."""

SUCCEEDING = "succeeding"
COMPENSATING = "compensating"
VARIANTS = (SUCCEEDING, COMPENSATING)

DEFINITION = {SUCCEEDING: "bench", COMPENSATING: "bench-compensating"}
"""The coordinator's definition of each variant."""

EXECUTE = "execute"
COMPENSATE = "compensate"

COORDINATOR = "coordinator"
DIRECT = "direct"
DURABLE = "durable"
MODES = (COORDINATOR, DIRECT, DURABLE)
"""How the client runs sagas: through the coordinator, or the floors without it."""
COORDINATOR_OTLP = "coordinator_otlp"
"""The extra case: through a coordinator that exports traces and metrics over OTLP."""


def replicas_mode(replicas: int) -> str:
    """The extra case of ``replicas`` coordinators sharing one PostgreSQL database."""
    return f"postgresql_x{replicas}"


@dataclass(frozen=True)
class Step:
    """One step of a bench saga."""

    name: str
    participant: str
    action: str


def steps(variant: str) -> tuple[Step, ...]:
    """The four steps of a variant; the compensating one has step 3 refuse."""
    return tuple(
        Step(
            f"step-{name}",
            name,
            REFUSED_ACTION if variant == COMPENSATING and index == REFUSED_STEP else ACTION,
        )
        for index, name in enumerate(PARTICIPANTS)
    )


def definition(variant: str) -> dict[str, object]:
    """The saga definition the coordinator loads for a variant."""
    return {
        "name": DEFINITION[variant],
        "version": 1,
        "steps": [
            {
                "name": step.name,
                "participant": step.participant,
                "action": step.action,
                "compensation": COMPENSATION,
            }
            for step in steps(variant)
        ],
    }


def saga_id(case: str, index: int) -> str:
    """The id of a case's ``index``-th saga; the participants read the case back from it."""
    return f"{case}-{index}"


def case_of(saga_name: str) -> str:
    """The case key in a saga name ``sagas/{case}-{n}``."""
    return saga_name.removeprefix("sagas/").rpartition("-")[0]


def call_key(participant: str, step: str, operation: str) -> str:
    """How a call is counted: ``execute identity/step-identity``."""
    return f"{operation} {participant}/{step}"
