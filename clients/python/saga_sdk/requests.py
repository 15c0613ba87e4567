"""I/O-free building of the coordinator's requests, shared by the sync and async clients."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from opentelemetry import propagate
from saga.v1 import coordinator_service_pb2, saga_pb2

from saga_sdk.model import SagaState

SAGA_NAME_PREFIX = "sagas/"


def saga_name(saga_id: str) -> str:
    """The resource name of a saga, "sagas/{saga_id}", from its plain id."""
    if not saga_id:
        raise ValueError("saga_id must not be empty")
    if "/" in saga_id:
        raise ValueError(f"pass the plain saga id, not a resource name: {saga_id!r}")
    return SAGA_NAME_PREFIX + saga_id


def encode_payload(value: object) -> bytes:
    """Encode a payload: bytes as they are, None as empty, anything else as UTF-8 JSON."""
    if value is None:
        return b""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def create_request(
    definition: str,
    input: object = None,
    *,
    saga_id: str | None = None,
    definition_version: int = 0,
) -> coordinator_service_pb2.CreateSagaRequest:
    """Build a CreateSagaRequest; see `SagaClient.create`."""
    if not definition:
        raise ValueError("definition must not be empty")
    if definition_version < 0:
        raise ValueError("definition_version must be >= 0")
    return coordinator_service_pb2.CreateSagaRequest(
        saga_id=saga_id or "",
        definition=definition,
        definition_version=definition_version,
        input=encode_payload(input),
    )


def get_request(saga_id: str) -> coordinator_service_pb2.GetSagaRequest:
    """Build a GetSagaRequest for a plain saga id."""
    return coordinator_service_pb2.GetSagaRequest(name=saga_name(saga_id))


def watch_request(
    saga_id: str, ending_only: bool = False
) -> coordinator_service_pb2.WatchSagaRequest:
    """Build a WatchSagaRequest for a plain saga id.

    With `ending_only` the coordinator sends one message only: the saga once it has settled
    (at once if it already has), which is all that `wait()` needs.
    """
    return coordinator_service_pb2.WatchSagaRequest(
        name=saga_name(saga_id), ending_only=ending_only
    )


def cancel_request(saga_id: str, reason: str = "") -> coordinator_service_pb2.CancelSagaRequest:
    """Build a CancelSagaRequest for a plain saga id."""
    return coordinator_service_pb2.CancelSagaRequest(name=saga_name(saga_id), reason=reason)


@dataclass(frozen=True)
class ListQuery:
    """The filters of a listing; `page(token)` builds the request for one page of it."""

    states: tuple[SagaState, ...] = ()
    definition: str | None = None
    page_size: int = 100

    @classmethod
    def of(
        cls,
        states: Iterable[SagaState | str] = (),
        definition: str | None = None,
        page_size: int = 100,
    ) -> ListQuery:
        """Validate and normalise the filters (state names are accepted as strings)."""
        if not 1 <= page_size <= 1000:
            raise ValueError("page_size must be from 1 to 1000")
        parsed = tuple(SagaState(s) for s in states)
        if SagaState.UNSPECIFIED in parsed:
            raise ValueError("UNSPECIFIED is not a state to filter on")
        return cls(parsed, definition, page_size)

    def page(self, page_token: str = "") -> coordinator_service_pb2.ListSagasRequest:
        """The request for the page that `page_token` points at ("" for the first)."""
        return coordinator_service_pb2.ListSagasRequest(
            states=[saga_pb2.SagaState.Value(f"SAGA_STATE_{s.value}") for s in self.states],
            definition=self.definition or "",
            page_size=self.page_size,
            page_token=page_token,
        )


def rewatch_delay(attempt: int) -> float:
    """Seconds to pause before re-watching after the `attempt`-th broken stream (from 1).

    Capped exponential: 0.05 s, 0.1 s, 0.2 s ... up to 2 s, so that a coordinator restart is
    noticed quickly without hammering one that stays down.
    """
    return float(min(2.0, 0.05 * 2 ** max(0, attempt - 1)))


def trace_headers() -> tuple[tuple[str, str], ...]:
    """The current span's W3C trace headers, for CreateSaga: the saga's trace links to it."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items())
