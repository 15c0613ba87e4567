"""The engine: the one orchestrator. Serialises each saga's events, commits, then dispatches."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime

from coordinator.core.calls import ParticipantCall, build_call
from coordinator.core.definitions import NAME_RULE, DefinitionCatalog, is_valid_name
from coordinator.core.errors import (
    ConcurrentUpdate,
    FieldViolation,
    InvalidArgument,
    SagaNotFound,
    ShuttingDown,
    StorageFailure,
    StorageUnavailable,
)
from coordinator.core.events import (
    CallAnswered,
    CancelRequested,
    Event,
    RecordedEvent,
    SagaCreated,
    pending_call,
)
from coordinator.core.machine import changed_steps, check_cancellable, decide, start
from coordinator.core.model import Operation, Saga, SagaState
from coordinator.crashpoints import NO_CRASH_POINTS, CrashPoint, CrashPoints
from coordinator.observer import SagaObserver
from coordinator.ports import Clock, ListCursor, ParticipantGateway, SagaFilter, SagaPage, SagaStore
from coordinator.telemetry import SagaTelemetry
from coordinator.watchers import SagaChange, SagaWatchers

log = logging.getLogger("coordinator.engine")


@dataclass(frozen=True)
class EngineSettings:
    """How the engine behaves; built once by the composition root."""

    watch_buffer: int = 10_000
    """Changes a watcher may fall behind before it is cut off (it may watch again)."""
    storage_retry_initial: float = 0.05
    """First delay, in seconds, before retrying a write the store could not take."""
    storage_retry_max: float = 2.0
    """Longest delay, in seconds, between retries of a write the store could not take."""


@dataclass
class _Active:
    """A saga this process is moving forward: its latest committed state and its runner."""

    saga: Saga
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    runner: asyncio.Task[None] | None = None
    in_flight: bool = False
    """The runner has decided to send the pending call and has not applied its answer yet."""


def fingerprint(definition: str, version: int, payload: bytes) -> str:
    """What makes two CreateSaga requests "the same request" for idempotency."""
    digest = hashlib.sha256()
    for part in (definition.encode(), str(version).encode(), payload):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


class Engine:
    """Runs sagas: decides with the core, commits with the store, then calls participants.

    Watchers of sagas (``SagaWatchers``) and logs, metrics and traces (``SagaObserver``) are
    collaborators it hands each committed change to; it orchestrates and nothing else.
    """

    def __init__(
        self,
        store: SagaStore,
        gateway: ParticipantGateway,
        clock: Clock,
        catalog: DefinitionCatalog,
        settings: EngineSettings | None = None,
        *,
        new_id: Callable[[], str] = lambda: uuid.uuid4().hex,
        log_payloads: bool = False,
        on_fatal: Callable[[BaseException], None] | None = None,
        crash_points: CrashPoints = NO_CRASH_POINTS,
        telemetry: SagaTelemetry | None = None,
    ) -> None:
        self._store = store
        self._gateway = gateway
        self._clock = clock
        self._catalog = catalog
        self._settings = settings or EngineSettings()
        self._new_id = new_id
        self._on_fatal = on_fatal
        self._crash = crash_points
        self._telemetry = telemetry or SagaTelemetry()
        self._observer = SagaObserver(self._telemetry, store, log_payloads=log_payloads)
        self._watchers = SagaWatchers(self._settings.watch_buffer)
        self._active: dict[str, _Active] = {}
        self._stopping = False
        self._last_now: datetime | None = None

    @property
    def catalog(self) -> DefinitionCatalog:
        """The definitions this engine runs."""
        return self._catalog

    @property
    def active_count(self) -> int:
        """Sagas this process is currently moving forward."""
        return len(self._active)

    async def start(self) -> int:
        """Resume every unfinished saga (recovery); return how many were resumed."""
        parked = SagaFilter(states=frozenset({SagaState.NEEDS_ATTENTION}))
        self._telemetry.set_needs_attention(await self._store.count(parked))
        unfinished = await self._store.unfinished()
        for saga in unfinished:
            if saga.saga_id not in self._active:
                self._activate(saga)
        if unfinished:
            log.info("resumed %d unfinished sagas", len(unfinished))
        return len(unfinished)

    async def create_saga(
        self,
        saga_id: str | None,
        definition: str,
        version: int,
        payload: bytes,
        client_headers: Mapping[str, str] | None = None,
    ) -> tuple[Saga, bool]:
        """Store a new saga and start it; idempotent on ``saga_id``. Returns (saga, created).

        ``client_headers`` are the caller's trace headers: the saga's trace links to them.
        The work is shielded from the caller's cancellation (a client's deadline): once the
        store may have taken the saga, the saga is also published and started.
        """
        return await asyncio.shield(
            self._create(saga_id, definition, version, payload, client_headers or {})
        )

    async def _create(
        self,
        saga_id: str | None,
        definition: str,
        version: int,
        payload: bytes,
        client_headers: Mapping[str, str],
    ) -> tuple[Saga, bool]:
        if self._stopping:
            raise ShuttingDown("the coordinator is shutting down; retry on another instance")
        if saga_id is not None and not is_valid_name(saga_id):
            raise InvalidArgument(
                "invalid saga_id", (FieldViolation("saga_id", f"must be {NAME_RULE}"),)
            )
        resolved = self._catalog.resolve(definition, version)
        saga_id = saga_id or self._new_id()
        now = self._now()
        trace_context = self._telemetry.new_trace(client_headers)
        created = SagaCreated(saga_id, resolved, payload, trace_context)
        decision = start(created, now)
        record = RecordedEvent(saga_id, decision.saga.version, now, created)
        try:
            saga, is_new = await self._store.create(
                decision.saga, record, fingerprint(definition, version, payload)
            )
        except StorageFailure as error:
            self._fail(error)
            raise
        if is_new:
            self._crash.reach(CrashPoint.AFTER_CREATE_COMMIT)
            self._observer.created(saga)
            self._watchers.publish(SagaChange(saga, record))
            self._activate(saga)
        elif saga_id in self._active:
            saga = self._active[saga_id].saga
        elif not saga.state.is_settled:
            # Stored, but not moving here: a creation that was cut off before it could start
            # the saga. Start it now rather than at the next restart.
            self._activate(saga)
        return saga, is_new

    async def get_saga(self, saga_id: str) -> Saga:
        """The saga's latest committed state."""
        active = self._active.get(saga_id)
        if active is not None:
            return active.saga
        saga = await self._store.get(saga_id)
        if saga is None:
            raise SagaNotFound(f"no saga with id {saga_id!r}")
        return saga

    async def list_sagas(self, where: SagaFilter, limit: int, after: ListCursor | None) -> SagaPage:
        """One page of sagas, oldest first."""
        return await self._store.list(where, limit, after)

    async def cancel_saga(self, saga_id: str, reason: str) -> Saga:
        """Cancel a running saga: it compensates every step that had been sent.

        Shielded from the caller's cancellation, like creation: a stored cancellation is always
        applied here too.
        """
        return await asyncio.shield(self._cancel(saga_id, reason))

    async def _cancel(self, saga_id: str, reason: str) -> Saga:
        if self._stopping:
            raise ShuttingDown("the coordinator is shutting down; retry on another instance")
        active = self._active.get(saga_id)
        if active is None:
            saga = await self.get_saga(saga_id)
            check_cancellable(saga)
            if saga.state is not SagaState.COMPENSATING:
                # Unfinished sagas are active unless the engine is stopping.
                raise ShuttingDown(f"saga {saga_id} is not running here; retry")
            return saga
        async with active.lock:
            check_cancellable(active.saga)
            await self._apply_locked(active, CancelRequested(reason, active.in_flight))
            return active.saga

    def watch(self, saga_id: str, *, ending_only: bool = False) -> AsyncIterator[SagaChange]:
        """The saga's current state, then every change in order, until it settles.

        With ``ending_only``, only the settled state (the last of those).
        """
        if self._stopping:
            raise ShuttingDown("the coordinator is shutting down; watch again")
        return self._watchers.watch(
            saga_id, lambda: self.get_saga(saga_id), ending_only=ending_only
        )

    async def stop(self, grace: float) -> None:
        """Stop taking work; let calls in flight finish for up to ``grace`` seconds.

        Everything is already committed before it is sent, so a call cut off here is simply
        re-sent, with the same request_id, by the next start.
        """
        self._stopping = True
        self._watchers.close()
        for active in self._active.values():
            active.wake.set()
        runners = [a.runner for a in self._active.values() if a.runner is not None]
        if runners:
            _, pending = await asyncio.wait(runners, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                log.warning(
                    "%d calls were still in flight after %.1fs; cut off", len(pending), grace
                )
                await asyncio.gather(*pending, return_exceptions=True)
        await self._observer.drain(grace)

    # -- inside ---------------------------------------------------------------------------------

    def _activate(self, saga: Saga) -> None:
        if saga.state.is_settled or self._stopping:
            return
        active = _Active(saga)
        self._active[saga.saga_id] = active
        active.runner = asyncio.create_task(self._run(active), name=f"saga {saga.saga_id}")

    async def _run(self, active: _Active) -> None:
        saga_id = active.saga.saga_id
        try:
            await self._drive(active)
        except asyncio.CancelledError:
            raise
        except StorageFailure as error:  # _apply_locked has asked the process to stop
            log.error("storage failed: %s", error.message, extra={"saga_id": saga_id})
        except BaseException as error:  # a runner that dies silently would strand its saga
            log.exception("saga runner failed", extra={"saga_id": saga_id})
            self._fail(error)
        finally:
            if self._active.get(saga_id) is active:
                del self._active[saga_id]

    async def _drive(self, active: _Active) -> None:
        """Send the saga's pending call, apply the answer, and so on until it settles.

        The saga's lock is taken once per answer: applying it and choosing the next call happen
        together, so no cancellation can slip in between.
        """
        async with active.lock:
            call, delay = self._next_call(active)
        while not self._stopping:
            if call is None:
                if delay is None:
                    return
                # Waiting out a backoff; a cancellation or a stop wakes us early.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(active.wake.wait(), timeout=delay)
                async with active.lock:
                    call, delay = self._next_call(active)
                continue
            if call.operation is Operation.COMPENSATE:
                self._crash.reach(CrashPoint.INSIDE_COMPENSATION)
            sent_at = self._now()
            outcome = await self._gateway.send(call)
            self._crash.reach(CrashPoint.AFTER_ANSWER)
            answered = CallAnswered(call.operation, call.step_index, call.attempt, outcome, sent_at)
            async with active.lock:
                active.in_flight = False
                await self._apply_locked(active, answered)
                call, delay = self._next_call(active)

    def _next_call(self, active: _Active) -> tuple[ParticipantCall | None, float | None]:
        """The call to send now (marked in flight), or how long until one is due (None: none
        will be). The caller holds the saga's lock."""
        saga = active.saga
        dispatch = pending_call(saga)
        if dispatch is None:
            return None, None
        if dispatch.not_before is not None:
            delay = (dispatch.not_before - self._now()).total_seconds()
            if delay > 0:
                active.wake.clear()
                return None, delay
        active.in_flight = True
        call = build_call(saga, dispatch)
        headers = self._telemetry.call_headers(saga, call)
        if headers:
            call = replace(call, headers=headers)
        return call, None

    async def _apply_locked(self, active: _Active, event: Event) -> None:
        """Decide, commit, then publish; the caller holds the saga's lock."""
        delay = self._settings.storage_retry_initial
        while True:
            now = self._now()
            previous = active.saga
            decision = decide(previous, event, now)
            if not decision.changed:
                return
            saga = decision.saga
            record = RecordedEvent(saga.saga_id, saga.version, now, event)
            if saga.state.is_terminal:
                self._crash.reach(CrashPoint.BEFORE_TERMINAL_WRITE)
            try:
                # Commit before acting: the decision (and the call it implies) is durable before
                # any participant hears of it, so a crash re-sends rather than forgets.
                await self._store.commit(saga, record, changed_steps(previous, saga))
            except StorageUnavailable as error:
                if self._stopping:
                    raise ShuttingDown("stopping with a write the store could not take") from error
                log.warning(
                    "store unavailable, retrying in %.2fs: %s",
                    delay,
                    error.message,
                    extra={"saga_id": saga.saga_id},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._settings.storage_retry_max)
                continue
            except StorageFailure as error:
                self._fail(error)
                raise
            except ConcurrentUpdate:
                # Someone else moved the saga on (a write whose caller was cut off): take the
                # stored state, tell watchers and the runner, and decide again from there.
                stored = await self._store.get(saga.saga_id)
                if stored is None:
                    raise
                active.saga = stored
                active.wake.set()
                self._observer.lost_track(saga.saga_id)
                self._watchers.publish(SagaChange(stored, None))
                continue
            if decision.dispatches:
                self._crash.reach(CrashPoint.AFTER_DISPATCH_COMMIT)
            active.saga = saga
            active.wake.set()
            self._watchers.publish(SagaChange(saga, record))
            retried = isinstance(event, CallAnswered) and any(
                command.step == event.step and command.operation is event.operation
                for command in decision.commands
            )
            self._observer.moved(previous, saga, event, retried=retried)
            return

    def _now(self) -> datetime:
        """The clock's time, never earlier than a time already given out.

        Decisions compare "now" with times they stored (a retry is due, a call may be in
        flight): a wall clock stepped back by NTP must not make them see the past again.
        """
        now = self._clock.now()
        if self._last_now is not None and now < self._last_now:
            return self._last_now
        self._last_now = now
        return now

    def _fail(self, error: BaseException) -> None:
        """The coordinator can no longer keep its promises: ask the process to stop."""
        if self._on_fatal is not None:
            self._on_fatal(error)
