"""Bad input on every RPC: oversized payloads, requests and metadata, ids outside the rules,
absurd deadlines, random and mutated protobuf bytes. The coordinator never crashes or hangs,
answers a clean status with a clear message, and stores nothing it refused."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from saga.v1 import coordinator_service_pb2 as cpb
from saga.v1 import coordinator_service_pb2_grpc as cpb_grpc
from saga.v1 import saga_pb2

from tests.faults.support import (
    Deployment,
    ErrorDetails,
    StoredSaga,
    deploy,
    details_of,
    healthy,
    one_step_definition,
    stored_sagas,
    wait_settled,
)

MAX_PAYLOAD = 64 * 1024
MAX_MESSAGE = 256 * 1024
SERVICE = "/saga.v1.CoordinatorService/"
CLEAN_REFUSALS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)
LONGEST_CLEAR_MESSAGE = 2048


@dataclass
class Coordinator:
    """The module's coordinator, what it had stored before the tests, and what they created."""

    deployment: Deployment
    channel: grpc.Channel
    stub: cpb_grpc.CoordinatorServiceStub
    before: dict[str, StoredSaga]
    created: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def create(self, saga_id: str, payload: bytes = b"{}", **kwargs: Any) -> cpb.CreateSagaResponse:
        """CreateSaga of the ``fuzz`` definition; remembers what it created."""
        request = cpb.CreateSagaRequest(saga_id=saga_id, definition="fuzz", input=payload)
        response: cpb.CreateSagaResponse = self.stub.CreateSaga(request, **kwargs)
        self.remember(response.saga.saga_id)
        return response

    def remember(self, saga_id: str) -> None:
        with self.lock:
            self.created.add(saga_id)

    def refused(self, call: Callable[[], object]) -> ErrorDetails:
        """Make a call that must be refused; its error, checked to be clean."""
        with pytest.raises(grpc.RpcError) as raised:
            call()
        details = details_of(raised.value)
        assert details.code in CLEAN_REFUSALS, details
        assert details.message, details
        assert len(details.message) <= LONGEST_CLEAR_MESSAGE, details.message[:300]
        return details

    def assert_intact(self) -> None:
        """Alive, serving, the sagas stored before unchanged, nothing stored it refused."""
        process = self.deployment.coordinator
        assert process.alive, f"the coordinator died:\n{self.deployment.log_tail()}"
        assert healthy(self.deployment.target), "the coordinator no longer answers"
        now = stored_sagas(self.deployment.database)
        for saga_id, saga in self.before.items():
            assert now.get(saga_id) == saga, f"{saga_id} changed"
        with self.lock:
            unexpected = set(now) - set(self.before) - self.created
        assert not unexpected, f"stored without an OK answer: {sorted(unexpected)[:5]}"


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    deployment = deploy(
        tmp_path_factory.mktemp("bad-input"),
        [one_step_definition("fuzz")],
        max_payload_bytes=MAX_PAYLOAD,
        max_message_bytes=MAX_MESSAGE,
    )
    try:
        deployment.start_participants()
        deployment.start_coordinator()
        channel = grpc.insecure_channel(deployment.target)
        stub = cpb_grpc.CoordinatorServiceStub(channel)
        for saga_id, plan in (("done", {}), ("undone", {"reject": "only"})):
            request = cpb.CreateSagaRequest(
                saga_id=saga_id, definition="fuzz", input=json.dumps(plan).encode()
            )
            stub.CreateSaga(request, timeout=10)
        assert set(wait_settled(deployment.database, ["done", "undone"], 30).values()) == {
            "SUCCEEDED",
            "COMPENSATED",
        }
        yield Coordinator(deployment, channel, stub, stored_sagas(deployment.database))
        channel.close()
    finally:
        deployment.stop()


# --- limits --------------------------------------------------------------------------------------


def test_a_payload_over_the_limit_is_invalid_argument(coordinator: Coordinator) -> None:
    details = coordinator.refused(lambda: coordinator.create("big", b"x" * (MAX_PAYLOAD + 1)))

    assert details.code is grpc.StatusCode.INVALID_ARGUMENT
    assert [field for field, _ in details.violations] == ["input"]
    coordinator.assert_intact()


def test_a_payload_at_the_limit_is_accepted(coordinator: Coordinator) -> None:
    answer = coordinator.create("at-limit", b"x" * MAX_PAYLOAD, timeout=10)

    assert answer.created
    coordinator.assert_intact()


