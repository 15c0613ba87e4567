"""How the gateway reads a participant's answer: the outcome table of the contract."""

from __future__ import annotations

from datetime import timedelta

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from coordinator.core.events import Failed, Rejected, Transient
from coordinator.transport.participant_gateway import outcome_of

TRANSIENT = [
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
]
PERMANENT = [
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.DATA_LOSS,
]


def details(*messages: object) -> list[tuple[str, str | bytes]]:
    packed = []
    for message in messages:
        entry = any_pb2.Any()
        entry.Pack(message)  # type: ignore[arg-type]
        packed.append(entry)
    status = status_pb2.Status(code=9, message="x", details=packed)
    return [("grpc-status-details-bin", status.SerializeToString())]


def test_failed_precondition_is_a_business_rejection_with_the_error_info_reason() -> None:
    trailing = details(error_details_pb2.ErrorInfo(reason="CARD_LIMIT", domain="cards"))

    outcome = outcome_of(grpc.StatusCode.FAILED_PRECONDITION, "limit reached", trailing)

    assert outcome == Rejected(reason="CARD_LIMIT", message="limit reached")


@pytest.mark.parametrize("code", TRANSIENT)
def test_transient_codes_are_retried(code: grpc.StatusCode) -> None:
    outcome = outcome_of(code, "try later", None)

    assert isinstance(outcome, Transient)
    assert outcome.code == code.name
    assert outcome.retry_after is None


@pytest.mark.parametrize("code", PERMANENT)
def test_every_other_code_fails_the_step_without_retry(code: grpc.StatusCode) -> None:
    assert outcome_of(code, "cannot", None) == Failed(code=code.name, message="cannot")


def test_retry_info_is_read_as_the_least_delay_before_the_next_attempt() -> None:
    delay = duration_pb2.Duration()
    delay.FromTimedelta(timedelta(seconds=3))
    trailing = details(
        error_details_pb2.ErrorInfo(reason="OVERLOADED"),
        error_details_pb2.RetryInfo(retry_delay=delay),
    )

    outcome = outcome_of(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", trailing)

    assert outcome == Transient(
        code="RESOURCE_EXHAUSTED",
        message="busy",
        reason="OVERLOADED",
        retry_after=timedelta(seconds=3),
    )


def test_garbage_status_details_are_ignored() -> None:
    outcome = outcome_of(
        grpc.StatusCode.FAILED_PRECONDITION, "no", [("grpc-status-details-bin", b"\xff\x00garbage")]
    )

    assert outcome == Rejected(reason="REJECTED", message="no")


def test_a_retry_info_beyond_any_date_is_ignored_not_fatal() -> None:
    huge = duration_pb2.Duration(seconds=10**17)  # valid protobuf, beyond timedelta's range

    outcome = outcome_of(
        grpc.StatusCode.UNAVAILABLE, "busy", details(error_details_pb2.RetryInfo(retry_delay=huge))
    )

    assert isinstance(outcome, Transient)
    assert outcome.retry_after is None
