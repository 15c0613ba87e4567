"""The engine: the one orchestrator. Serialises each saga's events, commits, then dispatches."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from types import MappingProxyType

from coordinator.core.calls import ParticipantCall, build_call
from coordinator.core.definitions import (
    NAME_RULE,
    DefinitionCatalog,
    is_valid_name,
    validate_definition,
)
from coordinator.core.errors import (
    ActionNotAllowed,
    ConcurrentUpdate,
    DefinitionConflict,
    DefinitionNotFound,
    FeedPositionPruned,
    FieldViolation,
    InvalidArgument,
    LeaseLost,
    SagaNotFound,
    ShuttingDown,
    StaleVersion,
    StorageFailure,
    StorageUnavailable,
)
from coordinator.core.events import (
    CallAnswered,
    CancelRequested,
    DeadlineExceeded,
    Event,
    OperatorEvent,
    RecordedEvent,
    SagaCreated,
    pending_call,
)
from coordinator.core.machine import (
    changed_steps,
    check_action,
    check_cancellable,
    decide,
    fold,
    pivot_sent,
    start,
)
from coordinator.core.model import Operation, Saga, SagaDefinition, SagaState
from coordinator.crashpoints import NO_CRASH_POINTS, CrashPoint, CrashPoints
from coordinator.observer import SagaObserver
from coordinator.ports import (
    ChangeFilter,
    Claimed,
    Clock,
    FeedChange,
    FeedPage,
    Fence,
    ListCursor,
    ParticipantGateway,
    PruneResult,
    RegisteredDefinition,
    SagaFilter,
    SagaPage,
    SagaStore,
)
from coordinator.telemetry import SagaTelemetry
from coordinator.watchers import SagaChange, SagaWatchers

log = logging.getLogger("coordinator.engine")

FEED_PAGE = 500
"""Changes read from the store at a time by a change feed consumer."""
FEED_IDLE_CHECK = 5.0
"""Seconds a caught-up change feed consumer waits for a commit before looking again."""


@dataclass(frozen=True)
class EngineSettings:
    """How the engine behaves; built once by the composition root."""

    watch_buffer: int = 10_000
    """Changes a watcher may fall behind before it is cut off (it may watch again)."""
    storage_retry_initial: float = 0.05
    """First delay, in seconds, before retrying a write the store could not take."""
    storage_retry_max: float = 2.0
    """Longest delay, in seconds, between retries of a write the store could not take."""
    retention: timedelta | None = None
    """Ended sagas older than this are pruned in the background (None: kept for ever)."""
    retention_every: float = 600.0
    """Seconds between two background prunes."""
    prune_batch: int = 500
    """Sagas removed per transaction when pruning: small, so running sagas never wait long."""
    summary_every: float = 15.0
    """Seconds between two reads of the store's summary for the metrics (oldest unfinished
    saga, parked sagas by step)."""
    lease: timedelta = timedelta(seconds=10)
    """How long this replica's hold on its sagas lasts without renewal, by the store's clock:
    how long others wait before they take over the sagas of a replica that died."""
    claim_every: float = 1.0
    """Seconds between two looks for sagas no live replica holds."""
    claim_batch: int = 100
    """Sagas claimed per transaction: recovery works through them batch by batch."""
    follow_every: float = 0.1
    """Seconds between two looks at the change feed for changes other replicas made (for the
    watchers and the feed's followers here)."""

    @property
    def renew_every(self) -> float:
        """Seconds between two renewals of the lease: a third of it."""
        return self.lease.total_seconds() / 3


@dataclass
class _Active:
    """A saga this process is moving forward: its latest committed state and its runner."""

    saga: Saga
    fence: Fence | None = None
    """What this replica's writes to the saga carry (None: unfenced, outside replicas)."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    runner: asyncio.Task[None] | None = None
    in_flight: bool = False
    """The runner has decided to send the pending call and has not applied its answer yet."""
    holders: int = 0
    """Operator actions using this entry right now (a parked saga has no runner to keep it)."""


def fingerprint(
    definition: str, version: int, payload: bytes, labels: Mapping[str, str] | None = None
) -> str:
    """What makes two CreateSaga requests "the same request" for idempotency."""
    digest = hashlib.sha256()
    parts = [definition.encode(), str(version).encode(), payload]
    for key, value in sorted((labels or {}).items()):  # none: the same as before labels existed
        parts += [key.encode(), value.encode()]
    for part in parts:
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
        replica: str | None = None,
        log_payloads: bool = False,
        on_fatal: Callable[[BaseException], None] | None = None,
        crash_points: CrashPoints = NO_CRASH_POINTS,
        telemetry: SagaTelemetry | None = None,
    ) -> None:
        self._store = store
        self._gateway = gateway
        self._clock = clock
        self._catalog = catalog
        self._participants: frozenset[str] = frozenset(
            step.participant for d in catalog.all() for step in d.steps
        )
        self._settings = settings or EngineSettings()
        self._new_id = new_id
        self._replica = replica or f"replica-{uuid.uuid4().hex[:12]}"
        self._joined = False
        self._taking = asyncio.Lock()
        self._feed_seen = 0
        """The feed's newest position when it was last looked at."""
        self._own_commits = 0
        """Changes this engine committed since then (each takes one position)."""
        self._store_up = True
        self.on_store_health: Callable[[bool], None] | None = None
        """Called with False when the store stops answering, and True when it answers again."""
        self._views: dict[str, Saga] = {}
        """Sagas another replica moves and someone watches here: as last told."""
        self._on_fatal = on_fatal
        self._crash = crash_points
        self._telemetry = telemetry or SagaTelemetry()
        self._observer = SagaObserver(self._telemetry, store, log_payloads=log_payloads)
        self._watchers = SagaWatchers(self._settings.watch_buffer)
        self._active: dict[str, _Active] = {}
        self._stopping = False
        self._last_now: datetime | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._pruned = False
        self._summary_due = False
        self._summary_read = 0.0
        self._committed = asyncio.Event()
        """Set (then replaced) at every commit: what change feed followers wait on."""

    @property
    def catalog(self) -> DefinitionCatalog:
        """The definitions this engine runs."""
        return self._catalog

    @property
    def replica(self) -> str:
        """The name under which this engine holds sagas in the store."""
        return self._replica

    @property
    def stale_writes(self) -> int:
        """Writes refused so far because another replica held the saga, or this one's lease
        had run out."""
        return self._telemetry.stale_writes

    @property
    def lease_lapses(self) -> int:
        """Times this replica's lease ran out before it was renewed."""
        return self._telemetry.lease_lapses

    @property
    def active_count(self) -> int:
        """Sagas this process is currently moving forward."""
        return len(self._active)

    async def start(self) -> int:
        """Join the store's replicas and claim a first batch of the sagas no live replica
        holds (recovery); return how many were claimed. The rest are claimed batch by batch in
        the background, as are those of replicas that die later."""
        parked = SagaFilter(states=frozenset({SagaState.NEEDS_ATTENTION}))
        self._telemetry.set_needs_attention(await self._store.count(parked))
        await self._store.join(self._replica, self._settings.lease)
        self._joined = True
        _, self._feed_seen = await self._store.feed_bounds()
        claimed = await self._claim_batch()
        if claimed:
            log.info("resumed %d unfinished sagas (more are claimed in the background)", claimed)
        await self._refresh_summary()
        self._every(1.0, self._refresh_summary_when_due, "store summary")
        self._every(self._settings.renew_every, self._renew, "lease renewal")
        self._every(self._settings.claim_every, self._claim_all, "claiming sagas")
        self._every(self._settings.follow_every, self._follow_others, "following other replicas")
        retention = self._settings.retention
        if retention is not None:
            self._every(
                self._settings.retention_every, lambda: self._prune_quietly(retention), "retention"
            )
        return claimed

    # -- leases -----------------------------------------------------------------------------

    async def _claim_batch(self) -> int:
        """Claim one batch of sagas no live replica holds, and run them; how many."""
        if self._stopping:
            return 0
        claimed = await self._store.claim(self._replica, self._settings.claim_batch)
        for each in claimed:
            stale = self._active.pop(each.saga.saga_id, None)
            if stale is not None:  # held here before a lapse of the lease: the old hold is void
                self._abandon(stale)
            self._activate(each.saga, each.fence)
        if claimed:
            self._telemetry.sagas_claimed(len(claimed))
        return len(claimed)

    async def _claim_all(self) -> None:
        """Claim batch after batch until a batch comes back short."""
        full = True
        while full:
            full = await self._claim_batch() == self._settings.claim_batch
            await asyncio.sleep(0)  # let the sagas just claimed, and everyone else, move

    async def _renew(self) -> None:
        """Keep this replica's lease; if it ran out (a long pause), its sagas may be others' now:
        drop every hold and join anew, then claim what is still free."""
        if self._stopping:
            return
        renewed = await self._store.renew(self._replica, self._settings.lease)
        self._store_is(True)
        if renewed:
            return
        log.warning(
            "the lease of replica %s ran out (was the process paused?): letting go of %d sagas "
            "and joining again",
            self._replica,
            len(self._active),
        )
        self._telemetry.lease_lost()
        for active in list(self._active.values()):
            self._abandon(active)
        self._active.clear()
        await self._store.join(self._replica, self._settings.lease)
        await self._claim_all()

    async def _follow_others(self) -> None:
        """Look for changes other replicas committed: wake the feed's followers, and hand the
        changes of sagas watched here to their watchers, in order."""
        _, newest = await self._store.feed_bounds()
        expected = self._feed_seen + self._own_commits
        self._own_commits = 0
        if newest <= expected:  # every new position is one of ours (positions have no gaps)
            self._feed_seen = max(self._feed_seen, newest)
            return
        self._feed_moved()
        position = self._feed_seen
        while position < newest and not self._stopping:
            page = await self._store.feed(position, FEED_PAGE)
            if not page.changes:
                break
            for change in page.changes:
                if self._watchers.watching(change.saga_id):
                    await self._tell_watchers(change)
            position = page.position
        self._feed_seen = max(position, newest)
        for saga_id in [s for s in self._views if not self._watchers.watching(s)]:
            del self._views[saga_id]

    async def _tell_watchers(self, change: FeedChange) -> None:
        """Publish another replica's change of a watched saga: the saga after it, rebuilt by
        the core from the saga before it (the log is read when that is not known here)."""
        saga_id, record = change.saga_id, change.record
        active = self._active.get(saga_id)
        if active is not None and active.saga.version >= record.sequence:
            return  # this replica's own change, published when it was committed
        view = self._views.get(saga_id)
        if view is None or view.version != record.sequence - 1:
            log = await self._store.events(saga_id)
            earlier = [(e.event, e.recorded_at) for e in log if e.sequence < record.sequence]
            full = [e for e in log if e.sequence == record.sequence]
            if not earlier or not full:
                return  # pruned meanwhile
            view = fold(earlier)
            record = full[0]  # with the creation's input, which the feed does not carry
        saga = decide(view, record.event, record.recorded_at).saga
        self._views[saga_id] = saga
        self._watchers.publish(SagaChange(saga, record))

    def _store_is(self, up: bool) -> None:
        """Note whether the store answers; say so when that changes."""
        if up is self._store_up:
            return
        self._store_up = up
        if up:
            log.warning("the store answers again: sagas move on")
        else:
            log.error("the store does not answer: sagas wait, writes are retried")
        if self.on_store_health is not None:
            self.on_store_health(up)

    def _abandon(self, active: _Active) -> None:
        """Stop moving a saga here: this replica's hold on it is void (nothing more is written)."""
        active.fence = Fence(self._replica, -1)  # any write it still tries is refused
        if active.runner is not None and not active.runner.done():
            active.runner.cancel()

    async def _hold(self, saga_id: str) -> _Active:
        """The saga, held here for an action: the entry of a saga this replica moves, or the
        saga taken over from whoever holds it (its epoch moves on: they can write no more)."""
        active = self._active.get(saga_id)
        if active is not None:
            return active
        async with self._taking:  # one take at a time: two actions never take a saga twice
            active = self._active.get(saga_id)
            if active is not None:
                return active
            stored = await self._store.get(saga_id)
            if stored is None:
                raise SagaNotFound(self._not_found(saga_id))
            if stored.state.is_terminal:
                return _Active(stored)  # nothing can change it: no need to hold it
            claimed: Claimed | None = await self._store.take(self._replica, saga_id)
            if claimed is None:
                raise ShuttingDown(f"replica {self._replica} holds no lease now; retry")
            active = _Active(claimed.saga, claimed.fence)
            self._active[saga_id] = active
            return active

    async def create_saga(
        self,
        saga_id: str | None,
        definition: str,
        version: int,
        payload: bytes,
        client_headers: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> tuple[Saga, bool]:
        """Store a new saga and start it; idempotent on ``saga_id``. Returns (saga, created).

        ``client_headers`` are the caller's trace headers: the saga's trace links to them.
        The work is shielded from the caller's cancellation (a client's deadline): once the
        store may have taken the saga, the saga is also published and started.
        """
        return await asyncio.shield(
            self._create(saga_id, definition, version, payload, client_headers or {}, labels or {})
        )

    async def _create(
        self,
        saga_id: str | None,
        definition: str,
        version: int,
        payload: bytes,
        client_headers: Mapping[str, str],
        labels: Mapping[str, str],
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
        created = SagaCreated(
            saga_id, resolved, payload, trace_context, MappingProxyType(dict(labels))
        )
        decision = start(created, now)
        record = RecordedEvent(saga_id, decision.saga.version, now, created)
        try:
            saga, is_new = await self._store.create(
                decision.saga,
                record,
                fingerprint(definition, version, payload, labels),
                self._replica,
            )
        except StorageFailure as error:
            self._fail(error)
            raise
        if is_new:
            self._own_commits += 1
            self._crash.reach(CrashPoint.AFTER_CREATE_COMMIT)
            self._observer.created(saga)
            self._watchers.publish(SagaChange(saga, record))
            self._feed_moved()
            self._activate(saga, Fence(self._replica, 1))
        elif saga_id in self._active:
            saga = self._active[saga_id].saga
        # Otherwise stored before, and moved by whichever replica holds it (a saga nobody
        # holds, such as one whose creation was cut off, is claimed within a second).
        return saga, is_new

    async def get_saga(self, saga_id: str) -> Saga:
        """The saga's latest committed state."""
        active = self._active.get(saga_id)
        if active is not None:
            return active.saga
        saga = await self._store.get(saga_id)
        if saga is None:
            raise SagaNotFound(self._not_found(saga_id))
        return saga

    def _not_found(self, saga_id: str) -> str:
        message = f"no saga with id {saga_id!r}"
        retention = self._settings.retention
        if retention is not None:
            message += f" (ended sagas are pruned {_days(retention)} after they end)"
        elif self._pruned:
            message += " (it may have ended and been pruned)"
        return message

    async def list_sagas(self, where: SagaFilter, limit: int, after: ListCursor | None) -> SagaPage:
        """One page of sagas, oldest first."""
        return await self._store.list(where, limit, after)

    async def cancel_saga(self, saga_id: str, reason: str, actor: str = "") -> Saga:
        """Cancel a running saga: it compensates every step that had been sent.

        Shielded from the caller's cancellation, like creation: a stored cancellation is always
        applied here too.
        """
        return await asyncio.shield(self._cancel(saga_id, reason, actor))

    async def _cancel(self, saga_id: str, reason: str, actor: str) -> Saga:
        if self._stopping:
            raise ShuttingDown("the coordinator is shutting down; retry on another instance")
        if saga_id not in self._active:
            saga = await self.get_saga(saga_id)
            check_cancellable(saga)  # refused before the saga is taken over from anyone
            if saga.state is SagaState.COMPENSATING:
                return saga

        def cancel(active: _Active) -> Event | None:
            check_cancellable(active.saga)
            if active.saga.state is SagaState.COMPENSATING:
                return None  # cancelled already: nothing to do
            return CancelRequested(reason, active.in_flight, actor)

        return await self._held(saga_id, cancel)

    async def act(
        self,
        saga_id: str,
        action: Callable[[Saga, bool], OperatorEvent],
        expected_version: int = 0,
    ) -> Saga:
        """Apply an operator action to a saga; return the saga once the action is stored.

        ``action`` builds the event from the saga as it stands and whether its pending call is
        in flight. The core decides it like any other event; an action that does not fit raises
        ``ActionNotAllowed`` naming the state and what would fit, and stores nothing. Actions on
        one saga are serialised by its lock: of two concurrent ones, the second is decided on
        the saga the first left, and refused if it no longer fits.
        """
        return await asyncio.shield(self._act(saga_id, action, expected_version))

    async def _act(
        self,
        saga_id: str,
        action: Callable[[Saga, bool], OperatorEvent],
        expected_version: int,
    ) -> Saga:
        if self._stopping:
            raise ShuttingDown("the coordinator is shutting down; retry on another instance")

        def act(active: _Active) -> Event:
            saga = active.saga
            if expected_version and saga.version != expected_version:
                raise StaleVersion(
                    f"saga {saga_id} is at version {saga.version}, not {expected_version}: "
                    "it moved on since it was read; read it again and decide again"
                )
            event = action(saga, active.in_flight)
            check_action(saga, event)
            return event

        return await self._held(saga_id, act)

    async def _held(self, saga_id: str, decide_event: Callable[[_Active], Event | None]) -> Saga:
        """Apply the event ``decide_event`` builds under the saga's lock, holding the saga here
        (taken over from another replica if need be); start its runner if it moves on."""
        active = await self._hold(saga_id)
        active.holders += 1
        try:
            async with active.lock:
                event = decide_event(active)
                if event is None:
                    return active.saga
                if not await self._apply_locked(active, event):
                    raise ActionNotAllowed(f"saga {saga_id} moved on; the action was not applied")
                saga = active.saga
                if not saga.state.is_settled and (active.runner is None or active.runner.done()):
                    self._active[saga_id] = active
                    active.runner = asyncio.create_task(self._run(active), name=f"saga {saga_id}")
                return saga
        finally:
            active.holders -= 1
            self._release(active)

    def _release(self, active: _Active) -> None:
        """Forget a saga nothing moves any more: no runner and no action holding it."""
        saga_id = active.saga.saga_id
        idle = active.runner is None or active.runner.done()
        if idle and active.holders == 0 and self._active.get(saga_id) is active:
            del self._active[saga_id]

    async def saga_events(
        self, saga_id: str, after_sequence: int, limit: int, *, newest_first: bool = False
    ) -> tuple[Saga, Sequence[RecordedEvent]]:
        """The saga and up to ``limit`` events of its log after ``after_sequence`` in the
        reading order (see ``SagaStore.events_page``)."""
        saga = await self.get_saga(saga_id)
        events = await self._store.events_page(
            saga_id, after_sequence, limit, newest_first=newest_first
        )
        return saga, events

    async def count_sagas(self, where: SagaFilter) -> Mapping[SagaState, int]:
        """How many sagas match ``where`` in each state (every state present, zero included)."""
        counts = await self._store.count_by_state(where)
        return {state: counts.get(state, 0) for state in SagaState}

    # -- change feed ------------------------------------------------------------------------

    async def changes(
        self, after_position: int | None, where: ChangeFilter, *, follow: bool = True
    ) -> AsyncIterator[FeedPage]:
        """The change feed after ``after_position`` (None: from now on), page by page.

        Each page holds the matching changes read and the position read up to, even when
        nothing matched, so that a consumer resuming after it misses nothing. The feed is read
        from the store, never buffered per consumer: a consumer that reads slowly costs no
        memory and holds no saga up. With ``follow`` it then waits for new commits.
        """
        pruned, newest = await self._store.feed_bounds()
        position = newest if after_position is None else after_position
        self._check_feed_position(position, pruned)
        while not self._stopping:
            committed = self._committed
            page = await self._store.feed(position, FEED_PAGE)
            if page.changes:
                self._check_feed_position(position, page.pruned_through)  # pruned meanwhile
                position = page.position
                matching = tuple(c for c in page.changes if where.matches(c))
                yield FeedPage(matching, position, page.pruned_through)
                if len(page.changes) == FEED_PAGE:
                    continue
            if not follow:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(committed.wait(), timeout=FEED_IDLE_CHECK)
        raise ShuttingDown(f"the coordinator is shutting down; resume after position {position}")

    @staticmethod
    def _check_feed_position(position: int, pruned: int) -> None:
        if position < pruned:
            raise FeedPositionPruned(
                f"the change feed's history up to position {pruned} was pruned (retention): "
                f"position {position} may have missed changes; resume after {pruned}, or from now"
            )

    def _feed_moved(self) -> None:
        self._committed.set()
        self._committed = asyncio.Event()

    # -- definitions ------------------------------------------------------------------------

    async def load_definitions(
        self, files: Sequence[SagaDefinition], participants: Collection[str]
    ) -> None:
        """Register the definition files (unchanged ones are no-ops; a changed one under a
        registered version refuses the start), then run every registered definition."""
        for definition in files:
            try:
                await self._store.register_definition(definition, self._now())
            except DefinitionConflict as error:
                raise DefinitionConflict(
                    f"{error.message}: the file of {definition.name!r} version "
                    f"{definition.version} changed since that version was registered; give the "
                    "new content a new version (sagas keep the version they started with)"
                ) from None
        registered = await self._store.definitions()
        self._catalog = DefinitionCatalog.of(r.definition for r in registered)
        self._participants = frozenset(participants)

    async def register_definition(
        self, definition: SagaDefinition, source: str
    ) -> tuple[RegisteredDefinition, bool]:
        """Validate and register a new definition version; see ``SagaStore.register_definition``.

        Sagas already running keep the version they started with; new ones that name no
        version run the newest.
        """
        if self._stopping:
            raise ShuttingDown("the coordinator is shutting down; retry on another instance")
        validate_definition(definition, self._participants, source)
        registered, created = await self._store.register_definition(definition, self._now())
        if created:
            self._catalog = DefinitionCatalog.of([*self._catalog.all(), registered.definition])
            log.info("definition %s v%d registered", definition.name, definition.version)
        return registered, created

    async def definitions(self, name: str | None = None) -> Sequence[RegisteredDefinition]:
        """The registered definitions (of ``name``), with their unfinished sagas counted."""
        found = await self._store.definitions(name)
        if name is not None and not found:
            self._catalog.resolve(name)  # raises DefinitionNotFound naming the known ones
        return found

    async def definition(self, name: str, version: int = 0) -> RegisteredDefinition:
        """One registered version of a definition (0: the newest)."""
        wanted = self._catalog.resolve(name, version)
        for registered in await self._store.definitions(name):
            if registered.definition.version == wanted.version:
                return registered
        raise DefinitionNotFound(f"saga definition {name!r} has no version {wanted.version}")

    # -- retention --------------------------------------------------------------------------

    async def prune(
        self, older_than: timedelta, *, dry_run: bool = False
    ) -> tuple[datetime, PruneResult]:
        """Remove sagas that ended SUCCEEDED or COMPENSATED more than ``older_than`` ago, with
        their events, a small batch per transaction; running and parked sagas are never
        pruned. Returns the cutoff and what was (with ``dry_run``: would be) removed."""
        cutoff = self._now() - older_than
        if dry_run:
            return cutoff, await self._store.count_prunable(cutoff)
        sagas = events = 0
        batch = self._settings.prune_batch
        while not self._stopping:
            done = await self._store.prune(cutoff, batch)
            sagas += done.sagas
            events += done.events
            if done.sagas < batch:
                break
            await asyncio.sleep(0.01)  # let sagas' own writes through between batches
        if sagas:
            self._pruned = True
            log.info("pruned %d sagas that ended before %s", sagas, cutoff.isoformat())
        return cutoff, PruneResult(sagas, events)

    async def _prune_quietly(self, older_than: timedelta) -> None:
        await self.prune(older_than)

    async def _refresh_summary(self) -> None:
        self._summary_due = False
        self._summary_read = time.monotonic()
        oldest = await self._store.oldest_unfinished()
        parked = await self._store.parked_by_step()
        self._telemetry.set_store_summary(oldest, parked)

    async def _refresh_summary_when_due(self) -> None:
        """Read the summary again when a saga parked or left parking, else now and then."""
        stale = time.monotonic() - self._summary_read >= self._settings.summary_every
        if self._summary_due or stale:
            await self._refresh_summary()

    def _every(self, seconds: float, job: Callable[[], Awaitable[None]], name: str) -> None:
        async def loop() -> None:
            while not self._stopping:
                await asyncio.sleep(seconds)  # cancelled by stop()
                try:
                    await job()
                except StorageUnavailable as error:
                    self._store_is(False)
                    log.warning("%s skipped: %s", name, error.message)
                except StorageFailure as error:
                    self._fail(error)
                    return
                except Exception:
                    log.exception("%s failed", name)

        task = asyncio.create_task(loop(), name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

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
        self._feed_moved()  # feed followers end
        for task in list(self._background):
            task.cancel()
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
        if self._joined:
            # Let go of the sagas still unfinished here: the next replica (or this one,
            # restarted) claims them at once instead of waiting for the lease to run out.
            self._joined = False
            with contextlib.suppress(StorageFailure, StorageUnavailable):
                await self._store.leave(self._replica)
        await self._observer.drain(grace)

    # -- inside ---------------------------------------------------------------------------------

    def _activate(self, saga: Saga, fence: Fence | None) -> None:
        if saga.state.is_settled or self._stopping:
            return
        active = _Active(saga, fence)
        self._active[saga.saga_id] = active
        active.runner = asyncio.create_task(self._run(active), name=f"saga {saga.saga_id}")

    async def _run(self, active: _Active) -> None:
        saga_id = active.saga.saga_id
        try:
            await self._drive(active)
        except asyncio.CancelledError:
            raise
        except LeaseLost as error:
            log.warning("%s; letting the saga go", error.message, extra={"saga_id": saga_id})
        except StorageFailure as error:  # _apply_locked has asked the process to stop
            log.error("storage failed: %s", error.message, extra={"saga_id": saga_id})
        except BaseException as error:  # a runner that dies silently would strand its saga
            log.exception("saga runner failed", extra={"saga_id": saga_id})
            self._fail(error)
        finally:
            if self._active.get(saga_id) is active and active.holders == 0:
                del self._active[saga_id]

    async def _drive(self, active: _Active) -> None:
        """Send the saga's pending call, apply the answer, and so on until it settles.

        The saga's lock is taken once per answer: applying it and choosing the next call happen
        together, so no cancellation can slip in between.
        """
        async with active.lock:
            call, delay = await self._next_locked(active)
        while not self._stopping:
            if call is None:
                if delay is None:
                    return
                # Waiting out a backoff (or until the deadline); a cancellation, an operator's
                # action or a stop wakes us early.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(active.wake.wait(), timeout=delay)
                async with active.lock:
                    call, delay = await self._next_locked(active)
                continue
            if call.operation is Operation.COMPENSATE:
                self._crash.reach(CrashPoint.INSIDE_COMPENSATION)
            sent_at = self._now()
            outcome = await self._gateway.send(call)
            self._crash.reach(CrashPoint.AFTER_ANSWER)
            answered = CallAnswered(call.operation, call.step_index, call.attempt, outcome, sent_at)
            async with active.lock:
                if self._deadline_passed(active.saga) and not pivot_sent(active.saga):
                    # Past the deadline before the pivot: turn back first, so that this answer
                    # is taken as the last one going forward (its step is then undone).
                    await self._apply_locked(active, DeadlineExceeded(call_in_flight=True))
                active.in_flight = False
                await self._apply_locked(active, answered)
                call, delay = await self._next_locked(active)

    async def _next_locked(self, active: _Active) -> tuple[ParticipantCall | None, float | None]:
        """Apply the saga's deadline if it has passed, then choose the next call (or how long
        to wait: never past the deadline). The caller holds the saga's lock."""
        deadline = active.saga.deadline_at
        if deadline is None or active.saga.deadline_exceeded:
            return self._next_call(active)
        if self._deadline_passed(active.saga):
            await self._apply_locked(active, DeadlineExceeded(active.in_flight))
        call, delay = self._next_call(active)
        if call is None and delay is not None and active.saga.state is SagaState.RUNNING:
            delay = max(0.0, min(delay, (deadline - self._now()).total_seconds()))
        return call, delay

    def _deadline_passed(self, saga: Saga) -> bool:
        """Whether the saga runs past its deadline, not acted on yet."""
        deadline = saga.deadline_at
        return (
            deadline is not None
            and not saga.deadline_exceeded
            and saga.state is SagaState.RUNNING
            and self._now() >= deadline
        )

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

    async def _apply_locked(self, active: _Active, event: Event) -> bool:
        """Decide, commit, then publish; the caller holds the saga's lock. False when the event
        did not apply (the saga is unchanged)."""
        delay = self._settings.storage_retry_initial
        while True:
            now = self._now()
            previous = active.saga
            decision = decide(previous, event, now)
            if not decision.changed:
                return False
            saga = decision.saga
            record = RecordedEvent(saga.saga_id, saga.version, now, event)
            if saga.state.is_terminal:
                self._crash.reach(CrashPoint.BEFORE_TERMINAL_WRITE)
            try:
                # Commit before acting: the decision (and the call it implies) is durable before
                # any participant hears of it, so a crash re-sends rather than forgets.
                await self._store.commit(saga, record, changed_steps(previous, saga), active.fence)
            except StorageUnavailable as error:
                self._store_is(False)
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
            except LeaseLost:
                # Another replica holds the saga now (or this one's lease ran out): nothing was
                # written, and nothing more will be from here.
                self._telemetry.stale_write()
                if self._active.get(saga.saga_id) is active:
                    del self._active[saga.saga_id]
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
            self._own_commits += 1
            if not self._store_up:
                self._store_is(True)
            if decision.dispatches:
                self._crash.reach(CrashPoint.AFTER_DISPATCH_COMMIT)
            active.saga = saga
            active.wake.set()
            if (saga.state is SagaState.NEEDS_ATTENTION) is not (
                previous.state is SagaState.NEEDS_ATTENTION
            ):
                self._summary_due = True
            self._watchers.publish(SagaChange(saga, record))
            self._feed_moved()
            retried = isinstance(event, CallAnswered) and any(
                command.step == event.step and command.operation is event.operation
                for command in decision.commands
            )
            self._observer.moved(previous, saga, event, retried=retried)
            return True

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


def _days(value: timedelta) -> str:
    """A retention period for people: ``30d``, ``12h``, ``90s``."""
    seconds = int(value.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0 and seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