def test_a_request_over_the_message_limit_is_resource_exhausted(coordinator: Coordinator) -> None:
    details = coordinator.refused(
        lambda: coordinator.create("huge", b"x" * (MAX_MESSAGE + 1024), timeout=10)
    )

    assert details.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    coordinator.assert_intact()


@pytest.mark.parametrize(
    "metadata",
    [
        [("x-junk", "a" * 100_000)],
        [(f"x-header-{i}", "b" * 200) for i in range(500)],
        [("x-binary-bin", b"\0" * 50_000)],
    ],
    ids=["one huge value", "five hundred headers", "a huge binary value"],
)
def test_huge_metadata_is_refused(
    coordinator: Coordinator, metadata: list[tuple[str, Any]]
) -> None:
    request = cpb.CreateSagaRequest(saga_id="metadata", definition="fuzz", input=b"{}")

    details = coordinator.refused(
        lambda: coordinator.stub.CreateSaga(request, metadata=tuple(metadata), timeout=10)
    )

    assert details.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    coordinator.assert_intact()


BAD_IDS = {
    "129 characters": "a" * 129,
    "a leading dash": "-abc",
    "a leading dot": ".abc",
    "a space": "has space",
    "a slash": "has/slash",
    "a path": "../etc/passwd",
    "a NUL": "nul\0byte",
    "a newline": "new\nline",
    "non-ASCII letters": "café",
    "an emoji": "saga-\N{FIRE}",
    "a percent escape": "a%2Fb",
}


@pytest.mark.parametrize("saga_id", list(BAD_IDS.values()), ids=list(BAD_IDS))
def test_a_saga_id_outside_the_rules_is_invalid_argument(
    coordinator: Coordinator, saga_id: str
) -> None:
    details = coordinator.refused(lambda: coordinator.create(saga_id, timeout=10))

    assert details.code is grpc.StatusCode.INVALID_ARGUMENT
    assert [field for field, _ in details.violations] == ["saga_id"]
    coordinator.assert_intact()


def test_a_saga_id_of_128_characters_is_accepted(coordinator: Coordinator) -> None:
    assert coordinator.create("b" * 128, timeout=10).created
    coordinator.assert_intact()


@pytest.mark.parametrize(
    "name",
    [
        "",
        "sagas/",
        "done",
        "saga/done",
        "sagas/done/steps",
        "sagas/../done",
        "sagas/" + "c" * 129,
        "sagas/" + "d" * 100_000,
        "sagas/\0",
        "sagas/caf\N{LATIN SMALL LETTER E WITH ACUTE}",
    ],
    ids=[
        "empty",
        "no id",
        "no prefix",
        "another collection",
        "a sub-resource",
        "a path",
        "129 characters",
        "100 kB",
        "a NUL",
        "non-ASCII",
    ],
)
def test_a_resource_name_outside_the_rules_is_invalid_argument_on_every_rpc(
    coordinator: Coordinator, name: str
) -> None:
    stub = coordinator.stub
    calls: dict[str, Callable[[], object]] = {
        "GetSaga": lambda: stub.GetSaga(cpb.GetSagaRequest(name=name), timeout=10),
        "CancelSaga": lambda: stub.CancelSaga(cpb.CancelSagaRequest(name=name), timeout=10),
        "WatchSaga": lambda: list(stub.WatchSaga(cpb.WatchSagaRequest(name=name), timeout=10)),
    }
    for rpc, call in calls.items():
        details = coordinator.refused(call)
        assert details.code is grpc.StatusCode.INVALID_ARGUMENT, (rpc, details)
    coordinator.assert_intact()


def test_a_definition_name_of_ten_thousand_characters_is_refused_with_a_short_message(
    coordinator: Coordinator,
) -> None:
    # The refusal must reach the client: an error message that repeats 10 kB of its input
    # outgrows gRPC's metadata limit, and the client then sees a transport error instead.
    request = cpb.CreateSagaRequest(saga_id="long-definition", definition="x" * 10_000)

    details = coordinator.refused(lambda: coordinator.stub.CreateSaga(request, timeout=10))

    assert details.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), details
    assert details.reason, f"no ErrorInfo: the coordinator's answer was lost: {details}"
    coordinator.assert_intact()


