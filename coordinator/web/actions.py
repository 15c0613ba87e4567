"""Which operator actions fit a saga now, and why the others do not.

The coordinator decides (its core refuses what does not fit, naming what would); this mirrors
its rules on the SDK's view of a saga so that the page can show an action disabled with the
reason before anyone tries it. Should the two ever disagree, the coordinator's refusal is shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from saga_sdk.model import Saga, SagaState, StepKind, StepRun, StepState


class Action(StrEnum):
    """The operator actions of `CoordinatorService`, by the path the console posts them to."""

    CANCEL = "cancel"
    RETRY = "retry"
    RESUME = "resume"
    MARK_COMPENSATED = "mark-compensated"
    COMPLETE = "complete"

    @property
    def label(self) -> str:
        """The button's label."""
        return _TITLES[self]


_TITLES = {
    Action.CANCEL: "Cancel saga",
    Action.RETRY: "Retry step now",
    Action.RESUME: "Resume compensating",
    Action.MARK_COMPENSATED: "Mark step compensated",
    Action.COMPLETE: "Complete step by hand",
}

_EFFECTS = {
    Action.CANCEL: "The saga stops going forward and compensates every step it sent, newest first.",
    Action.RETRY: "The step's call is sent again at once (a parked step gets a fresh attempt "
    "budget).",
    Action.RESUME: "The failed compensation is tried again with a fresh budget, then the earlier "
    "steps are compensated.",
    Action.MARK_COMPENSATED: "You state that the step was undone by hand; the saga goes on "
    "compensating the earlier steps.",
    Action.COMPLETE: "You state that the step succeeded; the saga goes on forward with the output "
    "you give.",
}


@dataclass(frozen=True)
class ActionView:
    """One action on one saga: the step it applies to, or why it does not fit."""

    action: Action
    step: str
    """The step it applies to ("" for the whole saga, or when it does not fit)."""
    why_not: str
    """Empty when it fits."""

    @property
    def allowed(self) -> bool:
        """Whether the action fits the saga now."""
        return not self.why_not

    @property
    def effect(self) -> str:
        """What the action does, for the confirmation."""
        return _EFFECTS[self.action]


def _pending(saga: Saga) -> tuple[StepRun, str] | None:
    """The step whose call the saga waits on, and "execute" or "compensate"."""
    if saga.state not in (SagaState.RUNNING, SagaState.COMPENSATING):
        return None
    for step in saga.steps:
        if step.state is StepState.RUNNING:
            return step, "execute"
        if step.state is StepState.COMPENSATING:
            return step, "compensate"
    return None


def parked_forward(saga: Saga) -> StepRun | None:
    """The pivot or retriable step a parked saga is stuck on, going forward."""
    if saga.state is not SagaState.NEEDS_ATTENTION:
        return None
    for step in saga.steps:
        if step.kind is not StepKind.COMPENSATABLE and step.state in (
            StepState.REJECTED,
            StepState.FAILED,
        ):
            return step
    return None


def parked_backward(saga: Saga) -> StepRun | None:
    """The step whose compensation a parked saga is stuck on."""
    if saga.state is not SagaState.NEEDS_ATTENTION:
        return None
    return next((step for step in saga.steps if step.state is StepState.COMPENSATING), None)


def waiting_step(saga: Saga) -> StepRun | None:
    """The step an unfinished saga waits on: its pending call's, or the one it is parked on."""
    pending = _pending(saga)
    if pending is not None:
        return pending[0]
    return parked_forward(saga) or parked_backward(saga)


def _ended(saga: Saga) -> str:
    return f"the saga has ended ({saga.state.value}): nothing can change it any more"


def _cancel(saga: Saga) -> ActionView:
    if saga.state in (SagaState.SUCCEEDED, SagaState.COMPENSATED):
        return ActionView(Action.CANCEL, "", _ended(saga))
    if saga.state is SagaState.NEEDS_ATTENTION:
        return ActionView(
            Action.CANCEL, "", "a parked saga is not cancelled: resume it, or act on its step"
        )
    if saga.state is SagaState.COMPENSATING:
        return ActionView(Action.CANCEL, "", "the saga is already compensating")
    for step in saga.steps:
        if step.kind is StepKind.PIVOT and step.execute_attempts > 0:
            return ActionView(
                Action.CANCEL,
                "",
                f"the pivot step {step.name!r} was sent: the saga can only go forward",
            )
    if _pending(saga) is None:
        return ActionView(Action.CANCEL, "", "the saga waits on no call")
    return ActionView(Action.CANCEL, "", "")


def _backoff(saga: Saga, operation: str) -> StepRun | None:
    """The step whose `operation` call waits out its backoff, if one does."""
    pending = _pending(saga)
    if pending is None:
        return None
    step, op = pending
    return step if op == operation and step.next_attempt_time is not None else None


def _not_waiting(saga: Saga, what: str) -> str:
    if saga.state in (SagaState.SUCCEEDED, SagaState.COMPENSATED):
        return _ended(saga)
    pending = _pending(saga)
    if pending is not None:
        step, op = pending
        if step.next_attempt_time is None:
            return f"step {step.name!r}'s {op} call is on its way; wait for its answer"
    return what


def _on(action: Action, step: StepRun | None, why_not: str) -> ActionView:
    """The action on `step`, or disabled for `why_not` when there is no step it fits."""
    return (
        ActionView(action, step.name, "") if step is not None else ActionView(action, "", why_not)
    )


def _retry(saga: Saga) -> ActionView:
    step = parked_forward(saga) or _backoff(saga, "execute") or _backoff(saga, "compensate")
    why_not = "no call waits out a backoff, and no pivot or retriable step is parked"
    return _on(Action.RETRY, step, _not_waiting(saga, why_not))


def _resume(saga: Saga) -> ActionView:
    step = parked_backward(saga)
    if step is not None:
        return ActionView(Action.RESUME, step.name, "")
    if saga.state is SagaState.NEEDS_ATTENTION:
        return ActionView(
            Action.RESUME, "", "the saga is parked going forward: retry or complete its step"
        )
    return ActionView(
        Action.RESUME,
        "",
        _ended(saga)
        if saga.state in (SagaState.SUCCEEDED, SagaState.COMPENSATED)
        else "only a saga parked on a failed compensation is resumed",
    )


def _mark_compensated(saga: Saga) -> ActionView:
    step = parked_backward(saga) or _backoff(saga, "compensate")
    why_not = "no compensation is parked or waiting out a backoff"
    return _on(Action.MARK_COMPENSATED, step, _not_waiting(saga, why_not))


def _complete(saga: Saga) -> ActionView:
    step = parked_forward(saga)
    if step is None:
        waiting = _backoff(saga, "execute")
        if waiting is not None and waiting.kind is not StepKind.COMPENSATABLE:
            step = waiting
    why_not = (
        "only a pivot or retriable step that is parked or waiting out a backoff is completed "
        "by hand"
    )
    return _on(Action.COMPLETE, step, _not_waiting(saga, why_not))


def action_views(saga: Saga) -> tuple[ActionView, ...]:
    """Every operator action, in a fixed order, each allowed or with why it is not."""
    return (_retry(saga), _resume(saga), _mark_compensated(saga), _complete(saga), _cancel(saga))
