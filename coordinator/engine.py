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
    WatcherTooSlow,
)
from coordinator.core.events import (
    CallAnswered,
    CancelRequested,
    Dispatch,
    Event,
    RecordedEvent,
    SagaCreated,
    Succeeded,
)
from coordinator.core.machine import check_cancellable, decide, pending_call, start
from coordinator.core.model import Operation, Saga, SagaState
from coordinator.crashpoints import NO_CRASH_POINTS, CrashPoint, CrashPoints
from coordinator.ports import Clock, ListCursor, ParticipantGateway, SagaFilter, SagaPage, SagaStore
from coordinator.telemetry import TRACEPARENT, SagaTelemetry

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


@dataclass(frozen=True)
class SagaChange:
    """One state of a watched saga: the saga, and the event that led to it (None at first)."""

    saga: Saga
    event: RecordedEvent | None


@dataclass(eq=False)
class _Watcher:
    queue: asyncio.Queue[SagaChange | None] = field(default_factory=asyncio.Queue)
    overflowed: bool = False


@dataclass
class _Active:
    """A saga this process is moving forward: its latest committed state and its runner."""

    saga: Saga
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    runner: asyncio.Task[None] | None = None
    in_flight: bool = False
    """The runner has decided to send the pending call and has not applied its answer yet."""
    states: list[SagaState] | None = None
    """The saga's state after each event, when this process saw them all (for its trace)."""


def fingerprint(definition: str, version: int, payload: bytes) -> str:
    """What makes two CreateSaga requests "the same request" for idempotency."""
    digest = hashlib.sha256()
    for part in (definition.encode(), str(version).encode(), payload):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def _about(saga: Saga, step: str | None = None) -> dict[str, str]:
    """What a log line about a saga carries: its id, the step, and the saga's trace id."""
    extra = {"saga_id": saga.saga_id}
    if step is not None:
        extra["step"] = step
    traceparent = saga.trace_context.get(TRACEPARENT, "")
    if traceparent.count("-") == 3:
        extra["trace_id"] = traceparent.split("-")[1]
    return extra


