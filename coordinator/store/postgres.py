"""The PostgreSQL saga store: one database shared by coordinator replicas.

Each operation borrows a connection from a pool (psycopg 3, asyncio). A write is one READ
COMMITTED transaction holding everything a decision changes: the saga row, the steps that
changed, the event with its change-feed position, and the sagas counted per state. Optimistic
concurrency protects a saga: a commit locks its row and checks the version it expects. Reads
that take more than one statement (a saga and its steps, a page and its sagas' steps, a feed
page and the pruning horizon) run in one REPEATABLE READ transaction, so they come from one
snapshot. How feed positions follow commit order is told in ``postgres_sql``.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta

import psycopg
from psycopg import IsolationLevel
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

from coordinator.core.events import RecordedEvent
from coordinator.core.model import Saga, SagaDefinition, SagaState
from coordinator.ports import (
    Claimed,
    FeedPage,
    Fence,
    ListCursor,
    PruneResult,
    RegisteredDefinition,
    SagaFilter,
    SagaPage,
)
from coordinator.store import postgres_leases as leases
from coordinator.store import postgres_sql as sql
from coordinator.store.errors import StoreClosed, StoreCorrupt
from coordinator.store.packing import digest, from_micros, pack_definition, to_micros
from coordinator.store.postgres_errors import translate
from coordinator.store.postgres_rows import (
    Connection,
    Definitions,
    count_move,
    fetch_one,
    move_counts,
    read_counts,
    read_saga,
    read_sagas,
)
from coordinator.store.postgres_schema import describe, load_migrations, migrate
from coordinator.store.rows import (
    event_row,
    events_of,
    events_page_bound,
    feed_change_of,
    label_rows,
    saga_row,
    saga_update,
    step_rows,
    step_updates,
)
from coordinator.store.rules import (
    already_exists,
    check_commit,
    check_creation,
    check_lease,
    check_limit,
    check_prune_limit,
    counted,
    definition_conflict,
    only_counted,
    page_of,
    stale,
)


class PostgresStore:
    """Sagas and their append-only event logs in a PostgreSQL database.

    Open it with ``await PostgresStore.open(url)``; close it with ``await store.close()``.
    Several stores (several coordinator processes) may share one database.
    """

    def __init__(self, pool: AsyncConnectionPool[Connection], where: str) -> None:
        """Assemble an opened store; use ``PostgresStore.open``."""
        self._pool = pool
        self._where = where
        self._definitions = Definitions()
        self._closed = False
        self._busy = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing: asyncio.Future[None] | None = None

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        pool_min: int = 1,
        pool_max: int = 10,
        connect_timeout: float = 10.0,
        stall_timeout: float = 10.0,
    ) -> PostgresStore:
        """Connect to the database at ``url`` and migrate it to the current schema.

        ``pool_min`` connections are kept open, up to ``pool_max`` are opened under load.
        ``connect_timeout``: how long, in seconds, opening the store or any operation waits for
        a connection (a new one, or a free one of the pool) before it fails with
        ``StorageUnavailable``, and how long a failing connection is retried (backing off)
        before the next operation starts afresh. ``stall_timeout``: how long, in seconds, the
        server waits for this process in the middle of a transaction before it rolls the
        transaction back and closes the connection (``idle_in_transaction_session_timeout``),
        so that a process paused mid-write holds the locks every writer needs for no longer
        (``saga serve`` sets the replica's lease).

        Raises ``StorageUnavailable`` when the server cannot be reached, ``SchemaTooNew`` for a
        database migrated by a newer coordinator and ``StoreCorrupt`` for one that is not a saga
        store; such databases are not modified.
        """
        if pool_min < 0 or pool_max < 1 or pool_min > pool_max:
            raise ValueError(
                f"the pool needs 0 <= pool_min <= pool_max and pool_max >= 1, not "
                f"pool_min={pool_min}, pool_max={pool_max}"
            )
        if not connect_timeout > 0:
            raise ValueError(f"connect_timeout must be positive, not {connect_timeout}")
        if not stall_timeout >= 0.001:
            raise ValueError(f"stall_timeout must be at least 1 ms, not {stall_timeout}")
        where = describe(url)
        migrations = load_migrations()
        pool: AsyncConnectionPool[Connection] = AsyncConnectionPool(
            url,
            min_size=pool_min,
            max_size=pool_max,
            timeout=connect_timeout,
            # The pool retries a failed connection after 1, 2, 4, 8 s... for up to five minutes
            # by default: a server back after an outage of T seconds could wait about another T
            # for its first connection. Given up sooner, the next operation starts a fresh
            # attempt at once, so connections resume within seconds of the server's return.
            reconnect_timeout=connect_timeout,
            kwargs={
                "autocommit": True,
                # libpq counts whole seconds, and at least two.
                "connect_timeout": max(2, math.ceil(connect_timeout)),
                "options": _with_stall_timeout(url, stall_timeout),
            },
            open=False,
            name=f"saga-store {where}",
        )
        try:
            await pool.open(wait=pool_min > 0, timeout=connect_timeout)
            async with pool.connection() as connection:
                await migrate(connection, where, migrations)
        except psycopg.Error as error:
            await pool.close()
            raise translate(error, f"opening the saga store {where}") from error
        except BaseException:
            await pool.close()
            raise
        return cls(pool, where)

    @property
    def where(self) -> str:
        """The database, as messages name it (host, port and database; no password)."""
        return self._where

    # --- writes ------------------------------------------------------------------------------

    async def create(
        self, saga: Saga, event: RecordedEvent, fingerprint: str, replica: str | None = None
    ) -> tuple[Saga, bool]:
        """Store a new saga with its first event; see ``SagaStore.create``.

        A definition version no saga ran before is registered with it, at the saga's creation
        time (a registered version keeps its registered content).
        """
        self._check_open()
        check_creation(saga, event)
        definitions = self._definitions
        known_definition = definitions.known_id(saga.definition)
        doing = f"creating saga {saga.saga_id}"
        async with self._writing(doing) as connection:
            definition_id = known_definition
            while True:
                found = await fetch_one(connection, sql.SELECT_FINGERPRINT, (saga.saga_id,))
                if found is not None:
                    if found[0] != fingerprint:
                        raise already_exists(saga.saga_id)
                    stored = await read_saga(
                        connection, definitions, saga.saga_id, sql.SELECT_SAGA_FOR_SHARE
                    )
                    if stored is not None:
                        return stored, False
                    continue  # pruned since it was found: the id is free again
                if definition_id is None:
                    # Once per definition and process: the version every saga runs is registered.
                    definition_id = await definitions.store(connection, saga.definition)
                    await connection.execute(
                        sql.REGISTER,
                        (
                            saga.definition.name,
                            saga.definition.version,
                            definition_id,
                            to_micros(saga.created_at),
                        ),
                    )
                row = saga_row(saga, definition_id, fingerprint)
                if await fetch_one(connection, sql.INSERT_SAGA, row) is not None:
                    break
                # Another creation of this id committed while this one waited for it: read it.
            if replica is not None:
                await connection.execute(leases.HOLD_NEW, (replica, saga.saga_id))
            # One statement at a time, not executemany (which pipelines): see ``_writing``.
            for step in step_rows(saga):
                await connection.execute(sql.INSERT_STEP, step)
            for label in label_rows(saga):
                await connection.execute(sql.INSERT_LABEL, label)
            await move_counts(connection, [count_move(saga, saga.state, 1)])
            await connection.execute(sql.APPEND_EVENT, (*event_row(event), saga.state.value))
        # Only now is the definition's row known to be committed.
        definitions.remember(saga.definition, definition_id)
        return saga, True

    async def commit(
        self,
        saga: Saga,
        event: RecordedEvent,
        changed_steps: Sequence[int] | None = None,
        fence: Fence | None = None,
    ) -> None:
        """Store the saga's new state with its event; see ``SagaStore.commit``."""
        self._check_open()
        check_commit(saga, event)
        steps = step_updates(
            saga, range(len(saga.steps)) if changed_steps is None else changed_steps
        )
        async with self._writing(f"committing saga {saga.saga_id} v{saga.version}") as connection:
            if fence is None:
                found = await fetch_one(connection, sql.LOCK_SAGA, (saga.saga_id,))
            else:
                found = await fetch_one(
                    connection, leases.LOCK_FENCED, (fence.replica, saga.saga_id)
                )
                if found is not None:
                    check_lease(saga.saga_id, fence, found[2], found[3], bool(found[4]))
            if found is None or found[0] != saga.version - 1:
                raise stale(saga, None if found is None else found[0])
            await connection.execute(sql.UPDATE_SAGA, saga_update(saga))
            if fence is not None and saga.state.is_settled:
                await connection.execute(leases.SETTLED, (saga.saga_id,))
            for step in steps:  # one at a time, not executemany: see ``_writing``
                await connection.execute(sql.UPDATE_STEP, step)
            before = SagaState(found[1])
            if before is not saga.state:
                moves = [count_move(saga, before, -1), count_move(saga, saga.state, 1)]
                await move_counts(connection, moves)
            await connection.execute(sql.APPEND_EVENT, (*event_row(event), saga.state.value))

    # --- reads -------------------------------------------------------------------------------

    async def get(self, saga_id: str) -> Saga | None:
        """The saga, or None."""
        async with self._reading(f"reading saga {saga_id}") as connection:
            return await read_saga(connection, self._definitions, saga_id)

    async def list(self, where: SagaFilter, limit: int, after: ListCursor | None) -> SagaPage:
        """Up to ``limit`` sagas matching ``where``, oldest first, after ``after``."""
        check_limit(limit)
        async with self._reading("listing sagas") as connection:
            versions: Sequence[int] = ()
            if (
                not where.states
                and where.definition is not None
                and where.definition_version is None
            ):
                # Sagas of a definition are read one version at a time, in listing order.
                cursor = await connection.execute(sql.SELECT_VERSIONS, (where.definition,))
                versions = [int(row[0]) for row in await cursor.fetchall()]
                if not versions:
                    return SagaPage(sagas=(), next_cursor=None)
            query, params = sql.list_query(where, limit, after, versions)
            sagas = await read_sagas(connection, self._definitions, query, params)
        return page_of(sagas, limit)

    async def count(self, where: SagaFilter) -> int:
        """How many sagas match ``where``."""
        async with self._connection("counting sagas") as connection:
            if only_counted(where):
                by_state = counted(await read_counts(connection), where)
                return sum(n for state, n in by_state.items() if _wanted(state, where))
            found = await fetch_one(connection, *sql.count_query(where))
            return 0 if found is None else int(found[0])

    async def count_by_state(self, where: SagaFilter) -> Mapping[SagaState, int]:
        """How many sagas match ``where`` in each state (``where.states`` ignored; states with
        none are left out)."""
        async with self._connection("counting sagas by state") as connection:
            if only_counted(where):
                by_state = counted(await read_counts(connection), where)
            else:
                cursor = await connection.execute(*sql.count_by_state_query(where))
                by_state = {SagaState(state): int(n) for state, n in await cursor.fetchall()}
        return {state: n for state, n in by_state.items() if n}

    async def events(self, saga_id: str) -> Sequence[RecordedEvent]:
        """The saga's event log, in order (empty if the saga does not exist)."""
        async with self._reading(f"reading the events of saga {saga_id}") as connection:
            saga = await read_saga(connection, self._definitions, saga_id)
            if saga is None:
                return ()
            cursor = await connection.execute(sql.SELECT_EVENTS, (saga_id,))
            return events_of(saga, await cursor.fetchall())

    async def events_page(
        self, saga_id: str, after_sequence: int, limit: int, *, newest_first: bool = False
    ) -> Sequence[RecordedEvent]:
        """Up to ``limit`` events of the saga's log; see ``SagaStore.events_page``."""
        check_limit(limit, "event")
        query = sql.SELECT_EVENTS_PAGE_BACKWARDS if newest_first else sql.SELECT_EVENTS_PAGE
        bound = events_page_bound(after_sequence, newest_first)
        async with self._reading(f"reading the events of saga {saga_id}") as connection:
            cursor = await connection.execute(query, (saga_id, bound, limit))
            rows = await cursor.fetchall()
            if not rows:
                return ()
            saga = await read_saga(connection, self._definitions, saga_id)
            return () if saga is None else events_of(saga, rows)

    # --- replicas and leases (see ``postgres_leases``) --------------------------------------

    async def join(self, replica: str, lease: timedelta) -> None:
        """Start the replica's lease; see ``SagaStore.join``."""
        async with self._writing(f"starting the lease of {replica}") as connection:
            await leases.join(connection, replica, lease)

    async def renew(self, replica: str, lease: timedelta) -> bool:
        """Extend the replica's lease unless it ran out; see ``SagaStore.renew``."""
        async with self._writing(f"renewing the lease of {replica}") as connection:
            return await leases.renew(connection, replica, lease)

    async def leave(self, replica: str) -> int:
        """End the lease and let go of the replica's sagas; see ``SagaStore.leave``."""
        async with self._writing(f"ending the lease of {replica}") as connection:
            return await leases.leave(connection, replica)

    async def claim(self, replica: str, limit: int) -> Sequence[Claimed]:
        """Take unfinished sagas no live replica holds, oldest first; see ``SagaStore.claim``."""
        check_limit(limit)
        async with self._writing(f"claiming sagas for {replica}") as connection:
            return await leases.claim(connection, self._definitions, replica, limit)

    async def take(self, replica: str, saga_id: str) -> Claimed | None:
        """Take one saga whoever holds it; see ``SagaStore.take``."""
        async with self._writing(f"taking saga {saga_id}") as connection:
            return await leases.take(connection, self._definitions, replica, saga_id)

    async def oldest_unfinished(self) -> datetime | None:
        """When the oldest saga that has not ended (running, compensating, parked) was created."""
        async with self._connection("finding the oldest unfinished saga") as connection:
            found = await fetch_one(connection, sql.SELECT_OLDEST_UNENDED)
        return None if found is None or found[0] is None else from_micros(found[0])

    async def parked_by_step(self) -> Mapping[tuple[str, str], int]:
        """NEEDS_ATTENTION sagas counted by (definition name, step they are stuck on)."""
        async with self._connection("counting the parked sagas") as connection:
            cursor = await connection.execute(sql.SELECT_PARKED)
            rows = await cursor.fetchall()
        found: dict[tuple[str, str], int] = {}
        for name, step, n in rows:
            key = (name, step or "")  # a parked saga always waits on a step; to be safe
            found[key] = found.get(key, 0) + int(n)
        return found

    # --- the definitions registry ------------------------------------------------------------

    async def register_definition(
        self, definition: SagaDefinition, at: datetime
    ) -> tuple[RegisteredDefinition, bool]:
        """Register a definition version; see ``SagaStore.register_definition``."""
        self._check_open()
        key = digest(pack_definition(definition))
        name, version = definition.name, definition.version
        doing = f"registering definition {name!r} version {version}"
        async with self._writing(doing) as connection:
            found = await fetch_one(connection, sql.SELECT_REGISTERED, (name, version))
            new = found is None
            if found is None:
                definition_id = await self._definitions.store(connection, definition)
                registered = await fetch_one(
                    connection, sql.REGISTER, (name, version, definition_id, to_micros(at))
                )
                if registered is None:
                    # Registered by a concurrent write that committed while this one waited.
                    new = False
                found = await fetch_one(connection, sql.SELECT_REGISTERED, (name, version))
                if found is None:
                    raise StoreCorrupt(f"definition {name!r} version {version} vanished")
            definition_id, registered_at, registered_digest = found
            if bytes(registered_digest) != key:
                raise definition_conflict(definition, bytes(registered_digest).hex())
            unfinished = await fetch_one(connection, sql.SELECT_UNENDED_COUNT, (name, version))
        # Only now is the definition's row known to be committed.
        self._definitions.remember(definition, definition_id)
        return RegisteredDefinition(
            definition,
            from_micros(registered_at),
            key.hex(),
            0 if unfinished is None else int(unfinished[2]),
        ), new

    async def definitions(self, name: str | None = None) -> Sequence[RegisteredDefinition]:
        """Registered definitions (of ``name``, or all), by name then version, with counts."""
        async with self._reading("reading the registered definitions") as connection:
            if name is None:
                registry = await connection.execute(sql.SELECT_REGISTRY)
                counts = await connection.execute(sql.SELECT_UNENDED_COUNTS)
            else:
                registry = await connection.execute(sql.SELECT_REGISTRY_OF, (name,))
                counts = await connection.execute(sql.SELECT_UNENDED_COUNTS_OF, (name,))
            rows = await registry.fetchall()
            unended = {
                (found_name, found_version): int(total)
                for found_name, found_version, total in await counts.fetchall()
            }
            definitions = await self._definitions.of(connection, {row[0] for row in rows})
        registered = []
        for definition_id, registered_at, key in rows:
            definition = definitions[definition_id]
            count = unended.get((definition.name, definition.version), 0)
            registered.append(
                RegisteredDefinition(definition, from_micros(registered_at), key.hex(), count)
            )
        return tuple(registered)

    # --- retention ---------------------------------------------------------------------------

    async def count_prunable(self, ended_before: datetime) -> PruneResult:
        """What ``prune`` would remove for this cutoff, counted; nothing is removed."""
        async with self._connection("counting the prunable sagas") as connection:
            # A saga's version is the length of its log: events are counted without reading them.
            found = await fetch_one(connection, sql.COUNT_PRUNABLE, (to_micros(ended_before),))
        return PruneResult(0, 0) if found is None else PruneResult(int(found[0]), int(found[1]))

    async def prune(self, ended_before: datetime, limit: int) -> PruneResult:
        """Remove up to ``limit`` sagas that ended SUCCEEDED or COMPENSATED before the cutoff,
        oldest ending first, with their events, steps and labels, in one transaction."""
        self._check_open()
        check_prune_limit(limit)
        cutoff = to_micros(ended_before)
        doing = f"pruning sagas that ended before {ended_before}"
        async with self._writing(doing) as connection:
            cursor = await connection.execute(sql.SELECT_PRUNABLE, (cutoff, limit))
            ids = [row[0] for row in await cursor.fetchall()]
            if not ids:
                return PruneResult(0, 0)
            gone = await fetch_one(connection, sql.PRUNE_EVENTS, (ids,))
            events, newest = (0, 0) if gone is None else (int(gone[0]), int(gone[1]))
            await connection.execute(sql.PRUNE_STEPS, (ids,))
            await connection.execute(sql.PRUNE_LABELS, (ids,))
            cursor = await connection.execute(sql.PRUNE_SAGAS, (ids,))
            moves = [
                (name, version, state, -int(n))
                for name, version, state, n in await cursor.fetchall()
            ]
            await move_counts(connection, moves)
            await connection.execute(sql.RAISE_HORIZON, (newest,))
        return PruneResult(len(ids), events)

    # --- change feed -------------------------------------------------------------------------

    async def feed(self, after_position: int, limit: int) -> FeedPage:
        """Up to ``limit`` changes after ``after_position``; see ``SagaStore.feed``."""
        self._check_open()
        if limit < 1:
            raise ValueError(f"a feed page holds at least one change, not {limit}")
        async with self._reading("reading the change feed") as connection:
            cursor = await connection.execute(sql.SELECT_FEED, (after_position, limit))
            rows = await cursor.fetchall()
            pruned = await fetch_one(connection, sql.SELECT_PRUNED_THROUGH)
            definitions = await self._definitions.of(connection, {row[7] for row in rows})
        return FeedPage(
            tuple(feed_change_of(definitions[row[7]], row) for row in rows),
            rows[-1][0] if rows else after_position,
            0 if pruned is None else int(pruned[0]),
        )

    async def feed_bounds(self) -> tuple[int, int]:
        """(highest position pruned, newest position); see ``SagaStore.feed_bounds``."""
        async with self._connection("reading the change feed's bounds") as connection:
            found = await fetch_one(connection, sql.SELECT_FEED_BOUNDS)
        if found is None:
            raise StoreCorrupt(f"{self._where} has no change feed bounds")
        return int(found[0]), int(found[1])

    # --- life cycle --------------------------------------------------------------------------

    async def close(self) -> None:
        """Let the operations under way finish, then close every connection. Idempotent."""
        self._closed = True
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._shut_down())
        await asyncio.shield(self._closing)

    async def _shut_down(self) -> None:
        await self._idle.wait()
        await self._pool.close()

    @asynccontextmanager
    async def _connection(self, doing: str) -> AsyncIterator[Connection]:
        """A connection of the pool for one operation (statements run one by one, each in its
        own transaction); psycopg's errors come out as the coordinator's."""
        self._check_open()
        self._busy += 1
        self._idle.clear()
        try:
            async with self._pool.connection() as connection:
                yield connection
        except psycopg.Error as error:
            raise translate(error, f"{doing} in {self._where}") from error
        finally:
            self._busy -= 1
            if not self._busy:
                self._idle.set()

    @asynccontextmanager
    async def _writing(self, doing: str) -> AsyncIterator[Connection]:
        """A connection inside a READ COMMITTED write transaction, committed at the end.

        Each statement is sent on its own and its result awaited (no pipeline mode, and no
        ``executemany``, which pipelines): whenever the server waits for this process
        mid-transaction it is "idle in transaction", which ``stall_timeout`` bounds. In
        pipeline mode the server waits "active" between two statements, with no timeout at
        all: a replica paused (SIGSTOP, a frozen VM) after taking the feed position's lock (see
        ``postgres_sql``) or a count's stopped every replica's writes, and its claims, until
        it woke up; one paused after locking a saga's row kept it from being taken over.
        """
        async with self._connection(doing) as connection:
            await connection.set_isolation_level(IsolationLevel.READ_COMMITTED)
            await connection.set_read_only(False)
            async with connection.transaction():
                yield connection

    @asynccontextmanager
    async def _reading(self, doing: str) -> AsyncIterator[Connection]:
        """A connection inside a REPEATABLE READ, read-only transaction: one snapshot."""
        async with self._connection(doing) as connection:
            await connection.set_isolation_level(IsolationLevel.REPEATABLE_READ)
            await connection.set_read_only(True)
            async with connection.transaction():
                yield connection

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed(f"the saga store {self._where} is closed")


def _wanted(state: SagaState, where: SagaFilter) -> bool:
    return not where.states or state in where.states


def _with_stall_timeout(url: str, stall_timeout: float) -> str:
    """The connection's ``options`` (the URL's own kept) with the server's timeout for a
    transaction left waiting on its client."""
    given = conninfo_to_dict(url).get("options")
    setting = f"-c idle_in_transaction_session_timeout={max(1, round(stall_timeout * 1000))}"
    return f"{given} {setting}" if given else setting
