"""Secrets and payloads stay where they belong: a canary put in a saga's input, a step's output,
the bearer tokens and the TLS and JWT keys never shows in a log line, an error message, an
exported span or a metric of a whole run, refusals included."""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
import yaml
from saga.v1 import coordinator_service_pb2 as cpb
from saga.v1 import coordinator_service_pb2_grpc as cpb_grpc

from coordinator.config import AuthSettings, ServerTls
from coordinator.transport.access import token_digest
from tests.support.coordinator import four_step_definition, running_coordinator
from tests.support.otlp import OtlpReceiver
from tests.support.participants import ScriptedParticipant, ok, reject
from tests.support.pki import CertificateAuthority

CANARY = "CANARY-7f3a91"
TOKEN = f"{CANARY}-token-of-the-orders-service"
WRONG_TOKEN = f"{CANARY}-token-nobody-issued"


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    started = OtlpReceiver()
    started.start()
    yield started
    started.stop()


def pem_body(pem: bytes) -> str:
    """The base64 of a PEM block, the part that would leak."""
    lines = [line for line in pem.decode().splitlines() if line and not line.startswith("-----")]
    return "".join(lines)


async def test_a_canary_in_payloads_tokens_and_keys_never_leaks(
    tmp_path: Path, receiver: OtlpReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ca = CertificateAuthority()
    server = ca.issue("coordinator", dns=("localhost",))
    certificate, key = server.write(tmp_path, "server")
    client = ca.issue("orders-service", server=False)
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(
        yaml.safe_dump(
            {"tokens": [{"name": "orders", "sha256": token_digest(TOKEN), "roles": ["admin"]}]}
        )
    )
    names = ("identity", "accounts", "cards", "billing")
    participants = {name: ScriptedParticipant(name) for name in names}
    participants["accounts"].script("OpenAccount", ok({"iban": f"{CANARY}-iban"}))
    participants["cards"].script("IssueCard", ok({"pan": f"{CANARY}-pan"}), reject())
    for participant in participants.values():
        await participant.start()
    errors: list[str] = []
    try:
        async with running_coordinator(
            tmp_path,
            participants,
            [four_step_definition("onboard")],
            tls=ServerTls(certificate, key, client_ca=ca.write(tmp_path)),
            auth=AuthSettings(tokens=tokens),
            otlp_endpoint=receiver.endpoint,
        ) as harness:
            credentials = grpc.ssl_channel_credentials(ca.pem, client.key, client.certificate)
            async with grpc.aio.secure_channel(
                f"localhost:{harness.coordinator.port}", credentials
            ) as channel:
                stub = cpb_grpc.CoordinatorServiceStub(channel)
                good = (("authorization", f"Bearer {TOKEN}"),)
                for saga_id in ("ok-1", "no-2"):
                    request = cpb.CreateSagaRequest(
                        saga_id=saga_id,
                        definition="onboard",
                        input=f'{{"card_holder": "{CANARY}-holder"}}'.encode(),
                    )
                    await stub.CreateSaga(request, metadata=good, timeout=10)
                    async for _ in stub.WatchSaga(
                        cpb.WatchSagaRequest(name=f"sagas/{saga_id}"), metadata=good, timeout=20
                    ):
                        pass
                # Refusals: a wrong token, an invalid input, a duplicate with another input.
                for metadata, request in [
                    (
                        (("authorization", f"Bearer {WRONG_TOKEN}"),),
                        cpb.CreateSagaRequest(saga_id="x", definition="onboard", input=b"{}"),
                    ),
                    (
                        good,
                        cpb.CreateSagaRequest(
                            saga_id="ok-1", definition="onboard", input=f'"{CANARY}"'.encode()
                        ),
                    ),
                    (
                        good,
                        cpb.CreateSagaRequest(
                            saga_id="bad id", definition="onboard", input=CANARY.encode()
                        ),
                    ),
                ]:
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await stub.CreateSaga(request, metadata=metadata, timeout=10)
                    errors.append(f"{refused.value.code()} {refused.value.details()}")
        await receiver.wait_for(lambda r: len(r.spans) >= 2, timeout=15)
    finally:
        for participant in participants.values():
            await participant.stop()

    assert len(errors) == 3
    secrets = {
        "canary": CANARY,
        "token": TOKEN,
        "the token's base64": base64.b64encode(TOKEN.encode()).decode(),
        "the TLS key": pem_body(server.key)[:40],
        "the client's key": pem_body(client.key)[:40],
    }
    places = {
        "logs": caplog.text,
        "errors": "\n".join(errors),
        "spans": "\n".join(repr(span) for span in receiver.spans),
        "metrics": "\n".join(str(request) for request in receiver.metric_requests),
    }
    leaks = [
        f"{secret} in {place}"
        for secret, value in secrets.items()
        for place, text in places.items()
        if value in text
    ]
    assert leaks == []
    assert "saga.step" in places["spans"] or receiver.spans  # the spans were looked at
