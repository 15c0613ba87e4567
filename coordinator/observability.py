"""Start-up wiring of the OpenTelemetry SDK: OTLP export of traces and metrics, Prometheus.

Only the composition root imports this module; everything else reports through
``coordinator.telemetry`` and the OpenTelemetry API. With no endpoint, no SDK is installed and
reporting costs next to nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast

from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator

from coordinator.config import Settings
from coordinator.telemetry import INSTRUMENTATION, PLANNED_IDS, SagaTelemetry

log = logging.getLogger("coordinator.observability")


class ReachabilityTrackingExporter(SpanExporter):
    """Passes spans on, remembering whether the collector took the last batch."""

    def __init__(self, inner: SpanExporter) -> None:
        self._inner = inner
        self.reachable = True

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Export, and note whether it worked."""
        result = self._inner.export(spans)
        self.reachable = result is SpanExportResult.SUCCESS
        return result

    def shutdown(self) -> None:
        """Shut the wrapped exporter down."""
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Flush the wrapped exporter."""
        return self._inner.force_flush(timeout_millis)


class PlannedIdGenerator(IdGenerator):
    """Random ids, except where ``coordinator.telemetry`` planned the next span's ids."""

    def __init__(self) -> None:
        self._random = RandomIdGenerator()

    def generate_span_id(self) -> int:
        """The planned span id, or a random one."""
        planned = PLANNED_IDS.get()
        return planned[1] if planned is not None else self._random.generate_span_id()

    def generate_trace_id(self) -> int:
        """The planned trace id, or a random one."""
        planned = PLANNED_IDS.get()
        if planned is not None and planned[0] is not None:
            return planned[0]
        return self._random.generate_trace_id()


@dataclass
class Observability:
    """The configured telemetry, and how to flush and stop it."""

    telemetry: SagaTelemetry
    endpoint: str | None = None
    meter_provider: MeterProvider | None = None
    _shutdowns: list[Callable[[], object]] = field(default_factory=list)

    def shutdown(self) -> None:
        """Export what is pending (bounded by the export timeout), then stop exporting."""
        for stop in self._shutdowns:
            try:
                stop()
            except Exception:  # a collector that is down must not fail the shutdown
                log.warning("telemetry shutdown failed", exc_info=True)


def otlp_endpoint(settings: Settings) -> str | None:
    """The OTLP/gRPC endpoint: the setting, else the standard OTEL_* variables, else none."""
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    return (
        settings.otlp_endpoint
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or None
    )


def configure_observability(settings: Settings) -> Observability:
    """Install the SDK for what the settings ask: OTLP export, a Prometheus endpoint, or none."""
    endpoint = otlp_endpoint(settings)
    resource = Resource.create(
        {"service.name": os.environ.get("OTEL_SERVICE_NAME", settings.service_name)}
    )
    observability = Observability(SagaTelemetry(), endpoint)
    readers: list[MetricReader] = []
    tracer_provider = None
    exporter: ReachabilityTrackingExporter | None = None
    timeout = settings.otlp_timeout
    if endpoint:
        # Imported only when exporting: they are a fifth of a restart's time otherwise.
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        insecure = not endpoint.startswith("https://")
        tracer_provider = TracerProvider(resource=resource, id_generator=PlannedIdGenerator())
        # Bounded queue, short export timeout: a collector that is down or slow drops spans
        # rather than holding sagas back.
        exporter = ReachabilityTrackingExporter(
            OTLPSpanExporter(endpoint=endpoint, insecure=insecure, timeout=timeout)
        )
        tracer_provider.add_span_processor(
            BatchSpanProcessor(
                exporter,
                max_queue_size=8192,
                max_export_batch_size=512,
                schedule_delay_millis=500,
                export_timeout_millis=int(timeout * 1000),
            )
        )
        observability._shutdowns.append(tracer_provider.shutdown)
        readers.append(
            PeriodicExportingMetricReader(
                OTLPMetricExporter(endpoint=endpoint, insecure=insecure, timeout=timeout),
                export_interval_millis=int(settings.metrics_interval * 1000),
                export_timeout_millis=int(timeout * 1000),
            )
        )
    if settings.metrics_listen:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server

        host, _, port = settings.metrics_listen.rpartition(":")
        server, _thread = start_http_server(int(port), addr=host)
        observability._shutdowns.append(server.shutdown)
        readers.append(PrometheusMetricReader())
    meter_provider = None
    if readers:
        meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        observability._shutdowns.insert(0, meter_provider.shutdown)
    observability.meter_provider = meter_provider
    observability.telemetry = SagaTelemetry(
        tracing=tracer_provider is not None,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        collector_reachable=(lambda: exporter.reachable) if exporter is not None else lambda: True,
    )
    return observability


class _WriteCounts(Protocol):
    @property
    def transactions(self) -> int: ...

    @property
    def jobs(self) -> int: ...


class _CountsWrites(Protocol):
    @property
    def write_stats(self) -> _WriteCounts: ...


def observe_store(observability: Observability, store: object) -> None:
    """Report the store's write transactions (its commits) and the writes they carried.

    Only a store that keeps ``write_stats`` (SQLite's group-commit writer) has these counters;
    for the others nothing is registered. The figures are read when metrics are collected.
    """
    if getattr(store, "write_stats", None) is None:
        return
    source = cast(_CountsWrites, store)
    meter = metrics.get_meter(INSTRUMENTATION, meter_provider=observability.meter_provider)
    meter.create_observable_counter(
        "saga.store.transactions",
        callbacks=[lambda _options: [metrics.Observation(source.write_stats.transactions)]],
        unit="{transaction}",
        description="Write transactions the store committed",
    )
    meter.create_observable_counter(
        "saga.store.writes",
        callbacks=[lambda _options: [metrics.Observation(source.write_stats.jobs)]],
        unit="{write}",
        description="Writes the store committed; under group commit several share a transaction",
    )
