"""Replicas on one PostgreSQL database, as real processes: ``saga serve`` processes killed,
paused and cut off from their database under load, real participants recording their effects
behind a barrier, and the torture checker reading what was left.

``pytest -s`` shows the takeover times measured.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from saga.v1 import coordinator_service_pb2 as cpb
from saga.v1 import saga_pb2

from tests.support.coordinator import SETTLED
from tests.support.postgres import PostgresServer, postgres_server
from tests.support.replicas import (
    DEFINITION,
    Client,
    Database,
    check_replicas_run,
    deliveries,
    problems,
    running_replicas,
    saga_input,
    start_participants,
    wait_until,
)
from tests.torture.scenario import STEP_NAMES, plan_of_input

LEASE = 2.0
"""Every replica's lease, in seconds (``saga serve --lease 2s``)."""


def _refusing_step(index: int) -> str | None:
    """Every fifth saga is refused by one of its steps, and compensates."""
    return STEP_NAMES[index // 5 % len(STEP_NAMES)] if index % 5 == 0 else None


async def _check_endings(database: Database, acknowledged: dict[str, bytes]) -> None:
    """Every acknowledged saga ended as its input planned: SUCCEEDED, or COMPENSATED when a
    step was to refuse."""
    endings = await database.endings()
    wrong = {}
    for saga_id in acknowledged:
        state, payload = endings[saga_id]
        refusing, _ = plan_of_input(payload)
        planned = "SUCCEEDED" if refusing is None else "COMPENSATED"
        if state != planned:
            wrong[saga_id] = f"{state}, planned {planned}"
    assert not wrong, f"sagas that did not end as planned: {wrong}"


async def test_three_replicas_under_load_one_sigkilled_the_others_take_over_its_sagas(
    tmp_path: Path, postgres_url: str
) -> None:
    sagas = 150
    database = Database(postgres_url)
    participants = await start_participants(tmp_path, delay_ms="60:240")
    try:
        async with (
            running_replicas(
                tmp_path, postgres_url, participants, ["r0", "r1", "r2"], lease=f"{LEASE:g}s"
            ) as replicas,
            Client(replicas, tmp_path / "client.log") as client,
        ):
            victim = replicas[1]

            async def submit() -> None:
                created = []
                for index in range(sagas):  # about 40 a second, round robin
                    payload = saga_input(index, _refusing_step(index))
                    create = client.create(f"load-{index:03d}", payload, first=index)
                    created.append(asyncio.create_task(create))
                    await asyncio.sleep(0.025)
                await asyncio.gather(*created)

            async def well_under_way() -> bool:
                return len(client.acknowledged) >= sagas // 3

            load = asyncio.create_task(submit())
            await wait_until(well_under_way, 30, "a third of the sagas acknowledged")
            await wait_until(lambda: database.sends_calls(victim.name), 10, "calls in flight")

            victim.kill()
            killed_at = time.monotonic()
            held = sorted(await database.held_by(victim.name))
            in_flight = await database.calls_sent_by(victim.name)
            claimed_at = await wait_until(
                lambda: database.holds_none(victim.name), 30, "the takeover"
            )
            ended_at = await wait_until(lambda: database.ended(held), 30, "the held sagas' end")
            await load
            await wait_until(
                lambda: database.ended(sorted(client.acknowledged)), 60, "every saga's end"
            )
            survivors = [replica for replica in replicas if replica is not victim]
            claimed = sum([(await r.metrics()).get("saga_claimed_total", 0) for r in survivors])
    finally:
        await participants.stop()

    takeover, ending = claimed_at - killed_at, ended_at - killed_at
    print(
        f"\ntakeover: replica {victim.name} SIGKILLed holding {len(held)} sagas "
        f"({len(in_flight)} with a call in flight): all claimed by the others {takeover:.2f}s "
        f"later, all ended {ending:.2f}s later (lease {LEASE:g}s; acknowledgements by replica "
        f"{client.by_replica}, CreateSaga retried {client.retries} times)"
    )
    assert held
    assert in_flight
    assert len(client.acknowledged) == sagas
    assert set(client.by_replica) == {"r0", "r1", "r2"}
    assert claimed >= len(held)  # saga_claimed_total of the two that took them
    assert takeover < LEASE + 4.0
    assert ending < LEASE + 20.0  # the participants, busy with the load, set the pace
    await _check_endings(database, client.acknowledged)
    report = await check_replicas_run(postgres_url, tmp_path / "client.log", participants.dirs)
    assert report.ok, problems(report)


async def test_a_replica_paused_past_its_lease_is_taken_over_and_its_late_writes_are_refused(
    tmp_path: Path, postgres_url: str
) -> None:
    database = Database(postgres_url)
    participants = await start_participants(tmp_path, delay_ms="150:350")
    try:
        async with (
            running_replicas(
                tmp_path, postgres_url, participants, ["a", "b"], lease=f"{LEASE:g}s"
            ) as replicas,
            Client(replicas, tmp_path / "client.log") as client,
        ):
            sleeper, other = replicas
            # Three sagas in four start on the replica about to be paused.
            await asyncio.gather(
                *(
                    client.create(
                        f"nap-{index:02d}",
                        saga_input(index, _refusing_step(index)),
                        first=0 if index % 4 else 1,
                    )
                    for index in range(40)
                )
            )
            await wait_until(lambda: database.sends_calls(sleeper.name), 10, "calls in flight")
            await asyncio.sleep(0.1)  # the calls reach the participants, which answer them

            sleeper.pause()
            paused_at = time.monotonic()
            held = sorted(await database.held_by(sleeper.name))
            in_flight = await database.calls_sent_by(sleeper.name)
            # Its lease runs out, the server ends the write it had open (after as long: without
            # that, its locks stopped every replica), and the other claims its sagas.
            taken_at = await wait_until(
                lambda: database.holds_none(sleeper.name), 20, "the takeover"
            )
            ended_at = await wait_until(lambda: database.ended(held), 30, "the held sagas' end")
            sleeper.resume()
            slept = time.monotonic() - paused_at

            await wait_until(
                lambda: database.ended(sorted(client.acknowledged)), 30, "every saga's end"
            )

            async def refused_and_lapsed() -> bool:
                # Its late writes are refused as it wakes; its next renewal finds the lapse.
                woken = await sleeper.metrics()
                lapsed = woken.get("saga_lease_lapses_total", 0) >= 1
                return lapsed and woken.get("saga_stale_writes_total", 0) > 0

            await wait_until(refused_and_lapsed, 15, "stale writes refused, the lapse found")
            woken = await sleeper.metrics()
            assert sleeper.alive
            assert other.alive
    finally:
        await participants.stop()

    print(
        f"\npause: replica {sleeper.name} SIGSTOPped for {slept:.1f}s holding {len(held)} "
        f"sagas ({len(in_flight)} with a call in flight): all claimed by the other "
        f"{taken_at - paused_at:.2f}s after the SIGSTOP, all ended "
        f"{ended_at - paused_at:.2f}s after it; once woken, its writes refused: "
        f"{woken.get('saga_stale_writes_total', 0):g}, lease lapses: "
        f"{woken.get('saga_lease_lapses_total', 0):g}"
    )
    assert held
    assert in_flight
    assert "letting the saga go" in sleeper.log_text()
    await _check_endings(database, client.acknowledged)
    report = await check_replicas_run(postgres_url, tmp_path / "client.log", participants.dirs)
    assert report.ok, problems(report)


async def test_any_replica_answers_watches_follows_the_feed_and_cancels_a_saga_another_runs(
    tmp_path: Path, postgres_url: str
) -> None:
    gate = tmp_path / "p1-answers"  # p1 holds every call until this file exists
    database = Database(postgres_url)
    participants = await start_participants(tmp_path, gates={"p1": gate})
    try:
        async with (
            running_replicas(
                tmp_path, postgres_url, participants, ["a", "b", "c"], lease=f"{LEASE:g}s"
            ) as replicas,
            Client(replicas, tmp_path / "client.log") as client,
        ):
            a = replicas[0]
            name = "sagas/anywhere"
            feed = client.stub(2).WatchChanges(cpb.WatchChangesRequest(after_position=0))
            assert await client.create("anywhere", saga_input(1), first=0) == "a"

            async def waits_on_p1() -> bool:  # s0 done, s1's call sent by a and held by p1
                got = await client.stub(1).GetSaga(cpb.GetSagaRequest(name=name))
                return got.saga.steps[1].state == saga_pb2.STEP_STATE_RUNNING

            await wait_until(waits_on_p1, 10, "s1's call held by p1")
            watch = client.stub(1).WatchSaga(cpb.WatchSagaRequest(name=name))
            first = await asyncio.wait_for(watch.read(), 10)
            assert isinstance(first, cpb.WatchSagaResponse)
            assert first.saga.state == saga_pb2.SAGA_STATE_RUNNING

            cancelled = await client.stub(2).CancelSaga(
                cpb.CancelSagaRequest(name=name, reason="changed my mind", actor="ana")
            )
            assert cancelled.saga.state == saga_pb2.SAGA_STATE_COMPENSATING
            assert (await database.owners(["anywhere"])) == {"anywhere": "c"}
            gate.touch()  # a's Execute and c's Compensate are answered now

            watched = [first, *await _until_settled(watch)]
            followed = await asyncio.wait_for(_changes_until_settled(feed, "anywhere"), 20)

            async def refused() -> bool:
                return (await a.metrics()).get("saga_stale_writes_total", 0) >= 1

            await wait_until(refused, 10, "a's late answer refused")
            answers = [
                await client.stub(i).GetSaga(cpb.GetSagaRequest(name=name)) for i in range(3)
            ]
            listed = [
                [s.saga_id for s in (await client.stub(i).ListSagas(cpb.ListSagasRequest())).sagas]
                for i in range(3)
            ]
            log = await client.stub(1).ListSagaEvents(cpb.ListSagaEventsRequest(name=name))
            feed.cancel()
    finally:
        await participants.stop()

    events = [(e.sequence, saga_pb2.SagaEventType.Name(e.type), e.step) for e in log.events]
    assert events == [
        (1, "SAGA_EVENT_TYPE_CREATED", ""),
        (2, "SAGA_EVENT_TYPE_STEP_SUCCEEDED", "s0"),
        (3, "SAGA_EVENT_TYPE_CANCEL_REQUESTED", ""),
        (4, "SAGA_EVENT_TYPE_COMPENSATION_SUCCEEDED", "s1"),
        (5, "SAGA_EVENT_TYPE_COMPENSATION_SUCCEEDED", "s0"),
    ]
    # b's watch: the state it started from, then every change in order, to the ending.
    assert [w.saga.version for w in watched] == [2, 3, 4, 5]
    assert [w.event.sequence for w in watched[1:]] == [3, 4, 5]
    assert watched[-1].saga.state == saga_pb2.SAGA_STATE_COMPENSATED
    # c's feed: every change of the saga, in commit order.
    assert [change.event.sequence for change in followed] == [1, 2, 3, 4, 5]
    positions = [change.position for change in followed]
    assert positions == sorted(set(positions))
    assert followed[-1].state == saga_pb2.SAGA_STATE_COMPENSATED
    # Every replica answers the same.
    assert {(g.saga.version, g.saga.state) for g in answers} == {
        (5, saga_pb2.SAGA_STATE_COMPENSATED)
    }
    assert listed == [["anywhere"]] * 3
    # Compensated exactly once, each step; a's late Execute of s1 was answered, then refused.
    assert deliveries(participants.dirs["p0"], "anywhere") == [
        ("execute", "s0", "OK"),
        ("compensate", "s0", "OK"),
    ]
    p1 = deliveries(participants.dirs["p1"], "anywhere")
    assert [(operation, step) for operation, step, _ in p1] == [
        ("execute", "s1"),
        ("compensate", "s1"),
    ]
    assert p1[1][2] == "OK"
    report = await check_replicas_run(postgres_url, tmp_path / "client.log", participants.dirs)
    assert report.ok, problems(report)


async def _until_settled(
    watch: grpc.aio.UnaryStreamCall[cpb.WatchSagaRequest, cpb.WatchSagaResponse],
) -> list[cpb.WatchSagaResponse]:
    """The rest of a watch's stream, up to the saga's ending."""
    responses: list[cpb.WatchSagaResponse] = []
    async with asyncio.timeout(20):
        while (response := await watch.read()) is not grpc.aio.EOF:
            assert isinstance(response, cpb.WatchSagaResponse)
            responses.append(response)
            if response.saga.state in SETTLED:
                return responses
    raise AssertionError(f"the watch ended before the saga did: {responses}")


async def _changes_until_settled(
    feed: grpc.aio.UnaryStreamCall[cpb.WatchChangesRequest, cpb.WatchChangesResponse],
    saga_id: str,
) -> list[cpb.SagaChange]:
    """The saga's changes in a change feed's stream, up to its ending."""
    changes: list[cpb.SagaChange] = []
    async for response in feed:
        changes += [change for change in response.changes if change.saga_id == saga_id]
        if changes and changes[-1].state in SETTLED:
            return changes
    raise AssertionError("the change feed ended before the saga did")


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server of the test's own, which it stops and starts again."""
    with postgres_server(max_connections=60) as server:
        yield server


async def test_postgresql_stopped_under_load_replicas_say_not_serving_then_every_saga_ends(
    tmp_path: Path, own_postgres: PostgresServer
) -> None:
    sagas = 80
    url = own_postgres.url(own_postgres.create_database())
    database = Database(url)
    participants = await start_participants(tmp_path, delay_ms="30:120")
    try:
        async with (
            running_replicas(
                tmp_path, url, participants, ["a", "b"], lease=f"{LEASE:g}s"
            ) as replicas,
            # Long enough for the store's answer (UNAVAILABLE after its 10 s connect timeout).
            Client(replicas, tmp_path / "client.log", deadline=20) as client,
        ):

            async def submit() -> None:
                created = []
                for index in range(sagas):  # about 25 a second, round robin
                    payload = saga_input(index, _refusing_step(index))
                    create = client.create(f"outage-{index:03d}", payload, index, give_up=90)
                    created.append(asyncio.create_task(create))
                    await asyncio.sleep(0.04)
                await asyncio.gather(*created)

            async def under_way() -> bool:
                return len(client.acknowledged) >= sagas // 2

            async def health_is(status: str) -> bool:
                return {await replica.health() for replica in replicas} == {status}

            async def create_refused(index: int) -> str:
                request = cpb.CreateSagaRequest(
                    saga_id=f"refused-{index}", definition=DEFINITION, input=saga_input(-1)
                )
                try:
                    await client.stub(index).CreateSaga(request, timeout=30)
                except grpc.aio.AioRpcError as error:
                    return str(error.code().name)
                return "OK"

            load = asyncio.create_task(submit())
            await wait_until(under_way, 30, "half the sagas acknowledged")
            own_postgres.stop()  # a fast shutdown, by the server's pid
            stopped_at = time.monotonic()
            down_at = await wait_until(lambda: health_is("NOT_SERVING"), 15, "NOT_SERVING")
            refused = await asyncio.gather(*(create_refused(i) for i in range(len(replicas))))
            own_postgres.start()  # same port, same data
            restarted_at = time.monotonic()
            up_at = await wait_until(lambda: health_is("SERVING"), 30, "SERVING again")
            await load
            ended_at = await wait_until(
                lambda: database.ended(sorted(client.acknowledged)), 60, "every saga's end"
            )
            stored = await database.endings()
    finally:
        await participants.stop()

    print(
        f"\noutage: PostgreSQL stopped {restarted_at - stopped_at:.1f}s under load; both "
        f"replicas NOT_SERVING {down_at - stopped_at:.2f}s after the stop, CreateSaga "
        f"{refused}; SERVING {up_at - restarted_at:.2f}s after the restart, all "
        f"{len(client.acknowledged)} acknowledged sagas ended {ended_at - restarted_at:.2f}s "
        f"after it (CreateSaga retried {client.retries} times)"
    )
    assert down_at - stopped_at < 5.0
    assert refused == ["UNAVAILABLE"] * len(replicas)
    assert not {"refused-0", "refused-1"} & set(stored)
    assert up_at - restarted_at < LEASE + 3.0
    assert len(client.acknowledged) == sagas
    await _check_endings(database, client.acknowledged)
    report = await check_replicas_run(url, tmp_path / "client.log", participants.dirs)
    assert report.ok, problems(report)
