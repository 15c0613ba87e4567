"""The coordinator's gRPC server: CoordinatorService, health checking and reflection."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from saga.v1 import coordinator_service_pb2, participant_service_pb2
from saga.v1 import coordinator_service_pb2_grpc as pb_grpc

from coordinator.config import Settings
from coordinator.engine import Engine
from coordinator.telemetry import SagaTelemetry
from coordinator.transport.coordinator_servicer import CoordinatorServicer

COORDINATOR_SERVICE = coordinator_service_pb2.DESCRIPTOR.services_by_name[
    "CoordinatorService"
].full_name


@dataclass
class CoordinatorServer:
    """A started server and the port it is bound to."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int

    async def stop(self, grace: float) -> None:
        """Report NOT_SERVING, stop taking RPCs, and let running ones finish within ``grace``."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def start_server(
    engine: Engine,
    settings: Settings,
    *,
    telemetry: SagaTelemetry | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> CoordinatorServer:
    """Serve the engine on ``settings.listen``; raises if the address cannot be bound."""
    server = grpc.aio.server(
        interceptors=list(interceptors),
        options=[
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    pb_grpc.add_CoordinatorServiceServicer_to_server(
        CoordinatorServicer(
            engine, max_payload_bytes=settings.max_payload_bytes, telemetry=telemetry
        ),
        server,
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            COORDINATOR_SERVICE,
            participant_service_pb2.DESCRIPTOR.services_by_name["ParticipantService"].full_name,
            health.SERVICE_NAME,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    port = server.add_insecure_port(settings.listen)
    if port == 0:
        raise OSError(f"cannot listen on {settings.listen}")
    await server.start()
    for service in ("", COORDINATOR_SERVICE):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return CoordinatorServer(server, health_servicer, port)
