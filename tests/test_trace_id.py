"""The saga's trace id, read from the W3C traceparent it keeps."""

from __future__ import annotations

import pytest

from coordinator.telemetry import trace_id_of

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def test_the_trace_id_is_the_traceparent_s_second_field() -> None:
    assert trace_id_of({"traceparent": f"00-{TRACE}-00f067aa0ba902b7-01"}) == TRACE
    assert trace_id_of({"traceparent": f"00-{TRACE.upper()}-00F067AA0BA902B7-01"}) == TRACE


@pytest.mark.parametrize(
    "context",
    [
        {},  # tracing off: the saga keeps no trace context
        {"traceparent": ""},
        {"traceparent": f"00-{'0' * 32}-00f067aa0ba902b7-01"},  # the invalid all-zero id
        {"traceparent": f"00-{TRACE[:-1]}-00f067aa0ba902b7-01"},
        {"traceparent": "not a traceparent"},
    ],
)
def test_no_valid_traceparent_gives_no_trace_id(context: dict[str, str]) -> None:
    assert trace_id_of(context) == ""
