"""Pure parts of the SDK: proto conversion, payload encoding and request building."""

from __future__ import annotations

import socket
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from saga.v1 import coordinator_service_pb2, saga_pb2

from saga_sdk.model import (
    AuditEntry,
    DefinitionVersion,
    OperatorAction,
    RetryPolicy,
    SagaEventType,
    SagaState,
    StepKind,
    StepState,
    counts_from_proto,
    definition_from_proto,
    definition_to_proto,
    event_from_proto,
    register_result_from_proto,
    saga_from_proto,
    summary_from_proto,
)
from saga_sdk.requests import (
    ListQuery,
    cancel_request,
    complete_request,
    default_actor,
    encode_payload,
    mark_compensated_request,
    prune_request,
    register_request,
    resume_request,
    retry_request,
    rewatch_delay,
    saga_name,
)

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


def test_labels_audit_deadline_and_operator_steps_are_converted() -> None:
    proto = saga_pb2.Saga(
        saga_id="s",
        state=saga_pb2.SAGA_STATE_COMPENSATING,
        labels={"tenant": "t-1", "customer": "c-42"},
        steps=[saga_pb2.StepRun(name="a", state=saga_pb2.STEP_STATE_COMPENSATED, by_operator=True)],
        audit=[
            saga_pb2.AuditEntry(
                sequence=7,
                actor="ops@host",
                action=saga_pb2.OPERATOR_ACTION_MARK_COMPENSATED,
                step="a",
                reason="closed by hand",
            ),
            saga_pb2.AuditEntry(sequence=9, action=42),  # type: ignore[arg-type]
        ],
    )
    proto.audit[0].time.FromDatetime(datetime(2030, 1, 2, tzinfo=UTC))
    proto.deadline_time.FromDatetime(datetime(2030, 1, 3, tzinfo=UTC))

    saga = saga_from_proto(proto)

    assert dict(saga.labels) == {"customer": "c-42", "tenant": "t-1"}
    assert list(saga.labels) == ["customer", "tenant"]
    assert saga.steps[0].by_operator is True
    assert saga.deadline_time == datetime(2030, 1, 3, tzinfo=UTC)
    first, unknown = saga.audit
    assert first == AuditEntry(
        7,
        datetime(2030, 1, 2, tzinfo=UTC),
        "ops@host",
        OperatorAction.MARK_COMPENSATED,
        "a",
        "closed by hand",
    )
    assert unknown.action is OperatorAction.UNSPECIFIED
    assert unknown.time is None
    assert hash(saga) == hash(saga_from_proto(proto))


def test_a_saga_without_the_new_fields_reads_as_before() -> None:
    saga = saga_from_proto(saga_pb2.Saga(saga_id="s", steps=[saga_pb2.StepRun(name="a")]))

    assert dict(saga.labels) == {}
    assert saga.audit == ()
    assert saga.deadline_time is None
    assert saga.steps[0].by_operator is False


def test_events_name_the_action_and_operator_events_who_and_why() -> None:
    sent = event_from_proto(
        saga_pb2.SagaEvent(
            sequence=5,
            type=saga_pb2.SAGA_EVENT_TYPE_COMPENSATION_SUCCEEDED,
            step="open-account",
            attempt=2,
            operation="compensate",
            action="CloseAccount",
        )
    )
    resumed = event_from_proto(
        saga_pb2.SagaEvent(
            sequence=9, type=saga_pb2.SAGA_EVENT_TYPE_RESUMED, actor="ops@host", reason="fixed"
        )
    )
    emitted = event_from_proto(
        saga_pb2.SagaEvent(type=saga_pb2.SAGA_EVENT_TYPE_STEP_SUCCEEDED, emits="UserCreated")
    )

    assert (sent.type, sent.operation, sent.action, sent.attempt) == (
        SagaEventType.COMPENSATION_SUCCEEDED,
        "compensate",
        "CloseAccount",
        2,
    )
    assert not sent.type.by_operator
    assert (resumed.type, resumed.actor, resumed.reason) == (
        SagaEventType.RESUMED,
        "ops@host",
        "fixed",
    )
    assert resumed.type.by_operator
    assert emitted.emits == "UserCreated"


