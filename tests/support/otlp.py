"""An OTLP/gRPC receiver in the test process: what Jaeger ingests on 4317, kept for asserts."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2


def _value(value: common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return None if kind is None else getattr(value, kind)


def _attributes(pairs: Iterable[common_pb2.KeyValue]) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


@dataclass(frozen=True)
class ReceivedSpan:
    """One exported span, flattened."""

    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    start_ns: int
    end_ns: int
    kind: int
    attributes: dict[str, Any]
    events: tuple[tuple[str, int, dict[str, Any]], ...]
    links: tuple[tuple[str, str], ...]
    status_code: int

    @property
    def is_root(self) -> bool:
        """True for a span with no parent."""
        return not self.parent_span_id


def _flatten(request: trace_service_pb2.ExportTraceServiceRequest) -> list[ReceivedSpan]:
    spans = []
    for resource_spans in request.resource_spans:
        service = str(_attributes(resource_spans.resource.attributes).get("service.name", ""))
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(_span(service, span))
    return spans


def _span(service: str, span: trace_pb2.Span) -> ReceivedSpan:
    return ReceivedSpan(
        service=service,
        name=span.name,
        trace_id=span.trace_id.hex(),
        span_id=span.span_id.hex(),
        parent_span_id=span.parent_span_id.hex(),
        start_ns=span.start_time_unix_nano,
        end_ns=span.end_time_unix_nano,
        kind=span.kind,
        attributes=_attributes(span.attributes),
        events=tuple(
            (event.name, event.time_unix_nano, _attributes(event.attributes))
            for event in span.events
        ),
        links=tuple((link.trace_id.hex(), link.span_id.hex()) for link in span.links),
        status_code=span.status.code,
    )


@dataclass
class OtlpReceiver(
    trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer
):
    """Collects every span and metric point exported to it."""

    spans: list[ReceivedSpan] = field(default_factory=list)
    metric_requests: list[metrics_service_pb2.ExportMetricsServiceRequest] = field(
        default_factory=list
    )
    port: int = 0
    server: grpc.Server | None = None

    @property
    def endpoint(self) -> str:
        """Where exporters send to."""
        return f"http://127.0.0.1:{self.port}"

    def Export(self, request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
            self.spans.extend(_flatten(request))
            return trace_service_pb2.ExportTraceServiceResponse()
        self.metric_requests.append(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()

    def start(self) -> None:
        """Listen on a free loopback port, on its own threads (so that exporters that block the
        event loop cannot deadlock it). No interceptors: it must not trace itself."""
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_handler = grpc.unary_unary_rpc_method_handler(
            self.Export,
            request_deserializer=trace_service_pb2.ExportTraceServiceRequest.FromString,
            response_serializer=trace_service_pb2.ExportTraceServiceResponse.SerializeToString,
        )
        metrics_handler = grpc.unary_unary_rpc_method_handler(
            self.Export,
            request_deserializer=metrics_service_pb2.ExportMetricsServiceRequest.FromString,
            response_serializer=metrics_service_pb2.ExportMetricsServiceResponse.SerializeToString,
        )
        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "opentelemetry.proto.collector.trace.v1.TraceService",
                    {"Export": trace_handler},
                ),
                grpc.method_handlers_generic_handler(
                    "opentelemetry.proto.collector.metrics.v1.MetricsService",
                    {"Export": metrics_handler},
                ),
            )
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def stop(self) -> None:
        """Stop listening."""
        if self.server is not None:
            self.server.stop(0)

    def of_trace(self, trace_id: str) -> list[ReceivedSpan]:
        """Every span received in one trace."""
        return [span for span in self.spans if span.trace_id == trace_id]

    def metric_names(self) -> set[str]:
        """Names of every metric received."""
        return {
            metric.name
            for request in self.metric_requests
            for resource in request.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
        }

    async def wait_for(self, predicate: Any, timeout: float = 15.0) -> None:
        """Wait until ``predicate(self)`` holds."""
        async with asyncio.timeout(timeout):
            while not predicate(self):
                await asyncio.sleep(0.05)