@pytest.mark.parametrize(
    "request_",
    [
        cpb.ListSagasRequest(page_size=-1),
        cpb.ListSagasRequest(page_size=1001),
        cpb.ListSagasRequest(page_size=2**31 - 1),
        cpb.ListSagasRequest(page_token="not-a-token"),
        cpb.ListSagasRequest(page_token="z" * 100_000),
        cpb.ListSagasRequest(states=[saga_pb2.SagaState.ValueType(99)]),
        cpb.ListSagasRequest(states=[saga_pb2.SAGA_STATE_UNSPECIFIED]),
    ],
    ids=[
        "negative page",
        "page over 1000",
        "page of 2^31-1",
        "foreign token",
        "100 kB token",
        "unknown state",
        "unspecified state",
    ],
)
def test_list_parameters_outside_the_rules_are_invalid_argument(
    coordinator: Coordinator, request_: cpb.ListSagasRequest
) -> None:
    details = coordinator.refused(lambda: coordinator.stub.ListSagas(request_, timeout=10))

    assert details.code is grpc.StatusCode.INVALID_ARGUMENT, details
    coordinator.assert_intact()


def test_a_cancel_reason_over_the_limit_is_invalid_argument(coordinator: Coordinator) -> None:
    request = cpb.CancelSagaRequest(name="sagas/done", reason="r" * 1025)

    details = coordinator.refused(lambda: coordinator.stub.CancelSaga(request, timeout=10))

    assert details.code is grpc.StatusCode.INVALID_ARGUMENT
    coordinator.assert_intact()


# --- deadlines -----------------------------------------------------------------------------------


def test_a_tiny_deadline_stores_all_or_nothing_and_the_retry_converges(
    coordinator: Coordinator,
) -> None:
    deadlines = [1e-6, 1e-5, 1e-4, 3e-4, 1e-3, 2e-3, 5e-3, 1e-2] * 3
    ids = [f"deadline-{i}" for i in range(len(deadlines))]
    codes = set()
    for saga_id, deadline in zip(ids, deadlines, strict=True):
        coordinator.remember(saga_id)  # its outcome is unknown: it may be stored
        try:
            coordinator.create(saga_id, timeout=deadline)
            codes.add(grpc.StatusCode.OK)
        except grpc.RpcError as error:
            codes.add(details_of(error).code)
    assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED}, codes
    assert grpc.StatusCode.DEADLINE_EXCEEDED in codes
    time.sleep(0.5)  # requests cut off by their deadline may still be finishing

    stored = stored_sagas(coordinator.deployment.database)
    for saga_id in ids:
        saga = stored.get(saga_id)
        assert saga is None or (saga.creations == 1 and saga.events >= 1), (saga_id, saga)
    for saga_id in ids:  # the client's retry, with a sane deadline
        answer = coordinator.create(saga_id, timeout=10)
        assert answer.created == (saga_id not in stored), saga_id
    finals = wait_settled(coordinator.deployment.database, ids, 15)
    stuck = sorted(saga_id for saga_id, state in finals.items() if state != "SUCCEEDED")
    assert not stuck, (
        f"{len(stuck)} sagas stored by a CreateSaga that its deadline cut off never run, "
        f"even after the client's retry was answered: {stuck}"
    )
    coordinator.assert_intact()


def test_a_tiny_deadline_on_a_stream_ends_it_cleanly(coordinator: Coordinator) -> None:
    # gRPC's client deadline timer is coarse: on loopback a settled saga's one-message stream
    # often completes inside a 1 µs deadline. Either way the answer is clean and whole.
    outcomes: list[object] = []
    for _ in range(20):
        try:
            changes = coordinator.stub.WatchSaga(
                cpb.WatchSagaRequest(name="sagas/done"), timeout=1e-6
            )
            outcomes.append([change.saga.saga_id for change in changes])
        except grpc.RpcError as error:
            outcomes.append(details_of(error).code)
    assert set(map(str, outcomes)) <= {str(["done"]), str(grpc.StatusCode.DEADLINE_EXCEEDED)}
    coordinator.assert_intact()


@pytest.mark.parametrize("timeout", [None, 10 * 365 * 24 * 3600.0], ids=["none", "ten years"])
def test_no_deadline_or_an_absurd_one_is_served(
    coordinator: Coordinator, timeout: float | None
) -> None:
    answers: list[object] = []
    stub = coordinator.stub

    def calls() -> None:
        answers.append(coordinator.create(f"patient-{timeout is None}", timeout=timeout))
        answers.append(stub.GetSaga(cpb.GetSagaRequest(name="sagas/done"), timeout=timeout))
        answers.append(stub.ListSagas(cpb.ListSagasRequest(page_size=5), timeout=timeout))
        answers.append(
            list(stub.WatchSaga(cpb.WatchSagaRequest(name="sagas/done"), timeout=timeout))
        )

    worker = threading.Thread(target=calls, daemon=True)
    worker.start()
    worker.join(20)

    assert not worker.is_alive(), "a call without a deadline hangs"
    assert len(answers) == 4
    coordinator.assert_intact()


