"""The console's parts that need no browser: its filters, its guard, its settings, its rules."""

from __future__ import annotations

from datetime import UTC, datetime

import grpc
import pytest
from saga.v1 import saga_pb2

from coordinator.web.actions import Action, action_views
from coordinator.web.query import QueryError, SagaFilters
from coordinator.web.security import Forbidden, Guard
from coordinator.web.server import ConsoleError, ConsoleSettings, check_settings
from coordinator.web.views import (
    SHOWN_PER_GROUP,
    attention_groups,
    payload_summary,
    trace_link,
)
from saga_sdk.model import Saga, SagaState, StepKind, StepRun, StepState


def test_filters_round_trip_through_the_url() -> None:
    filters = SagaFilters.from_params(
        {
            "state": ["NEEDS_ATTENTION,running"],
            "definition": ["onboard"],
            "version": ["2"],
            "label": ["customer=c-1", "tier=gold"],
            "from": ["2026-03-01T12:00"],
            "stuck_on": ["accounts"],
            "page": ["abc"],
        }
    )
    assert filters.states == (SagaState.NEEDS_ATTENTION, SagaState.RUNNING)
    assert filters.created_from == datetime(2026, 3, 1, 12, tzinfo=UTC)
    again = SagaFilters.from_params(
        {key: [value for k, value in filters.params() if k == key] for key, _ in filters.params()}
    )
    assert again == filters
    query = filters.list_query()
    assert query.labels == (("customer", "c-1"), ("tier", "gold"))
    assert query.stuck_on_participant == "accounts"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"state": ["LOST"]}, "state: 'LOST' is not one of"),
        ({"version": ["2"]}, "version: choose a definition too"),
        ({"definition": ["d"], "version": ["0"]}, "not a version number"),
        ({"label": ["nokey"]}, "label: 'nokey' is not key=value"),
        ({"from": ["yesterday"]}, "from: 'yesterday' is not a time"),
        ({"from": ["2026-03-02"], "to": ["2026-03-01"]}, "from: must be before to"),
        ({"size": ["7"]}, "size: one of"),
    ],
)
def test_bad_filters_are_named(params: dict[str, list[str]], message: str) -> None:
    with pytest.raises(QueryError, match=message):
        SagaFilters.from_params(params)


def _guard() -> Guard:
    return Guard.create(listen_host="127.0.0.1", port=8080, tls=False)


def test_the_guard_answers_only_the_hosts_it_is_reached_by() -> None:
    guard = _guard()
    guard.check_host("127.0.0.1:8080")
    guard.check_host("localhost:8080")
    with pytest.raises(Forbidden, match="does not answer to the host"):
        guard.check_host("evil.example:8080")
    with pytest.raises(Forbidden):
        guard.check_host(None)
    named = Guard.create(listen_host="0.0.0.0", port=443, tls=True, allowed_hosts=["sagas.corp"])
    named.check_host("sagas.corp:443")


def test_the_guard_refuses_posts_from_elsewhere_or_without_the_session_token() -> None:
    guard = _guard()
    session = guard.new_session()
    token = guard.csrf_token(session)
    good = {"host": "127.0.0.1:8080", "session": session, "token": token}
    guard.check_post(origin="http://127.0.0.1:8080", fetch_site=None, **good)
    guard.check_post(origin=None, fetch_site="same-origin", **good)
    for origin, site, message in [
        ("http://evil.example", None, "cross-origin"),
        ("null", None, "cross-origin"),
        (None, "cross-site", "cross-site"),
        (None, "same-site", "cross-site"),
        (None, None, "neither its Origin"),
    ]:
        with pytest.raises(Forbidden, match=message):
            guard.check_post(origin=origin, fetch_site=site, **good)
    same = {"host": "127.0.0.1:8080", "origin": "http://127.0.0.1:8080", "fetch_site": None}
    with pytest.raises(Forbidden, match="does not match"):
        guard.check_post(session=session, token=guard.csrf_token("another"), **same)
    with pytest.raises(Forbidden, match="no session token"):
        guard.check_post(session=session, token="", **same)
    with pytest.raises(Forbidden, match="does not match"):
        _guard().check_post(session=session, token=token, **same)  # another process's secret


def test_plaintext_is_served_on_loopback_only_unless_asked() -> None:
    check_settings(ConsoleSettings(target="c:1", listen="127.0.0.1:8080"))
    check_settings(ConsoleSettings(target="c:1", listen="[::1]:8080"))
    with pytest.raises(ConsoleError, match="plaintext HTTP is served on loopback only"):
        check_settings(ConsoleSettings(target="c:1", listen="0.0.0.0:8080"))
    insecure = {"target": "c:1", "listen": "0.0.0.0:8080", "insecure_plaintext": True}
    with pytest.raises(ConsoleError, match="give --allowed-host NAME"):
        check_settings(ConsoleSettings(**insecure))  # type: ignore[arg-type]
    check_settings(ConsoleSettings(**insecure, allowed_hosts=("console.internal",)))  # type: ignore[arg-type]
    with pytest.raises(ConsoleError, match="go together"):
        check_settings(
            ConsoleSettings(target="c:1", listen="0.0.0.0:1", key=__import__("pathlib").Path("k"))
        )
    with pytest.raises(ConsoleError, match="HOST:PORT"):
        check_settings(ConsoleSettings(target="c:1", listen="8080"))


def _saga(state: SagaState, *steps: StepRun) -> Saga:
    return Saga(
        saga_id="s-1",
        definition="d",
        definition_version=1,
        state=state,
        input=b"",
        steps=steps,
        failure=None,
        cancel_reason="",
        create_time=None,
        update_time=None,
        end_time=None,
        version=3,
    )