@pytest.mark.parametrize(
    ("number", "expected"),
    [
        (saga_pb2.SAGA_EVENT_TYPE_RETRY_REQUESTED, SagaEventType.RETRY_REQUESTED),
        (saga_pb2.SAGA_EVENT_TYPE_RESUMED, SagaEventType.RESUMED),
        (saga_pb2.SAGA_EVENT_TYPE_STEP_MARKED_COMPENSATED, SagaEventType.STEP_MARKED_COMPENSATED),
        (saga_pb2.SAGA_EVENT_TYPE_STEP_COMPLETED, SagaEventType.STEP_COMPLETED),
        (saga_pb2.SAGA_EVENT_TYPE_DEADLINE_EXCEEDED, SagaEventType.DEADLINE_EXCEEDED),
        (99, SagaEventType.UNSPECIFIED),
    ],
)
def test_every_event_type_of_the_contract_is_known(number: int, expected: SagaEventType) -> None:
    event = event_from_proto(saga_pb2.SagaEvent(type=number))  # type: ignore[arg-type]

    assert event.type is expected


def test_every_proto_event_type_has_a_name_in_the_sdk() -> None:
    names = {
        v.name.removeprefix("SAGA_EVENT_TYPE_") for v in saga_pb2.SagaEventType.DESCRIPTOR.values
    }

    assert names == {t.value for t in SagaEventType}


def test_counts_keep_the_coordinators_order_and_read_missing_states_as_zero() -> None:
    counts = counts_from_proto(
        coordinator_service_pb2.CountSagasResponse(
            counts=[
                coordinator_service_pb2.StateCount(
                    state=saga_pb2.SAGA_STATE_NEEDS_ATTENTION, count=2
                ),
                coordinator_service_pb2.StateCount(state=saga_pb2.SAGA_STATE_RUNNING, count=5),
            ],
            total=7,
        )
    )

    assert list(counts.counts) == [SagaState.NEEDS_ATTENTION, SagaState.RUNNING]
    assert counts["NEEDS_ATTENTION"] == 2
    assert counts[SagaState.SUCCEEDED] == 0
    assert counts.total == 7


def _definition_proto() -> saga_pb2.SagaDefinition:
    definition = saga_pb2.SagaDefinition(
        name="onboard",
        version=2,
        description="d",
        steps=[
            saga_pb2.StepDefinition(
                name="open",
                participant="accounts",
                action="OpenAccount",
                compensation="CloseAccount",
                kind=saga_pb2.STEP_KIND_COMPENSATABLE,
                retry=saga_pb2.RetryPolicy(max_attempts=3, jitter=0.0),
            ),
            saga_pb2.StepDefinition(
                name="charge",
                participant="billing",
                action="Charge",
                kind=saga_pb2.STEP_KIND_PIVOT,
                max_attempts=5,
            ),
            saga_pb2.StepDefinition(
                name="notify",
                participant="mail",
                action="Notify",
                kind=saga_pb2.STEP_KIND_RETRIABLE,
                emits="CustomerNotified",
            ),
        ],
    )
    definition.steps[0].timeout.FromTimedelta(timedelta(seconds=2))
    definition.compensation_retry.max_backoff.FromTimedelta(timedelta(seconds=30))
    definition.deadline.FromTimedelta(timedelta(hours=1))
    return definition


def test_definitions_convert_both_ways_without_filling_in_defaults() -> None:
    proto = _definition_proto()

    definition = definition_from_proto(proto)

    assert [s.kind for s in definition.steps] == [
        StepKind.COMPENSATABLE,
        StepKind.PIVOT,
        StepKind.RETRIABLE,
    ]
    assert definition.pivot is not None
    assert definition.pivot.name == "charge"
    first = definition.steps[0]
    assert first.timeout == timedelta(seconds=2)
    assert first.retry == RetryPolicy(max_attempts=3, jitter=0.0)
    assert first.compensation_retry is None
    assert definition.steps[1].timeout is None
    assert definition.steps[1].max_attempts == 5
    assert definition.steps[2].emits == "CustomerNotified"
    assert definition.retry is None
    assert definition.compensation_retry == RetryPolicy(max_backoff=timedelta(seconds=30))
    assert definition.deadline == timedelta(hours=1)
    assert definition_to_proto(definition) == proto


