"""A fault-injecting TCP proxy, between the coordinator and one participant.

It forwards bytes both ways and, when told to, misbehaves the way networks do: latency, black
hole periods (nothing goes through; afterwards the held bytes are released or the connections
reset), answers held past the callers' deadline, connections reset (RST) or closed (FIN).
When the participant is down, a new connection waits for it a little before being refused, as a
load balancer would.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from dataclasses import dataclass, field

_CHUNK = 64 * 1024
_UPSTREAM_PATIENCE = 3.0


@dataclass
class LinkStats:
    """What one link did to its traffic."""

    connections: int = 0
    refused: int = 0
    resets: int = 0
    closes: int = 0
    black_holes: int = 0
    late_answer_periods: int = 0
    latency_periods: int = 0


@dataclass(eq=False)
class _Pipe:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def writers(self) -> tuple[asyncio.StreamWriter, asyncio.StreamWriter]:
        return self.client, self.server


class FaultyLink:
    """Listens on a loopback port of its own and forwards to ``upstream_port``."""

    def __init__(self, name: str, upstream_port: int, rng: random.Random) -> None:
        self.name = name
        self.upstream_port = upstream_port
        self.port = 0
        self.stats = LinkStats()
        self._rng = rng
        self._server: asyncio.Server | None = None
        self._pipes: set[_Pipe] = set()
        self._open = asyncio.Event()
        self._open.set()
        self._latency: tuple[float, float] | None = None
        self._hold_answers = 0.0

    async def start(self, port: int = 0) -> None:
        """Listen on 127.0.0.1 (a free port unless one is given)."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and cut every connection."""
        self.heal()
        if self._server is not None:
            self._server.close()
        for pipe in list(self._pipes):
            self._cut(pipe, reset=True)
        if self._server is not None:
            await self._server.wait_closed()

    # --- faults ----------------------------------------------------------------------------------

    def heal(self) -> None:
        """Forward everything at once from now on."""
        self._latency = None
        self._hold_answers = 0.0
        self._open.set()

    def reset_connections(self) -> int:
        """Reset (RST) every open connection; return how many."""
        pipes = list(self._pipes)
        for pipe in pipes:
            self._cut(pipe, reset=True)
        self.stats.resets += len(pipes)
        return len(pipes)

    def close_one(self) -> bool:
        """Close (FIN) one connection chosen at random."""
        if not self._pipes:
            return False
        self._cut(self._rng.choice(sorted(self._pipes, key=id)), reset=False)
        self.stats.closes += 1
        return True

    async def latency(self, duration: float, low: float, high: float) -> None:
        """Delay every chunk by ``low`` to ``high`` seconds for ``duration`` seconds."""
        self.stats.latency_periods += 1
        self._latency = (low, high)
        await asyncio.sleep(duration)
        self._latency = None

    async def black_hole(self, duration: float, *, reset_after: bool) -> None:
        """Let nothing through for ``duration`` seconds; then release the held bytes, or
        reset the connections (the bytes were lost)."""
        self.stats.black_holes += 1
        self._open.clear()
        try:
            await asyncio.sleep(duration)
            if reset_after:
                self.reset_connections()
        finally:
            self._open.set()

    async def late_answers(self, duration: float, hold: float) -> None:
        """For ``duration`` seconds, hold the participant's bytes ``hold`` seconds each, past
        the caller's deadline: the effect is applied, the answer arrives too late."""
        self.stats.late_answer_periods += 1
        self._hold_answers = hold
        await asyncio.sleep(duration)
        self._hold_answers = 0.0

    # --- forwarding ------------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _UPSTREAM_PATIENCE
        while True:
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    "127.0.0.1", self.upstream_port
                )
                break
            except OSError:
                if loop.time() > deadline or writer.is_closing():
                    self.stats.refused += 1
                    _abort(writer)
                    return
                await asyncio.sleep(0.05)
        pipe = _Pipe(writer, up_writer)
        self._pipes.add(pipe)
        pipe.tasks = [
            asyncio.create_task(self._pump(reader, up_writer, answers=False)),
            asyncio.create_task(self._pump(up_reader, writer, answers=True)),
        ]
        try:
            await asyncio.wait(pipe.tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._cut(pipe, reset=False)
            for task in pipe.tasks:
                task.cancel()
            await asyncio.gather(*pipe.tasks, return_exceptions=True)

    async def _pump(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, answers: bool
    ) -> None:
        # Reading goes on while a chunk waits to be written, so that a hold delays each chunk
        # by its own amount rather than stacking up; the queue keeps the bytes in order.
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def read() -> None:
            try:
                while data := await source.read(_CHUNK):
                    due = loop.time()
                    if self._latency is not None:
                        due += self._rng.uniform(*self._latency)
                    if answers and self._hold_answers:
                        due += self._hold_answers
                    queue.put_nowait((due, data))
            except (ConnectionError, OSError):
                pass
            queue.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            last_due = 0.0
            while (item := await queue.get()) is not None:
                due, data = item
                last_due = max(due, last_due)
                delay = last_due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                await self._open.wait()
                if sink.is_closing():
                    break
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    def _cut(self, pipe: _Pipe, *, reset: bool) -> None:
        if pipe not in self._pipes:
            return
        self._pipes.discard(pipe)
        for task in pipe.tasks:
            task.cancel()
        for writer in pipe.writers():
            if reset:
                _abort(writer)
            else:
                writer.close()


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset rather than a graceful FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
