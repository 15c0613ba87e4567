"""What a participant is sent for one dispatch: built from the saga alone."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta

from coordinator.core.events import Dispatch
from coordinator.core.model import Operation, Saga, StepState, request_id


@dataclass(frozen=True)
class ParticipantCall:
    """Everything needed to send one Execute or Compensate attempt."""

    participant: str
    operation: Operation
    saga_id: str
    definition: str
    definition_version: int
    step: str
    action: str
    request_id: str
    attempt: int
    input: bytes
    timeout: timedelta
    previous_outputs: Mapping[str, bytes]
    """Execute only: outputs of the earlier steps that succeeded."""
    execute_output: bytes | None
    """Compensate only: this step's Execute output, when it answered OK."""
    execute_request_id: str
    """The request_id of the step's Execute (what a Compensate undoes)."""
    step_index: int = 0
    """The step's position in the saga (its answer is an event about that position)."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """Propagation headers sent with the call as metadata (the W3C traceparent)."""

    @property
    def saga_name(self) -> str:
        """The saga's resource name."""
        return f"sagas/{self.saga_id}"


def build_call(saga: Saga, dispatch: Dispatch) -> ParticipantCall:
    """The call that carries out ``dispatch`` for ``saga``."""
    step = saga.steps[dispatch.step]
    definition = saga.step_definition(dispatch.step)
    execute = dispatch.operation is Operation.EXECUTE
    previous = (
        {
            s.name: s.output
            for s in saga.steps[: dispatch.step]
            if s.output is not None and s.state is StepState.SUCCEEDED
        }
        if execute
        else {}
    )
    return ParticipantCall(
        participant=definition.participant,
        operation=dispatch.operation,
        saga_id=saga.saga_id,
        definition=saga.definition.name,
        definition_version=saga.definition.version,
        step=step.name,
        action=definition.action if execute else definition.compensation,
        request_id=dispatch.request_id,
        attempt=dispatch.attempt,
        input=saga.input,
        timeout=definition.timeout,
        previous_outputs=previous,
        execute_output=None if execute else step.output,
        execute_request_id=request_id(saga.saga_id, step.name, Operation.EXECUTE),
        step_index=dispatch.step,
    )