def _step(name: str, state: StepState, kind: StepKind = StepKind.COMPENSATABLE) -> StepRun:
    return StepRun(name, "p", kind, state, 1, 0, None, None, None, None, None)


def test_each_action_fits_or_says_why_not() -> None:
    parked_back = _saga(
        SagaState.NEEDS_ATTENTION,
        _step("a", StepState.COMPENSATING),
        _step("b", StepState.COMPENSATED),
    )
    views = {view.action: view for view in action_views(parked_back)}
    assert views[Action.RESUME].allowed
    assert views[Action.RESUME].step == "a"
    assert views[Action.MARK_COMPENSATED].allowed
    assert "not cancelled" in views[Action.CANCEL].why_not
    assert not views[Action.COMPLETE].allowed
    parked_forward = _saga(
        SagaState.NEEDS_ATTENTION,
        _step("a", StepState.SUCCEEDED),
        _step("pay", StepState.FAILED, StepKind.PIVOT),
    )
    views = {view.action: view for view in action_views(parked_forward)}
    assert views[Action.RETRY].step == "pay"
    assert views[Action.COMPLETE].step == "pay"
    assert "parked going forward" in views[Action.RESUME].why_not
    running = _saga(SagaState.RUNNING, _step("a", StepState.RUNNING))
    views = {view.action: view for view in action_views(running)}
    assert views[Action.CANCEL].allowed
    assert "on its way" in views[Action.RETRY].why_not
    past_pivot = _saga(
        SagaState.RUNNING,
        _step("pay", StepState.SUCCEEDED, StepKind.PIVOT),
        _step("mail", StepState.RUNNING, StepKind.RETRIABLE),
    )
    assert "can only go forward" in action_views(past_pivot)[-1].why_not
    ended = _saga(SagaState.SUCCEEDED, _step("a", StepState.SUCCEEDED))
    assert all("has ended" in view.why_not for view in action_views(ended))


def test_payloads_are_summarised_and_trace_links_are_filled_in() -> None:
    assert payload_summary(None) == "none"
    assert payload_summary(b"") == "empty"
    assert payload_summary(b'{"a": 1}') == '8 bytes, 1 field: {"a": 1}'
    assert payload_summary(b"\xff\xfe") == "2 bytes, binary"
    assert payload_summary(b"x" * 1000).endswith("…")
    saga = _saga(SagaState.RUNNING)
    saga = Saga(**{**saga.__dict__, "saga_id": "a b&c"})
    assert trace_link("http://j/search?tags={saga_id}", saga) == "http://j/search?tags=a%20b%26c"
    assert trace_link("http://j/trace/{trace_id}", saga) == ""  # a saga with no trace
    assert trace_link("", saga) == ""
    traced = Saga(**{**saga.__dict__, "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736"})
    assert (
        trace_link("http://jaeger:16686/trace/{trace_id}", traced)
        == "http://jaeger:16686/trace/4bf92f3577b34da6a3ce929d0e0e4736"
    )


def test_a_live_stream_ends_quietly_when_the_coordinator_fails_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from coordinator.web.app import _StreamGuard
    from saga_sdk.errors import Unavailable

    with _StreamGuard("the live stream of saga 'a'"):
        raise ConnectionResetError  # the browser went away
    with _StreamGuard("the live stream of saga 'a'"):
        raise Unavailable(grpc.StatusCode.UNAVAILABLE, "connection refused")
    with pytest.raises(KeyError), _StreamGuard("a stream"):
        raise KeyError("a bug is not swallowed")

    assert [r.getMessage() for r in caplog.records] == [
        "the live stream of saga 'a' ended: the coordinator failed it (UNAVAILABLE: "
        "connection refused)"
    ]


def _parked(saga_id: str, definition: str, reason: str, minute: int) -> saga_pb2.Saga:
    saga = saga_pb2.Saga(
        name=f"sagas/{saga_id}",
        saga_id=saga_id,
        definition=definition,
        definition_version=1,
        state=saga_pb2.SAGA_STATE_NEEDS_ATTENTION,
        failure=saga_pb2.Failure(step="charge", code="UNAVAILABLE", reason=reason, message="down"),
    )
    saga.create_time.FromDatetime(datetime(2026, 1, 1, tzinfo=UTC))
    saga.update_time.FromDatetime(datetime(2026, 1, 1, 0, minute, tzinfo=UTC))
    return saga


def test_parked_sagas_are_grouped_and_counted_and_only_the_oldest_named() -> None:
    parked = [_parked(f"a-{i:02d}", "pay", "LEDGER_DOWN", 50 - i) for i in range(25)]
    parked += [_parked("b-1", "pay", "CARD_REFUSED", 55), _parked("c-1", "ship", "", 1)]
    groups = attention_groups(parked)

    assert [(g.definition, g.step, g.reason, g.count) for g in groups] == [
        ("ship", "charge", "UNAVAILABLE", 1),  # no reason: its code stands for it
        ("pay", "charge", "LEDGER_DOWN", 25),
        ("pay", "charge", "CARD_REFUSED", 1),
    ]
    ledger = groups[1]
    assert len(ledger.sagas) == SHOWN_PER_GROUP
    assert [saga.saga_id for saga in ledger.sagas] == [f"a-{i:02d}" for i in range(24, 14, -1)]
    assert ledger.oldest.saga_id == "a-24"
    assert ledger.message == "down"
