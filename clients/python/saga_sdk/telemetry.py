"""OpenTelemetry, when installed: trace propagation and participant spans, else nothing at all.

OpenTelemetry is the SDK's optional extra (`pip install 'saga-sdk[otel]'`). With it, clients
send the current span's W3C `traceparent` with CreateSaga, and participants run each handler
in a span that continues the coordinator's trace. Without it, nothing is propagated, no span
is made, and everything else works the same.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

try:
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode

    AVAILABLE = True
except ImportError:  # the `otel` extra is not installed
    AVAILABLE = False

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider


def trace_headers() -> tuple[tuple[str, str], ...]:
    """The current span's W3C trace headers (none without OpenTelemetry, or outside a span)."""
    if not AVAILABLE:
        return ()
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items())


class CallSpan:
    """The span of one participant call, or nothing; `failed` marks it as an error."""

    def __init__(self, span: Any = None) -> None:
        self._span = span

    def failed(self, grpc_code: int, message: str) -> None:
        """Record that the call answered the non-OK status `grpc_code`."""
        if self._span is None:
            return
        self._span.set_attribute("rpc.grpc.status_code", grpc_code)
        self._span.set_status(Status(StatusCode.ERROR, message))


class ParticipantTracer:
    """Makes the server spans of a participant's calls (no-ops without OpenTelemetry)."""

    def __init__(self, tracer_provider: TracerProvider | None = None) -> None:
        # With no OpenTelemetry SDK configured (or no tracer_provider given), spans are no-ops.
        self._tracer = (
            trace.get_tracer("saga-sdk.participant", tracer_provider=tracer_provider)
            if AVAILABLE
            else None
        )

    @contextmanager
    def span(
        self, name: str, metadata: Mapping[str, str], attributes: Mapping[str, str | int]
    ) -> Iterator[CallSpan]:
        """A server span named `name` continuing the trace of the call's `traceparent`."""
        if self._tracer is None:
            yield CallSpan()
            return
        with self._tracer.start_as_current_span(
            name,
            context=propagate.extract(metadata),
            kind=SpanKind.SERVER,
            attributes=dict(attributes),
        ) as span:
            yield CallSpan(span)
