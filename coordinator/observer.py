"""What the engine's moves tell the outside: log lines, metrics, and each settled saga's trace."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from coordinator.core.events import (
    CallAnswered,
    DeadlineExceeded,
    Event,
    OperatorEvent,
    Succeeded,
)
from coordinator.core.machine import action_of
from coordinator.core.model import Saga, SagaState
from coordinator.ports import SagaStore
from coordinator.telemetry import TRACEPARENT, SagaTelemetry

log = logging.getLogger("coordinator.engine")


def about(saga: Saga, step: str | None = None) -> dict[str, str]:
    """What a log line about a saga carries: its id, the step, and the saga's trace id."""
    extra = {"saga_id": saga.saga_id}
    if step is not None:
        extra["step"] = step
    traceparent = saga.trace_context.get(TRACEPARENT, "")
    if traceparent.count("-") == 3:
        extra["trace_id"] = traceparent.split("-")[1]
    return extra


class SagaObserver:
    """Logs, metrics and traces of the sagas one engine moves.

    It follows each saga's states while this process sees every event of it, so that a settled
    saga's trace is built without replaying its log; a saga taken up after a restart (or moved
    by someone else meanwhile) is replayed instead. Exports run as tasks of their own: a slow
    collector never holds a saga up.
    """

    def __init__(
        self, telemetry: SagaTelemetry, store: SagaStore, *, log_payloads: bool = False
    ) -> None:
        self._telemetry = telemetry
        self._store = store
        self._log_payloads = log_payloads
        self._states: dict[str, list[SagaState]] = {}
        self._exports: set[asyncio.Task[None]] = set()

    def created(self, saga: Saga) -> None:
        """A saga was stored by this process: its first state is known."""
        self._telemetry.saga_started(saga)
        self._states[saga.saga_id] = [saga.state]
        if log.isEnabledFor(logging.INFO):
            definition = saga.definition
            log.info(
                "saga created (%s v%d)", definition.name, definition.version, extra=about(saga)
            )
            if self._log_payloads:
                log.info("saga input: %r", saga.input[:4096], extra=about(saga))

    def lost_track(self, saga_id: str) -> None:
        """The saga moved without this process seeing it: its trace will replay the log."""
        self._states.pop(saga_id, None)

    def moved(self, previous: Saga, saga: Saga, event: Event, *, retried: bool = False) -> None:
        """The saga moved from ``previous`` to ``saga`` on ``event`` (committed)."""
        states = self._states.get(saga.saga_id)
        if states is not None:
            states.append(saga.state)
        if isinstance(event, CallAnswered):
            self._telemetry.call_answered(saga, event, saga.updated_at, retried)
            outcome = event.outcome
            if not isinstance(outcome, Succeeded):
                if log.isEnabledFor(logging.WARNING):
                    step = saga.steps[event.step].name
                    log.warning(
                        "%s %s attempt %d: %s %s %s",
                        event.operation.value,
                        step,
                        event.attempt,
                        outcome.code,
                        outcome.reason,
                        outcome.message,
                        extra=about(saga, step),
                    )
            elif self._log_payloads and outcome.output and log.isEnabledFor(logging.INFO):
                step = saga.steps[event.step].name
                log.info("%s output: %r", step, outcome.output[:4096], extra=about(saga, step))
        elif isinstance(event, OperatorEvent):
            action = action_of(event)
            self._telemetry.operator_action(saga, action.value)
            if previous.state is SagaState.NEEDS_ATTENTION:
                self._telemetry.left_attention()
            entry = saga.audit[-1] if saga.audit else None
            log.warning(
                "operator action %s%s by %s: %s",
                action.value,
                f" on step {entry.step}" if entry and entry.step else "",
                event.actor or "unknown",
                event.reason,
                extra=about(saga, entry.step if entry and entry.step else None),
            )
        elif isinstance(event, DeadlineExceeded):
            log.warning(
                "deadline of %s exceeded: %s",
                saga.definition.deadline,
                "parked" if saga.state is SagaState.NEEDS_ATTENTION else "compensating",
                extra=about(saga),
            )
        if saga.state is not previous.state and log.isEnabledFor(logging.INFO):
            log.info("saga %s -> %s", previous.state.value, saga.state.value, extra=about(saga))
        if saga.state.is_settled and not previous.state.is_settled:
            self._settled(saga, self._states.pop(saga.saga_id, None))

    async def drain(self, grace: float) -> None:
        """Wait, up to ``grace`` seconds (at least one), for the exports under way."""
        if self._exports:
            await asyncio.wait(list(self._exports), timeout=max(grace, 1.0))

    def _settled(self, saga: Saga, states: Sequence[SagaState] | None) -> None:
        self._telemetry.saga_ended(saga)
        if self._telemetry.should_export():
            task = asyncio.create_task(self._export(saga, states))
            self._exports.add(task)
            task.add_done_callback(self._exports.discard)

    async def _export(self, saga: Saga, states: Sequence[SagaState] | None) -> None:
        try:
            history = await self._store.events(saga.saga_id)
            self._telemetry.saga_settled(saga, history, states)
        except Exception:  # telemetry must never stop a saga
            log.exception("could not export the saga's trace", extra=about(saga))