class Engine:
    """Runs sagas: decides with the core, commits with the store, then calls participants."""

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
        self._log_payloads = log_payloads
        self._crash = crash_points
        self._telemetry = telemetry or SagaTelemetry()
        self._exports: set[asyncio.Task[None]] = set()
        self._active: dict[str, _Active] = {}
        self._watchers: dict[str, set[_Watcher]] = {}
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
            self._telemetry.saga_started(saga)
            log.info("saga created (%s v%d)", resolved.name, resolved.version, extra=_about(saga))
            if self._log_payloads:
                log.info("saga input: %r", payload[:4096], extra=_about(saga))
            self._publish(SagaChange(saga, record))
            self._activate(saga, [saga.state])
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

    async def watch(self, saga_id: str, *, ending_only: bool = False) -> AsyncIterator[SagaChange]:
        """The saga's current state, then every change in order, until it settles.

        With ``ending_only``, only the settled state (the last of those).
        """
        if self._stopping:
            raise ShuttingDown("the coordinator is shutting down; watch again")
        watcher = _Watcher()
        self._watchers.setdefault(saga_id, set()).add(watcher)
        try:
            # Registered before reading: a change committed after the read is in the queue, one
            # committed before is in the state read; versions tell them apart.
            current = await self.get_saga(saga_id)
            seen = current.version
            settled = current.state.is_settled
            if settled or not ending_only:
                yield SagaChange(current, None)
            while not settled:
                change = await watcher.queue.get()
                if change is None:
                    raise ShuttingDown("the coordinator is shutting down; watch again")
                if watcher.overflowed:
                    raise WatcherTooSlow(
                        f"watcher of saga {saga_id} fell more than "
                        f"{self._settings.watch_buffer} changes behind; watch again"
                    )
                if change.saga.version <= seen:
                    continue
                seen = change.saga.version
                settled = change.saga.state.is_settled
                if settled or not ending_only:
                    yield change
        finally:
            watchers = self._watchers.get(saga_id)
            if watchers is not None:
                watchers.discard(watcher)
                if not watchers:
                    del self._watchers[saga_id]

    async def stop(self, grace: float) -> None:
        """Stop taking work; let calls in flight finish for up to ``grace`` seconds.

        Everything is already committed before it is sent, so a call cut off here is simply
        re-sent, with the same request_id, by the next start.
        """
        self._stopping = True
        for watchers in self._watchers.values():
            for watcher in watchers:
                watcher.queue.put_nowait(None)
        for active in self._active.values():
            active.wake.set()
        runners = [a.runner for a in self._active.values() if a.runner is not None]
        if not runners:
            await self._drain_exports(grace)
            return
        _, pending = await asyncio.wait(runners, timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("%d calls were still in flight after %.1fs; cut off", len(pending), grace)
            await asyncio.gather(*pending, return_exceptions=True)
        await self._drain_exports(grace)

    async def _drain_exports(self, grace: float) -> None:
        if self._exports:
            await asyncio.wait(list(self._exports), timeout=max(grace, 1.0))

    # -- inside ---------------------------------------------------------------------------------

    def _activate(self, saga: Saga, states: list[SagaState] | None = None) -> None:
        if saga.state.is_settled or self._stopping:
            return
        active = _Active(saga, states=states)
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
        while not self._stopping:
            call: ParticipantCall | None = None
            async with active.lock:
                dispatch = pending_call(active.saga)
                if dispatch is None:
                    return
                delay = 0.0
                if dispatch.not_before is not None:
                    delay = (dispatch.not_before - self._now()).total_seconds()
                if delay <= 0:
                    active.in_flight = True
                    call = build_call(active.saga, dispatch)
                    headers = self._telemetry.call_headers(active.saga, call)
                    if headers:
                        call = replace(call, headers=headers)
                else:
                    active.wake.clear()
            if call is None:
                # Waiting out a backoff; a cancellation or a stop wakes us early.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(active.wake.wait(), timeout=delay)
                continue
            if dispatch.operation is Operation.COMPENSATE:
                self._crash.reach(CrashPoint.INSIDE_COMPENSATION)
            sent_at = self._now()
            outcome = await self._gateway.send(call)
            self._crash.reach(CrashPoint.AFTER_ANSWER)
            answered = CallAnswered(
                dispatch.operation, dispatch.step, dispatch.attempt, outcome, sent_at
            )
            async with active.lock:
                active.in_flight = False
                await self._apply_locked(active, answered)

    async def _apply_locked(self, active: _Active, event: Event) -> None:
        """Decide, commit, then publish; the caller holds the saga's lock."""
        delay = self._settings.storage_retry_initial
        while True:
            now = self._now()
            decision = decide(active.saga, event, now)
            if not decision.changed:
                return
            record = RecordedEvent(active.saga.saga_id, decision.saga.version, now, event)
            if decision.saga.state.is_terminal:
                self._crash.reach(CrashPoint.BEFORE_TERMINAL_WRITE)
            try:
                # Commit before acting: the decision (and the call it implies) is durable before
                # any participant hears of it, so a crash re-sends rather than forgets.
                await self._store.commit(decision.saga, record)
            except StorageUnavailable as error:
                if self._stopping:
                    raise ShuttingDown("stopping with a write the store could not take") from error
                log.warning(
                    "store unavailable, retrying in %.2fs: %s",
                    delay,
                    error.message,
                    extra={"saga_id": active.saga.saga_id},
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
                stored = await self._store.get(active.saga.saga_id)
                if stored is None:
                    raise
                active.saga, active.states = stored, None
                active.wake.set()
                self._publish(SagaChange(stored, None))
                continue
            if decision.commands:
                self._crash.reach(CrashPoint.AFTER_DISPATCH_COMMIT)
            previous, active.saga = active.saga, decision.saga
            if active.states is not None:
                active.states.append(decision.saga.state)
            active.wake.set()
            self._publish(SagaChange(decision.saga, record))
            self._observe(previous, decision.saga, event, now, decision.commands, active.states)
            return

    def _observe(
        self,
        previous: Saga,
        saga: Saga,
        event: Event,
        now: datetime,
        commands: tuple[Dispatch, ...],
        states: list[SagaState] | None,
    ) -> None:
        """Logs, metrics and, once the saga settles, its trace."""
        if isinstance(event, CallAnswered):
            retried = any(c.step == event.step and c.operation is event.operation for c in commands)
            self._telemetry.call_answered(saga, event, now, retried)
            step = saga.steps[event.step].name
            if not isinstance(event.outcome, Succeeded):
                log.warning(
                    "%s %s attempt %d: %s %s %s",
                    event.operation.value,
                    step,
                    event.attempt,
                    event.outcome.code,
                    event.outcome.reason,
                    event.outcome.message,
                    extra=_about(saga, step),
                )
            elif self._log_payloads and event.outcome.output:
                log.info(
                    "%s output: %r", step, event.outcome.output[:4096], extra=_about(saga, step)
                )
        if saga.state is not previous.state:
            log.info("saga %s -> %s", previous.state.value, saga.state.value, extra=_about(saga))
        if saga.state.is_settled and not previous.state.is_settled:
            self._telemetry.saga_ended(saga)
            if self._telemetry.should_export():
                task = asyncio.create_task(self._export_trace(saga, states))
                self._exports.add(task)
                task.add_done_callback(self._exports.discard)

    async def _export_trace(self, saga: Saga, states: list[SagaState] | None) -> None:
        try:
            history = await self._store.events(saga.saga_id)
            self._telemetry.saga_settled(saga, history, states)
        except Exception:  # telemetry must never stop a saga
            log.exception("could not export the saga's trace", extra=_about(saga))

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

    def _publish(self, change: SagaChange) -> None:
        for watcher in self._watchers.get(change.saga.saga_id, ()):
            if watcher.overflowed:
                continue
            if watcher.queue.qsize() >= self._settings.watch_buffer:
                watcher.overflowed = True
            watcher.queue.put_nowait(change)