def test_definition_summaries_and_registration_are_converted() -> None:
    info = coordinator_service_pb2.DefinitionVersion(
        version=2, digest="ab" * 32, unfinished_sagas=3, step_count=3
    )
    info.register_time.FromDatetime(datetime(2030, 1, 1, tzinfo=UTC))
    summary = summary_from_proto(
        coordinator_service_pb2.DefinitionSummary(
            name="onboard",
            versions=[coordinator_service_pb2.DefinitionVersion(version=1), info],
            description="d",
        )
    )
    registered = register_result_from_proto(
        coordinator_service_pb2.RegisterDefinitionResponse(
            definition=_definition_proto(), created=True, info=info
        )
    )

    assert [v.version for v in summary.versions] == [1, 2]
    assert summary.newest == DefinitionVersion(2, datetime(2030, 1, 1, tzinfo=UTC), "ab" * 32, 3, 3)
    assert registered.created is True
    assert registered.info == summary.newest
    assert registered.definition.name == "onboard"


def test_operator_requests_carry_the_reason_the_actor_and_the_expected_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SAGA_ACTOR", "ops@example")
    retry = retry_request("s1", "charge", reason="card fixed", expected_version=12)
    complete = complete_request("s1", reason="paid by hand", output={"receipt": 1}, actor="ann")
    resume = resume_request(
        "s1", reason="r", compensation_retry=RetryPolicy(5, timedelta(milliseconds=100))
    )
    mark = mark_compensated_request("s1", reason="r")

    assert (retry.name, retry.step, retry.reason, retry.actor, retry.expected_version) == (
        "sagas/s1",
        "charge",
        "card fixed",
        "ops@example",
        12,
    )
    assert (complete.step, complete.actor, complete.output) == ("", "ann", b'{"receipt":1}')
    assert resume.compensation_retry.max_attempts == 5
    assert resume.compensation_retry.initial_backoff.ToTimedelta() == timedelta(milliseconds=100)
    assert not resume.compensation_retry.HasField("max_backoff")
    assert not resume_request("s1", reason="r").HasField("compensation_retry")
    assert mark.step == ""
    with pytest.raises(ValueError, match="expected_version"):
        retry_request("s1", reason="r", expected_version=-1)


def test_the_default_actor_is_saga_actor_else_user_at_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SAGA_ACTOR", "  ci-bot  ")
    assert default_actor() == "ci-bot"
    assert cancel_request("s1", "why").actor == "ci-bot"
    assert cancel_request("s1", "why", actor="").actor == ""
    monkeypatch.delenv("SAGA_ACTOR")
    user, at, host = default_actor().partition("@")
    assert user
    assert at == "@"
    assert host == socket.gethostname()


def test_list_and_count_filters_share_one_query() -> None:
    after = datetime(2030, 1, 1, tzinfo=UTC)
    query = ListQuery.of(
        states=["RUNNING"],
        definition="onboard",
        definition_version=2,
        labels={"tenant": "t-1"},
        created_after=after,
        created_before=after + timedelta(days=1),
        stuck_on_participant="cards",
        stuck_on_step="issue-card",
    )
    page = query.page("tok")
    count = query.count()

    assert dict(page.labels) == {"tenant": "t-1"} == dict(count.labels)
    assert page.created_after.ToDatetime(tzinfo=UTC) == after
    assert count.created_before.ToDatetime(tzinfo=UTC) == after + timedelta(days=1)
    assert (page.stuck_on_participant, page.stuck_on_step) == ("cards", "issue-card")
    assert (count.definition, count.definition_version) == ("onboard", 2)
    assert not ListQuery.of().page().HasField("created_after")
    with pytest.raises(ValueError, match="timezone-aware"):
        ListQuery.of(created_after=datetime(2030, 1, 1))
    with pytest.raises(ValueError, match="needs definition"):
        ListQuery.of(definition_version=2)


def test_registration_takes_a_message_a_model_or_the_json_form() -> None:
    proto = _definition_proto()
    as_dict = {
        "name": "onboard",
        "version": 2,
        "steps": [{"name": "a", "participant": "p", "action": "A", "timeout": "2s"}],
    }

    assert register_request(proto, "me").definition == proto
    assert register_request(definition_from_proto(proto), "me").definition == proto
    assert register_request(as_dict, "me").definition.steps[0].timeout.seconds == 2
    with pytest.raises(ValueError, match="not a saga definition"):
        register_request({"name": "x", "stepz": []}, "me")


def test_prune_requests_need_a_positive_age() -> None:
    request = prune_request(timedelta(days=30), dry_run=True)

    assert request.older_than.ToTimedelta() == timedelta(days=30)
    assert request.dry_run is True
    with pytest.raises(ValueError, match="positive"):
        prune_request(timedelta(0))
