"""Pure parts of the SDK: proto conversion, payload encoding and request building."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from saga.v1 import saga_pb2

from saga_sdk.model import SagaState, StepState, saga_from_proto
from saga_sdk.requests import ListQuery, encode_payload, rewatch_delay, saga_name

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
    max_leaves=10,
)


def test_a_state_this_sdk_does_not_know_reads_as_unspecified() -> None:
    saga = saga_from_proto(
        saga_pb2.Saga(
            saga_id="s",
            state=99,  # type: ignore[arg-type]
            steps=[saga_pb2.StepRun(name="a", state=42)],  # type: ignore[arg-type]
        )
    )

    assert saga.state is SagaState.UNSPECIFIED
    assert saga.steps[0].state is StepState.UNSPECIFIED
    assert not saga.state.settled


def test_timestamps_become_aware_datetimes_and_unset_ones_none() -> None:
    proto = saga_pb2.Saga(saga_id="s", state=saga_pb2.SAGA_STATE_COMPENSATED)
    proto.create_time.FromDatetime(datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC))
    failure = proto.failure
    failure.step, failure.code, failure.reason = "pay", "FAILED_PRECONDITION", "NO_FUNDS"

    saga = saga_from_proto(proto)

    assert saga.create_time == datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert saga.update_time is None
    assert saga.failure is not None
    assert saga.failure.reason == "NO_FUNDS"
    assert saga.state.settled


def test_the_saga_id_falls_back_to_the_resource_name() -> None:
    assert saga_from_proto(saga_pb2.Saga(name="sagas/from-name")).saga_id == "from-name"


@given(json_values)
def test_json_payloads_round_trip_through_the_saga_input(value: object) -> None:
    payload = encode_payload(value)
    saga = saga_from_proto(saga_pb2.Saga(saga_id="s", input=payload))

    assert saga.input_json() == value


def test_bytes_are_sent_as_they_are() -> None:
    assert encode_payload(b"\xff\x00") == b"\xff\x00"
    assert encode_payload(bytearray(b"ab")) == b"ab"
    assert encode_payload({"é": 1}) == '{"é":1}'.encode()


def test_saga_names_and_list_queries_are_checked_before_any_call() -> None:
    assert saga_name("abc") == "sagas/abc"
    with pytest.raises(ValueError, match="plain"):
        saga_name("sagas/abc")
    with pytest.raises(ValueError, match="UNSPECIFIED is not a state"):
        ListQuery.of(states=["UNSPECIFIED"])
    with pytest.raises(ValueError, match="BOGUS"):
        ListQuery.of(states=["BOGUS"])
    request = ListQuery.of(states=["NEEDS_ATTENTION"], page_size=1000).page("tok")
    assert list(request.states) == [saga_pb2.SAGA_STATE_NEEDS_ATTENTION]
    assert (request.page_size, request.page_token, request.definition) == (1000, "tok", "")


def test_rewatch_pauses_grow_and_are_capped() -> None:
    delays = [rewatch_delay(n) for n in range(1, 12)]

    assert delays[0] == 0.05
    assert delays == sorted(delays)
    assert max(delays) == 2.0
