"""The Node.js change-feed consumer example, run for real against ``saga serve``: killed
mid-stream and restarted from its position file, it misses no change and reacts to every
ending."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from saga.v1 import participant_service_pb2 as pb

from saga_sdk import AsyncSagaClient, SagaChange
from tests.support.coordinator import four_step_definition, write_definitions
from tests.support.participants import Answer, ScriptedParticipant, ok, reject
from tests.support.processes import CoordinatorProcess

NODE = shutil.which("node")
CONSUMER = Path(__file__).resolve().parents[2] / "clients" / "node" / "examples" / "consumer.js"

pytestmark = pytest.mark.skipif(NODE is None, reason="node (Node.js >= 20.6) is not on PATH")


def business_rules(request: pb.ExecuteRequest | pb.CompensateRequest) -> Answer | None:
    """Cards refuses a saga whose input says "refuse"; Accounts cannot close the account of one
    that says "park" (the saga is parked); every other call succeeds after a short while."""
    if request.action == "IssueCard" and b"refuse" in request.input:
        return reject("CARD_REFUSED", "the card limit is too high")
    if request.action == "CloseAccount" and b"park" in request.input:
        return reject("LEDGER_LOCKED", "the ledger is locked")
    return ok(delay=0.02)


@dataclass
class Consumer:
    """One run of ``consumer.js``, its standard output in a file."""

    process: asyncio.subprocess.Process
    output: Path

    def lines(self) -> list[str]:
        return self.output.read_text().splitlines()

    def changes(self) -> list[str]:
        return [line for line in self.lines() if line.startswith("@")]

    async def wait_until(self, done: Callable[[list[str]], bool], timeout: float = 30) -> None:
        async with asyncio.timeout(timeout):
            while not done(self.lines()):
                assert self.process.returncode is None, self.output.with_suffix(".err").read_text()
                await asyncio.sleep(0.05)


StartConsumer = Callable[..., Awaitable[Consumer]]


@pytest.fixture
async def start_consumer(tmp_path: Path) -> AsyncIterator[StartConsumer]:
    """Start consumer.js (name, target, position file, flags); SIGKILLed at the end if still up."""
    started: list[Consumer] = []

    async def start(name: str, target: str, position_file: Path, *flags: str) -> Consumer:
        output = tmp_path / f"{name}.out"
        with output.open("wb") as out, output.with_suffix(".err").open("wb") as err:
            assert NODE is not None
            process = await asyncio.create_subprocess_exec(
                NODE,
                str(CONSUMER),
                "--target",
                target,
                "--position-file",
                str(position_file),
                *flags,
                stdout=out,
                stderr=err,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            )
        consumer = Consumer(process, output)
        started.append(consumer)
        return consumer

    yield start
    for consumer in started:
        if consumer.process.returncode is None:
            consumer.process.kill()
            await consumer.process.wait()


async def feed_of(client: AsyncSagaClient) -> list[SagaChange]:
    return [change async for change in client.changes(0, follow=False)]


def line_of(change: SagaChange) -> str:
    """The line consumer.js prints for a change."""
    event = change.event
    return (
        f"@{change.position} {change.saga_id} {change.definition} {change.state.value}"
        f" {event.type.value} {event.step or '-'}"
    )


def position_of(line: str) -> int:
    return int(line.split()[0].removeprefix("@"))


async def test_the_node_consumer_killed_mid_stream_resumes_from_its_file_missing_no_change(
    tmp_path: Path,
    participants: dict[str, ScriptedParticipant],
    start_consumer: StartConsumer,
) -> None:
    for participant in participants.values():
        participant.rule = business_rules
    write_definitions(
        tmp_path / "definitions", [four_step_definition("onboard"), four_step_definition("upgrade")]
    )
    coordinator = CoordinatorProcess.configure(
        tmp_path / "saga.yaml", tmp_path / "saga.db", participants
    )
    await coordinator.start()
    position_file = tmp_path / "consumer.position"
    try:
        async with AsyncSagaClient(coordinator.target) as client:

            async def run(sagas: dict[str, tuple[str, dict[str, int]]]) -> None:
                for saga_id, (definition, payload) in sagas.items():
                    await client.create(definition, payload, saga_id=saga_id)
                for saga_id in sagas:
                    await client.wait(saga_id, timeout=30)

            first = await start_consumer("first", coordinator.target, position_file)
            before_kill = {
                "acme": ("onboard", {}),
                "globex": ("onboard", {"refuse": 1}),
                "initech": ("upgrade", {}),
                "umbrella": ("onboard", {"refuse": 1, "park": 1}),
                "hooli": ("upgrade", {}),
            }
            running = asyncio.create_task(run(before_kill))
            # SIGKILL in the middle of the feed, six changes in, with more coming.
            await first.wait_until(lambda lines: sum(line.startswith("@") for line in lines) >= 6)
            first.process.kill()
            assert await first.process.wait() == -signal.SIGKILL
            await running
            killed_at = int(position_file.read_text())

            await run({"stark": ("onboard", {}), "wayne": ("upgrade", {"refuse": 1})})
            feed = await feed_of(client)
            assert killed_at < feed[-1].position

            second = await start_consumer("second", coordinator.target, position_file)
            newest = f"@{feed[-1].position} "
            await second.wait_until(lambda lines: any(line.startswith(newest) for line in lines))
            # Caught up and idle: it stops on SIGTERM, at once and cleanly.
            second.process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(second.process.wait(), 10) == 0
            assert int(position_file.read_text()) == feed[-1].position

            # The filters: only the changes that leave an "upgrade" saga SUCCEEDED.
            filtered = await start_consumer(
                "filtered",
                coordinator.target,
                tmp_path / "filtered.position",
                "--state",
                "succeeded",
                "--definition",
                "upgrade",
            )
            await filtered.wait_until(lambda lines: len(lines) >= 4)
            filtered.process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(filtered.process.wait(), 10) == 0

            logs = {
                saga_id: [event async for event in client.events(saga_id)]
                for saga_id in [*before_kill, "stark", "wayne"]
            }
            states = {saga_id: (await client.get(saga_id)).state.value for saga_id in logs}
    finally:
        await coordinator.stop()

    first_run, second_run = first.changes(), second.changes()
    assert first_run
    assert second_run
    # Each run prints positions in increasing order. The restart begins right after the position
    # saved: the last change printed or, when the kill came between printing a change and saving
    # its position, the one before (that change is printed again).
    for run_lines in (first_run, second_run):
        positions = [position_of(line) for line in run_lines]
        assert positions == sorted(set(positions))
    assert killed_at in [position_of(line) for line in first_run[-2:]]
    everywhere = [change.position for change in feed]
    assert position_of(second_run[0]) == everywhere[everywhere.index(killed_at) + 1]

    # After dedupe by position: every change of the feed, once, in order, as the feed has it.
    seen: dict[int, str] = {}
    for line in first_run + second_run:
        assert seen.setdefault(position_of(line), line) == line
    assert list(seen.values()) == [line_of(change) for change in feed]

    # Each saga's changes are its event log, once each, in the saga's commit order.
    for saga_id, events in logs.items():
        mine = [line.split()[4:] for line in seen.values() if line.split()[1] == saga_id]
        assert mine == [[event.type.value, event.step or "-"] for event in events], saga_id

    assert states == {
        "acme": "SUCCEEDED",
        "globex": "COMPENSATED",
        "initech": "SUCCEEDED",
        "umbrella": "NEEDS_ATTENTION",
        "hooli": "SUCCEEDED",
        "stark": "SUCCEEDED",
        "wayne": "COMPENSATED",
    }
    reactions = {line for line in first.lines() + second.lines() if not line.startswith("@")}
    assert reactions == {
        "welcome mail to acme",
        "welcome mail to initech",
        "welcome mail to hooli",
        "welcome mail to stark",
        "page on-call: umbrella LEDGER_LOCKED",
    }

    upgraded = [change for change in feed if change.definition == "upgrade"]
    assert filtered.lines() == [
        line
        for change in upgraded
        if change.state.value == "SUCCEEDED"
        for line in (line_of(change), f"welcome mail to {change.saga_id}")
    ]
    assert int((tmp_path / "filtered.position").read_text()) == max(
        change.position for change in upgraded if change.state.value == "SUCCEEDED"
    )
