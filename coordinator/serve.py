"""The composition root of ``saga serve``: settings in, a running coordinator out."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import uuid
from dataclasses import dataclass
from typing import Any

from coordinator.clock import SystemClock
from coordinator.config import Settings
from coordinator.crashpoints import CrashPoints
from coordinator.engine import Engine, EngineSettings
from coordinator.observability import Observability, configure_observability, observe_store
from coordinator.ports import SagaStore
from coordinator.store import open_store, redacted_url
from coordinator.transport.definition_files import load_definitions
from coordinator.transport.participant_gateway import GrpcParticipantGateway
from coordinator.transport.server import CoordinatorServer, start_server

log = logging.getLogger("coordinator")


@dataclass
class Coordinator:
    """A running coordinator: its engine, store, gateway and server."""

    settings: Settings
    engine: Engine
    store: SagaStore
    gateway: GrpcParticipantGateway
    server: CoordinatorServer
    observability: Observability
    fatal: asyncio.Future[BaseException]
    """Set when the coordinator must stop because it can no longer keep its promises."""

    @property
    def port(self) -> int:
        """The port the server is bound to."""
        return self.server.port

    async def stop(self) -> None:
        """Stop taking work, let calls in flight finish within the grace period, close all."""
        grace = self.settings.shutdown_grace
        await asyncio.gather(self.server.stop(grace), self.engine.stop(grace))
        await self.gateway.close()
        await self.store.close()
        await asyncio.to_thread(self.observability.shutdown)


async def start_coordinator(settings: Settings) -> Coordinator:
    """Load definitions, open the store, resume unfinished sagas, and serve."""
    catalog = load_definitions(settings.definitions, settings.participants.keys())
    observability = configure_observability(settings)
    options: dict[str, Any] = {}
    if settings.database.startswith("sqlite:"):
        options = {"synchronous": settings.synchronous, "busy_timeout_ms": settings.busy_timeout_ms}
    elif settings.database.startswith(("postgresql:", "postgres:")):
        # A replica that stops in the middle of a write (paused, frozen) has its transaction
        # ended by the server once its lease is over: it then holds no other replica up.
        options = {"stall_timeout": settings.lease.total_seconds()}
    store = await open_store(settings.database, **options)
    observe_store(observability, store)
    gateway = GrpcParticipantGateway(
        settings.participants,
        max_message_bytes=settings.max_message_bytes,
        max_output_bytes=settings.max_payload_bytes,
        max_calls_per_participant=settings.max_calls_per_participant,
    )
    loop = asyncio.get_running_loop()
    fatal: asyncio.Future[BaseException] = loop.create_future()

    def on_fatal(error: BaseException) -> None:
        if not fatal.done():
            fatal.set_result(error)

    engine = Engine(
        store,
        gateway,
        SystemClock(),
        catalog,
        EngineSettings(retention=settings.retention, lease=settings.lease),
        replica=replica_name(settings),
        on_fatal=on_fatal,
        crash_points=CrashPoints.from_environment(),
        telemetry=observability.telemetry,
        log_payloads=settings.log_payloads,
    )
    try:
        # The files are registered (unchanged ones are no-ops); the store's registry, which
        # also holds versions registered over gRPC, is what the engine runs.
        await engine.load_definitions(catalog.all(), settings.participants.keys())
        resumed = await engine.start()
        server = await start_server(engine, settings, telemetry=observability.telemetry)
        health_updates: set[asyncio.Task[None]] = set()

        def store_health(up: bool) -> None:  # health NOT_SERVING while the store is gone
            task = asyncio.ensure_future(server.set_serving(up))
            health_updates.add(task)
            task.add_done_callback(health_updates.discard)

        engine.on_store_health = store_health
    except BaseException:
        await engine.stop(0)
        await gateway.close()
        await store.close()
        await asyncio.to_thread(observability.shutdown)
        raise
    log.info(
        "coordinator serving on port %d (store %s, %d definitions, %d sagas resumed)",
        server.port,
        redacted_url(settings.database),
        len(engine.catalog.all()),
        resumed,
    )
    if observability.endpoint:
        log.info("exporting traces and metrics over OTLP to %s", observability.endpoint)
    return Coordinator(settings, engine, store, gateway, server, observability, fatal)


def replica_name(settings: Settings) -> str:
    """The configured name, else this host's name and the listening port: a process restarted
    on its port comes back under its name and takes its sagas up at once."""
    if settings.replica:
        return settings.replica
    port = settings.listen.rsplit(":", 1)[1]
    if port == "0":  # a port chosen at start: no name to come back under
        return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    return f"{socket.gethostname()}:{port}"


async def serve(settings: Settings, ready: asyncio.Event | None = None) -> int:
    """Run until SIGTERM or SIGINT (exit 0) or a fatal error (exit 1)."""
    coordinator = await start_coordinator(settings)
    print(f"saga coordinator listening on {settings.listen.rsplit(':', 1)[0]}:{coordinator.port}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    stop_wait = asyncio.ensure_future(stop.wait())
    waiters: list[asyncio.Future[Any]] = [stop_wait, coordinator.fatal]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    stop_wait.cancel()
    code = 0
    if coordinator.fatal.done():
        log.error("stopping: %s", coordinator.fatal.result())
        code = 1
    else:
        log.info("stopping: finishing calls in flight (up to %.1fs)", settings.shutdown_grace)
    await coordinator.stop()
    log.info("stopped")
    return code


def run(settings: Settings) -> int:
    """Run the coordinator on the configured event loop until it stops; its exit status."""
    if settings.event_loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise RuntimeError(
                "event_loop uvloop needs the uvloop package: pip install 'saga-coordinator[uvloop]'"
            ) from None
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(serve(settings))
    return asyncio.run(serve(settings))
