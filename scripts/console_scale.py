"""How fast the web console's pages render on a large store: figures printed, nothing asserted.

    python scripts/console_scale.py                        # 1,000,000 sagas (make console-scale)
    python scripts/console_scale.py --sagas 100000 --runs 3
    python scripts/console_scale.py --path /data/c.db --keep   # keep (and reuse) the store

Builds the store `scripts/million.py` builds (N sagas of four definition versions in mixed
states, labelled by tenant and order), plus one saga of a 10,000-event log (a step retried
through thousands of transient failures, then refused and parked on a compensation that
cannot run). Starts `saga serve` on it with participants that answer OK (the unfinished sagas
it recovers run to their ends before anything is timed), then `saga console`, and times each
page over HTTP: the median and the slowest of ``--runs`` loads after one warm-up load, in
milliseconds, the whole page as the browser receives it.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saga_sdk.client import SagaClient
from saga_sdk.model import SagaState
from scripts import million  # the million-saga store, built the same way
from scripts.million import say
from tests.support.long_saga import write_long_saga
from tests.support.participants import ScriptedParticipant
from tests.support.processes import CoordinatorProcess, start_console

LONG_SAGA = "long-haul-1"
SERVICES = ("identity", "accounts", "cards", "billing")


def add_long_saga(path: Path, events: int) -> int:
    """Add one saga whose log has `events` events; return how many it has."""
    history = write_long_saga(
        path,
        LONG_SAGA,
        events,
        at=million.BEGIN + timedelta(days=30),
        input=million.INPUT,
        trace_context=million.TRACE_CONTEXT,
        labels={"tenant": "tenant-01"},
    )
    return len(history.log)


class Participants:
    """Participants answering OK to everything, on a loop of their own thread."""

    def __init__(self) -> None:
        import threading

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.running = {name: ScriptedParticipant(name) for name in SERVICES}
        for participant in self.running.values():
            asyncio.run_coroutine_threadsafe(participant.start(), self.loop).result(10)

    def stop(self) -> None:
        for participant in self.running.values():
            asyncio.run_coroutine_threadsafe(participant.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def wait_recovered(target: str, limit: float) -> None:
    """Wait until no saga is running or compensating (those the coordinator recovered)."""
    began = time.monotonic()
    with SagaClient(target) as client:
        while True:
            counts = client.count()
            moving = counts[SagaState.RUNNING] + counts[SagaState.COMPENSATING]
            if moving == 0:
                say(f"  the recovered sagas ended in {time.monotonic() - began:.0f} s")
                return
            if time.monotonic() - began > limit:
                say(f"  {moving:,} sagas still moving after {limit:.0f} s: timing anyway")
                return
            time.sleep(2)


def fetch(url: str) -> tuple[float, int, bytes]:
    """Load a page: milliseconds to the last byte, status and body."""
    began = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as answer:
        body = answer.read()
        status = answer.status
    return (time.perf_counter() - began) * 1000, status, body


def later_page(base: str, path: str, pages: int) -> str:
    """The URL of the `pages`-th next page of a listing (following its Next links)."""
    url = base + path
    for _ in range(pages):
        _, _, body = fetch(url)
        text = body.decode()
        marker = 'rel="next"'
        at = text.find(marker)
        if at < 0:
            return url
        start = text.rfind('href="', 0, at) + len('href="')
        href = text[start : text.index('"', start)].replace("&amp;", "&")
        url = base + href
    return url


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sagas", type=int, default=1_000_000)
    parser.add_argument("--events", type=int, default=10_000, help="events of the long saga")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--path", type=Path, help="the store file (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the store at the end")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="saga-console-scale-"))
    path: Path = args.path or folder / "sagas.db"
    participants: Participants | None = None
    coordinator: CoordinatorProcess | None = None
    console: subprocess.Popen[bytes] | None = None
    try:
        if path.exists():
            say(f"reusing the store {path}")
        else:
            say(f"building {args.sagas:,} sagas in {path}...")
            facts = million.build(path, args.sagas, args.seed)
            say(f"built in {facts['build_s']:.0f} s, {facts['size_mb']:,.0f} MB")
            count = add_long_saga(path, args.events)
            say(f"added saga {LONG_SAGA} with {count:,} events")
        participants = Participants()
        (folder / "definitions").mkdir(exist_ok=True)
        coordinator = CoordinatorProcess.configure(
            folder / "saga.yaml",
            path,
            {name: p.address for name, p in participants.running.items()},
            log_level="WARNING",
        )
        began = time.monotonic()
        asyncio.run(coordinator.start(timeout=600))
        say(f"coordinator serving in {time.monotonic() - began:.1f} s on {coordinator.target}")
        wait_recovered(coordinator.target, 600)
        console, base = start_console(coordinator.target, folder / "console.log")
        with SagaClient(coordinator.target) as client:
            sample = next(iter(client.list(states=[SagaState.SUCCEEDED], page_size=1))).saga_id
            counts = client.count()
        say(
            f"{counts.total:,} sagas: "
            + ", ".join(f"{state.value} {n:,}" for state, n in counts.counts.items())
        )
        middle = million.BEGIN + million.SPACING * (args.sagas // 2)
        window = urllib.parse.urlencode(
            {
                "from": middle.strftime("%Y-%m-%dT%H:%M:%S"),
                "to": (middle + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S"),
            }
        )
        pages = {
            "sagas, no filter": "/sagas",
            "sagas, 11th page": later_page(base, "/sagas", 10).removeprefix(base),
            "sagas, NEEDS_ATTENTION": "/sagas?state=NEEDS_ATTENTION",
            "sagas, definition + version": "/sagas?definition=open-account&version=2",
            "sagas, label tenant=tenant-07": "/sagas?label=tenant%3Dtenant-07",
            "sagas, one day of creations": f"/sagas?{window}",
            "sagas, stuck on accounts": "/sagas?stuck_on=accounts",
            "needs attention (500 oldest grouped)": "/attention",
            "definitions": "/definitions",
            "one saga": f"/saga?id={sample}",
            f"saga of {args.events:,} events": f"/saga?id={LONG_SAGA}",
            "  its timeline and attempts (read after)": f"/saga/parts?id={LONG_SAGA}",
            f"saga of {args.events:,} events, failures only": f"/saga?id={LONG_SAGA}&failures=1",
        }
        say(f"page load times over HTTP, median and slowest of {args.runs} after a warm-up (ms):")
        for name, page in pages.items():
            fetch(base + page)
            times = []
            for _ in range(args.runs):
                elapsed, status, body = fetch(base + page)
                assert status == 200, (page, status)
                times.append(elapsed)
            say(
                f"  {name:<44} {statistics.median(times):8.1f} {max(times):8.1f}"
                f"   {len(body) / 1024:7.1f} KiB"
            )
        say(f"at {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, Python {sys.version.split()[0]}")
    finally:
        if console is not None:
            console.terminate()
            console.wait(10)
        if coordinator is not None and coordinator.process is not None:
            asyncio.run(coordinator.stop())
        if participants is not None:
            participants.stop()
        if args.keep or args.path is not None:
            say(f"kept {path}")
            if args.path is None:
                shutil.move(str(path), str(Path.cwd() / path.name))
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