# --- bytes that are not the request they claim to be --------------------------------------------

VALID: dict[str, bytes] = {
    "CreateSaga": cpb.CreateSagaRequest(
        saga_id="fuzz-valid", definition="fuzz", input=b'{"a": 1}'
    ).SerializeToString(),
    "GetSaga": cpb.GetSagaRequest(name="sagas/done").SerializeToString(),
    "ListSagas": cpb.ListSagasRequest(
        states=[saga_pb2.SAGA_STATE_SUCCEEDED], definition="fuzz", page_size=10
    ).SerializeToString(),
    "CancelSaga": cpb.CancelSagaRequest(name="sagas/done", reason="why").SerializeToString(),
    "WatchSaga": cpb.WatchSagaRequest(name="sagas/undone").SerializeToString(),
}
UNPARSABLE = b"\xff\xff\xff\xff\x0f"
"""A field tag that is not a valid varint: no message of any type parses from it."""


def _send(coordinator: Coordinator, method: str, payload: bytes) -> grpc.StatusCode:
    """Send raw bytes as the request of ``method``; the answer's code, checked to be clean."""
    channel: Any = coordinator.channel  # untyped calls: bytes in, bytes out
    try:
        if method == "WatchSaga":
            stream = channel.unary_stream(SERVICE + method)
            for _ in stream(payload, timeout=5):
                pass
        else:
            response = channel.unary_unary(SERVICE + method)(payload, timeout=5)
            if method == "CreateSaga":
                coordinator.remember(cpb.CreateSagaResponse.FromString(response).saga.saga_id)
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        details = details_of(error)
    if details.code is grpc.StatusCode.UNKNOWN and "Error parsing message" in details.message:
        # Undecodable bytes: grpcio answers UNKNOWN by itself (see the test below, which
        # requires INVALID_ARGUMENT); everything else about the answer is checked here.
        return details.code
    assert details.code in CLEAN_REFUSALS, (method, payload[:64], details)
    assert details.message, details
    assert len(details.message) <= LONGEST_CLEAR_MESSAGE, details.message[:300]
    return details.code


@pytest.mark.parametrize("method", list(VALID))
def test_undecodable_bytes_are_invalid_argument(coordinator: Coordinator, method: str) -> None:
    stream = method == "WatchSaga"
    call: Any = (
        coordinator.channel.unary_stream(SERVICE + method)
        if stream
        else coordinator.channel.unary_unary(SERVICE + method)
    )

    def send() -> None:
        answer = call(UNPARSABLE, timeout=5)
        if stream:
            list(answer)

    with pytest.raises(grpc.RpcError) as raised:
        send()

    details = details_of(raised.value)
    assert details.code is grpc.StatusCode.INVALID_ARGUMENT, details
    coordinator.assert_intact()


@st.composite
def mutated(draw: st.DrawFn, method: str) -> bytes:
    """A valid request of ``method``, damaged a few times."""
    data = bytearray(VALID[method])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "repeat"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif kind == "truncate":
            del data[at:]
        else:
            data[at:at] = data[at : at + draw(st.integers(1, 16))]
    return bytes(data)


FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.mark.parametrize("method", list(VALID))
@FUZZ
@given(data=st.data())
def test_random_bytes_never_crash_hang_or_store_anything(
    coordinator: Coordinator, method: str, data: st.DataObject
) -> None:
    payload = data.draw(st.binary(max_size=2048), label="payload")

    _send(coordinator, method, payload)

    assert coordinator.deployment.coordinator.alive, coordinator.deployment.log_tail()


@pytest.mark.parametrize("method", list(VALID))
@FUZZ
@given(data=st.data())
def test_mutated_requests_never_crash_hang_or_store_what_was_refused(
    coordinator: Coordinator, method: str, data: st.DataObject
) -> None:
    payload = data.draw(mutated(method), label="payload")

    _send(coordinator, method, payload)

    assert coordinator.deployment.coordinator.alive, coordinator.deployment.log_tail()


def test_after_all_that_the_coordinator_serves_and_its_file_is_intact(
    coordinator: Coordinator,
) -> None:
    coordinator.assert_intact()
    answer = coordinator.create("still-fine", b"{}", timeout=10)
    assert answer.created
    assert wait_settled(coordinator.deployment.database, ["still-fine"], 30) == {
        "still-fine": "SUCCEEDED"
    }
    with coordinator.lock:
        created = sorted(coordinator.created)
    sagas = stored_sagas(coordinator.deployment.database)
    for saga_id in created:
        if saga_id in sagas:
            assert sagas[saga_id].creations == 1, saga_id
