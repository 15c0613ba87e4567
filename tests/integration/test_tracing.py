"""One trace per saga, received by a real OTLP/gRPC receiver in the test process."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from saga.v1 import coordinator_service_pb2 as cpb
from saga.v1 import saga_pb2

from saga_sdk import AsyncSagaClient, SagaState
from saga_sdk.errors import Rejected
from saga_sdk.participant import CompensateContext, ExecuteContext, Participant
from tests.support.coordinator import (
    four_step_definition,
    running_coordinator,
    start_participants,
    write_definitions,
)
from tests.support.otlp import OtlpReceiver, ReceivedSpan
from tests.support.participants import error, reject
from tests.support.processes import CoordinatorProcess, free_port

ACTIONS = {
    "identity": ("CreateUser", "DeactivateUser"),
    "accounts": ("OpenAccount", "CloseAccount"),
    "cards": ("IssueCard", "CancelCard"),
    "billing": ("CreateSubscription", "CancelSubscription"),
}
EMITS = {
    "create-user": {"emits": "UserCreated"},
    "open-account": {"emits": "AccountOpened"},
    "issue-card": {"emits": "CardIssued"},
    "subscribe": {"emits": "SubscriptionCreated"},
}
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def ns(value: datetime | None) -> int:
    assert value is not None
    return (value - EPOCH) // timedelta(microseconds=1) * 1000


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    started = OtlpReceiver()
    started.start()
    yield started
    started.stop()


def provider(receiver: OtlpReceiver, service: str) -> TracerProvider:
    """A tracer provider of our own (not the global one) exporting to the receiver."""
    made = TracerProvider(resource=Resource.create({"service.name": service}))
    made.add_span_processor(
        BatchSpanProcessor(
            OTLPSpanExporter(endpoint=receiver.endpoint, insecure=True),
            schedule_delay_millis=100,
        )
    )
    return made


def sdk_participants(tracer_provider: TracerProvider, delay: float = 0.0) -> dict[str, Participant]:
    participants = {}
    failures_left = {"accounts": 1}
    for name, (action, compensation) in ACTIONS.items():
        participant = Participant(name, tracer_provider=tracer_provider)

        async def execute(ctx: ExecuteContext, name: str = name) -> dict[str, str]:
            await asyncio.sleep(delay)
            if name == "cards" and ctx.input.get("refuse"):
                raise Rejected("CARD_REFUSED", "no card")
            if failures_left.get(name) and ctx.attempt == 1 and not ctx.input.get("refuse"):
                failures_left[name] -= 1
                raise RuntimeError("flaky")  # INTERNAL: transient, retried
            return {"by": name}

        async def compensate(ctx: CompensateContext) -> None:
            await asyncio.sleep(delay)

        participant.action(action)(execute)
        participant.compensation(compensation)(compensate)
        participants[name] = participant
    return participants


@pytest.fixture
async def participant_provider(receiver: OtlpReceiver) -> AsyncIterator[TracerProvider]:
    made = provider(receiver, "participants")
    yield made
    await asyncio.to_thread(made.shutdown)


async def serve(participants: dict[str, Participant]) -> dict[str, str]:
    return {name: f"127.0.0.1:{await p.start('127.0.0.1:0')}" for name, p in participants.items()}


def root_of(spans: list[ReceivedSpan]) -> ReceivedSpan:
    (root,) = [s for s in spans if s.is_root]
    return root


async def test_one_trace_per_saga_with_attempts_and_participant_spans_inside_it(
    tmp_path: Path, receiver: OtlpReceiver, participant_provider: TracerProvider
) -> None:
    participants = sdk_participants(participant_provider)
    addresses = await serve(participants)
    client_provider = provider(receiver, "shop")
    client_tracer = client_provider.get_tracer("shop")
    try:
        async with (
            running_coordinator(
                tmp_path,
                addresses,
                [four_step_definition("onboard", **EMITS)],
                otlp_endpoint=receiver.endpoint,
            ) as harness,
            AsyncSagaClient(f"127.0.0.1:{harness.coordinator.port}") as client,
        ):
            with client_tracer.start_as_current_span("checkout") as checkout:
                await client.create("onboard", {"company": "Acme"}, saga_id="traced")
            await client.create("onboard", {"refuse": True}, saga_id="refused")
            ok = await client.wait("traced", timeout=30)
            refused = await client.wait("refused", timeout=30)
    finally:
        for participant in participants.values():
            await participant.stop(0)
        await asyncio.to_thread(participant_provider.force_flush)
        await asyncio.to_thread(client_provider.shutdown)
    assert ok.state is SagaState.SUCCEEDED
    assert refused.state is SagaState.COMPENSATED

    roots = {s.attributes["saga.id"]: s for s in receiver.spans if s.name == "saga onboard"}
    assert set(roots) == {"traced", "refused"}
    assert roots["traced"].trace_id != roots["refused"].trace_id
    root = roots["traced"]
    assert root.is_root
    # The saga names its trace, for a link to it (the console's --trace-url {trace_id}).
    assert (ok.trace_id, refused.trace_id) == (root.trace_id, roots["refused"].trace_id)
    assert root.service == "saga-coordinator"
    assert root.start_ns == ns(ok.create_time)
    assert root.end_ns == ns(ok.end_time)
    client_context = checkout.get_span_context()
    assert root.links == ((f"{client_context.trace_id:032x}", f"{client_context.span_id:016x}"),)
    assert [name for name, _, _ in root.events][:2] == ["saga created", "execute ok"]
    assert root.events[-1][2]["saga.state"] == "SUCCEEDED"
    # Each step's success names the event it stands for; a failed attempt names none.
    assert [
        (attributes["saga.step"], attributes.get("saga.event"))
        for name, _, attributes in root.events
        if name.startswith("execute")
    ] == [
        ("create-user", "UserCreated"),
        ("open-account", None),
        ("open-account", "AccountOpened"),
        ("issue-card", "CardIssued"),
        ("subscribe", "SubscriptionCreated"),
    ]

    spans = receiver.of_trace(root.trace_id)
    attempts = [s for s in spans if s.service == "saga-coordinator" and s is not root]
    assert sorted(s.name for s in attempts) == sorted(
        [
            "execute create-user",
            "execute open-account",
            "execute open-account",
            "execute issue-card",
            "execute subscribe",
        ]
    )
    assert all(s.parent_span_id == root.span_id for s in attempts)
    assert all(root.start_ns <= s.start_ns <= s.end_ns <= root.end_ns for s in attempts)
    retried = sorted(
        (s for s in attempts if s.name == "execute open-account"),
        key=lambda s: s.attributes["saga.attempt"],
    )
    assert [s.attributes["saga.outcome"] for s in retried] == ["transient", "ok"]
    assert [s.attributes.get("saga.event") for s in retried] == [None, "AccountOpened"]
    handled = [s for s in spans if s.service == "participants"]
    assert len(handled) == 5
    assert {s.parent_span_id for s in handled} == {s.span_id for s in attempts}
    for span in handled:
        parent = next(a for a in attempts if a.span_id == span.parent_span_id)
        assert span.attributes["saga.attempt"] == parent.attributes["saga.attempt"]
        assert span.attributes["saga.step"] == parent.attributes["saga.step"]

    # The client's own trace holds the CreateSaga call, linked to the saga's trace.
    (create,) = [
        s
        for s in receiver.of_trace(f"{client_context.trace_id:032x}")
        if s.name.endswith("CreateSaga")
    ]
    assert create.parent_span_id == f"{client_context.span_id:016x}"
    assert create.links == ((root.trace_id, root.span_id),)

    refused_spans = receiver.of_trace(roots["refused"].trace_id)
    assert sorted(s.name for s in refused_spans if s.service == "saga-coordinator") == sorted(
        [
            "saga onboard",
            "execute create-user",
            "execute open-account",
            "execute issue-card",
            "compensate issue-card",
            "compensate open-account",
            "compensate create-user",
        ]
    )
    # The card was refused: its event never appears on the trace, and the saga went backwards.
    refused_root = roots["refused"]
    assert [a.get("saga.event") for n, _, a in refused_root.events if n == "execute ok"] == [
        "UserCreated",
        "AccountOpened",
    ]
    assert [a["saga.step"] for n, _, a in refused_root.events if n.startswith("compensate ok")] == [
        "issue-card",
        "open-account",
        "create-user",
    ]


async def test_sigkill_mid_saga_keeps_one_trace_one_root_and_no_orphans(
    tmp_path: Path, receiver: OtlpReceiver, participant_provider: TracerProvider
) -> None:
    participants = sdk_participants(participant_provider, delay=0.3)
    addresses = await serve(participants)
    write_definitions(tmp_path / "definitions", [four_step_definition("onboard")])
    process = CoordinatorProcess.configure(
        tmp_path / "saga.yaml", tmp_path / "saga.db", addresses, otlp_endpoint=receiver.endpoint
    )
    ids = ["k1", "k2", "k3"]
    try:
        await process.start()
        async with AsyncSagaClient(process.target) as client:
            for saga_id in ids:
                await client.create("onboard", {"n": saga_id}, saga_id=saga_id)
        await asyncio.sleep(0.45)  # every saga is inside a 0.3 s call
        process.kill()
        await process.start()
        async with AsyncSagaClient(process.target) as client:
            finals = [await client.wait(saga_id, timeout=30) for saga_id in ids]
        assert await process.stop() == 0
    finally:
        for participant in participants.values():
            await participant.stop(0)
        await asyncio.to_thread(participant_provider.force_flush)

    assert {saga.state for saga in finals} == {SagaState.SUCCEEDED}
    exported = {span.span_id for span in receiver.spans}
    for saga in finals:
        roots = [
            s for s in receiver.spans if s.is_root and s.attributes.get("saga.id") == saga.saga_id
        ]
        assert len(roots) == 1, f"{saga.saga_id}: {len(roots)} root spans"
        root = roots[0]
        assert root.start_ns == ns(saga.create_time)
        spans = receiver.of_trace(root.trace_id)
        assert len(spans) > 5
        for span in spans:
            assert not span.parent_span_id or span.parent_span_id in exported, span
    # Participants received calls in the killed process's time: their spans joined the trace.
    assert len([s for s in receiver.spans if s.service == "participants"]) >= 4 * len(ids)


async def test_metrics_count_sagas_by_outcome_on_prometheus_and_otlp(
    tmp_path: Path, receiver: OtlpReceiver
) -> None:
    scripted = await start_participants(*ACTIONS)
    scripted["cards"].rule = lambda r: (
        reject() if r.action == "IssueCard" and b"refuse" in r.input else None
    )
    scripted["accounts"].rule = lambda r: (
        error(grpc.StatusCode.UNAVAILABLE)
        if r.action == "CloseAccount" and b"stuck" in r.input
        else None
    )
    metrics_port = free_port()
    try:
        async with running_coordinator(
            tmp_path,
            scripted,
            [four_step_definition("onboard")],
            metrics_listen=f"127.0.0.1:{metrics_port}",
            otlp_endpoint=receiver.endpoint,
            metrics_interval=0.2,
        ) as harness:
            inputs = {
                "a": b"{}",
                "b": b"{}",
                "c": b'{"refuse": 1}',
                "d": b'{"refuse": 1, "stuck": 1}',
            }
            for saga_id, payload in inputs.items():
                await harness.create("onboard", payload, saga_id=saga_id)
            for saga_id in inputs:
                await harness.wait(saga_id)
            await asyncio.sleep(1.5)  # the store's summary is read again within a second
            parked_scrape = await asyncio.to_thread(
                lambda: (
                    urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics")
                    .read()
                    .decode()
                )
            )
            await harness.stub.MarkStepCompensated(
                cpb.MarkStepCompensatedRequest(name="sagas/d", reason="closed by hand")
            )
            await harness.wait("d")
            await asyncio.sleep(1.5)
            scraped = await asyncio.to_thread(
                lambda: (
                    urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics")
                    .read()
                    .decode()
                )
            )
            await receiver.wait_for(lambda r: "saga.ended" in r.metric_names())
    finally:
        for participant in scripted.values():
            await participant.stop()

    samples = parse_prometheus(scraped)
    parked = parse_prometheus(parked_scrape)
    ended = {
        labels["saga_outcome"]: value
        for (name, labels), value in samples.items()
        if name == "saga_ended_total" and labels.get("saga_definition") == "onboard"
    }
    # d settled twice: parked, then (once an operator marked its step) compensated.
    assert ended == {"SUCCEEDED": 2.0, "COMPENSATED": 2.0, "NEEDS_ATTENTION": 1.0}
    assert sum(v for (n, _), v in samples.items() if n == "saga_started_total") == 4.0
    assert sum(v for (n, _), v in parked.items() if n == "saga_needs_attention") == 1.0
    assert sum(v for (n, _), v in samples.items() if n == "saga_needs_attention") == 0.0
    assert sum(v for (n, _), v in samples.items() if n == "saga_retries_total") == 2.0
    # c: issue-card, open-account, create-user; d: issue-card, open-account is stuck and
    # marked compensated by hand, then create-user.
    assert sum(v for (n, _), v in samples.items() if n == "saga_compensations_total") == 5.0
    assert {"saga.started", "saga.ended", "saga.step.duration"} <= receiver.metric_names()

    by_step = {
        (labels["saga_definition"], labels["saga_step"]): value
        for (name, labels), value in parked.items()
        if name == "saga_parked"
    }
    assert by_step == {("onboard", "open-account"): 1.0}
    oldest = "saga_oldest_unfinished_age_seconds"
    assert sum(v for (n, _), v in parked.items() if n == oldest) > 1.0
    actions = {
        labels["saga_action"]: value
        for (name, labels), value in samples.items()
        if name == "saga_operator_actions_total"
    }
    assert actions == {"MARK_COMPENSATED": 1.0}
    assert sum(v for (n, _), v in samples.items() if n == "saga_parked") == 0.0
    assert [v for (n, _), v in samples.items() if n == oldest] == [0.0]


def parse_prometheus(text: str) -> dict[tuple[str, Any], float]:
    """Samples of the text exposition format, keyed by (name, labels)."""
    samples: dict[tuple[str, Any], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, rest = head.partition("{")
        labels = {}
        for pair in filter(None, rest.rstrip("}").split(",")):
            key, _, raw = pair.partition("=")
            labels[key] = raw.strip('"')
        samples[(name, _Labels(labels))] = float(value)
    return samples


class _Labels(dict[str, str]):
    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))


async def test_a_collector_that_is_down_does_not_hold_sagas_back(tmp_path: Path) -> None:
    scripted = await start_participants(*ACTIONS)
    closed = f"http://127.0.0.1:{free_port()}"
    try:
        async with running_coordinator(
            tmp_path,
            scripted,
            [four_step_definition("onboard")],
            otlp_endpoint=closed,
            otlp_timeout=0.5,
        ) as harness:
            for index in range(20):
                await harness.create("onboard", saga_id=f"dark-{index}")
            finals = [await harness.wait(f"dark-{index}") for index in range(20)]
    finally:
        for participant in scripted.values():
            await participant.stop()

    # Every saga ended, and stopping (with its final flush to the dead collector) returned.
    assert {saga.state for saga in finals} == {saga_pb2.SAGA_STATE_SUCCEEDED}


@pytest.mark.parametrize("log_payloads", [False, True])
async def test_json_logs_carry_saga_step_and_trace_ids_and_payloads_only_when_asked(
    tmp_path: Path, receiver: OtlpReceiver, log_payloads: bool
) -> None:
    scripted = await start_participants(*ACTIONS)
    scripted["cards"].rule = lambda r: reject("CARD_REFUSED") if r.action == "IssueCard" else None
    write_definitions(tmp_path / "definitions", [four_step_definition("onboard")])
    process = CoordinatorProcess.configure(
        tmp_path / "saga.yaml",
        tmp_path / "saga.db",
        scripted,
        otlp_endpoint=receiver.endpoint,
        log_format="json",
        log_payloads=log_payloads,
    )
    try:
        await process.start()
        async with AsyncSagaClient(process.target) as client:
            await client.create("onboard", {"secret": "hunter2"}, saga_id="logged")
            saga = await client.wait("logged", timeout=30)
        assert await process.stop() == 0
    finally:
        for participant in scripted.values():
            await participant.stop()

    assert saga.state is SagaState.COMPENSATED
    lines = [
        json.loads(line) for line in process.log.read_text().splitlines() if line.startswith("{")
    ]
    about = [line for line in lines if line.get("saga_id") == "logged"]
    assert about
    assert all(len(line["trace_id"]) == 32 for line in about)
    assert len({line["trace_id"] for line in about}) == 1
    rejected = [line for line in about if "CARD_REFUSED" in line["message"]]
    assert rejected
    assert rejected[0]["step"] == "issue-card"
    assert rejected[0]["level"] == "WARNING"
    assert ("hunter2" in process.log.read_text()) is log_payloads
