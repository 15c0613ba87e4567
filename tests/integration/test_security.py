"""The coordinator's port secured: TLS and mTLS with a CA made by the tests, bearer tokens (a
file of static tokens, HMAC and public-key JWTs) with roles and definitions, and limits.

Every refusal is checked the same way: the right status, the participant's handler never
called, and nothing stored.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import socket
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import jwt
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from saga.v1 import coordinator_service_pb2 as cpb
from saga.v1 import coordinator_service_pb2_grpc as cpb_grpc

from coordinator.config import AuthSettings, ConfigError, JwtSettings, ServerTls, load_settings
from coordinator.transport.access import token_digest
from tests.support.coordinator import Harness, four_step_definition, running_coordinator
from tests.support.participants import ScriptedParticipant, ok
from tests.support.pki import CertificateAuthority, Issued

NAMES = ("identity", "accounts", "cards", "billing")
SECRET = b"an HMAC secret that is long enough to be one, 40+ bytes"
TOKENS = {
    "viewer-token-0001": ("dashboard", ["viewer"], None),
    "client-token-0002": ("orders-service", ["client"], ["onboard"]),
    "operator-token-03": ("ana", ["operator"], None),
    "admin-token-00004": ("platform", ["admin"], None),
}


@dataclass
class Pki:
    directory: Path
    ca: CertificateAuthority
    ca_file: Path
    server: tuple[Path, Path]
    client: Issued
    other_client: Issued
    expired_client: Issued
    stranger: Issued
    """Signed by the right CA, but not on the allowlist."""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority()
    other = CertificateAuthority("another CA")
    server = ca.issue("coordinator", dns=("localhost", "coordinator.internal"), ips=("127.0.0.1",))
    return Pki(
        directory,
        ca,
        ca.write(directory),
        server.write(directory, "server"),
        ca.issue("orders-service", server=False),
        other.issue("orders-service", server=False),
        ca.issue("orders-service", server=False, expired=True),
        ca.issue("mallory", server=False),
    )


@pytest.fixture
async def participants() -> AsyncIterator[dict[str, ScriptedParticipant]]:
    started = {name: ScriptedParticipant(name) for name in NAMES}
    for participant in started.values():
        await participant.start()
    yield started
    for participant in started.values():
        await participant.stop()


def calls(participants: dict[str, ScriptedParticipant]) -> int:
    return sum(len(p.calls()) for p in participants.values())


def credentials(pki: Pki, client: Issued | None) -> grpc.ChannelCredentials:
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=pki.ca.pem)
    return grpc.ssl_channel_credentials(pki.ca.pem, client.key, client.certificate)


def secure_stub(
    harness: Harness, pki: Pki, client: Issued | None, name: str = "localhost"
) -> tuple[grpc.aio.Channel, cpb_grpc.CoordinatorServiceAsyncStub]:
    options = [("grpc.ssl_target_name_override", name)] if name != "localhost" else []
    channel = grpc.aio.secure_channel(
        f"localhost:{harness.coordinator.port}", credentials(pki, client), options=options
    )
    return channel, cpb_grpc.CoordinatorServiceStub(channel)


def create_request(saga_id: str = "s-1", definition: str = "onboard") -> cpb.CreateSagaRequest:
    return cpb.CreateSagaRequest(saga_id=saga_id, definition=definition, input=b"{}")


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def reason_of(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""


# --- TLS and mTLS ------------------------------------------------------------------------------


@pytest.fixture
async def mtls(
    tmp_path: Path, pki: Pki, participants: dict[str, ScriptedParticipant]
) -> AsyncIterator[Harness]:
    tls = ServerTls(*pki.server, client_ca=pki.ca_file, allowed_clients=("CN=orders-service",))
    async with running_coordinator(
        tmp_path, participants, [four_step_definition("onboard")], tls=tls
    ) as harness:
        yield harness


async def test_a_client_with_the_cas_certificate_runs_a_saga_over_mtls(
    mtls: Harness, pki: Pki, participants: dict[str, ScriptedParticipant]
) -> None:
    channel, stub = secure_stub(mtls, pki, pki.client)
    async with channel:
        created = await stub.CreateSaga(create_request(), timeout=10)
        assert created.created
        async for update in stub.WatchSaga(cpb.WatchSagaRequest(name="sagas/s-1"), timeout=20):
            last = update.saga
    assert last.state == 3  # SUCCEEDED
    assert calls(participants) == 4


@pytest.mark.parametrize("who", ["no certificate", "another CA", "expired", "plaintext"])
async def test_a_client_without_a_valid_certificate_is_refused_in_the_handshake(
    mtls: Harness, pki: Pki, participants: dict[str, ScriptedParticipant], who: str
) -> None:
    client = {
        "no certificate": None,
        "another CA": pki.other_client,
        "expired": pki.expired_client,
    }.get(who)
    if who == "plaintext":
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{mtls.coordinator.port}")
        stub = cpb_grpc.CoordinatorServiceStub(channel)
    else:
        channel, stub = secure_stub(mtls, pki, client)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CreateSaga(create_request(), timeout=5)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    await assert_nothing_happened(mtls, pki, participants)


async def test_a_server_whose_certificate_names_another_host_is_refused_by_the_client(
    mtls: Harness, pki: Pki, participants: dict[str, ScriptedParticipant]
) -> None:
    channel, stub = secure_stub(mtls, pki, pki.client, name="payments.internal")
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CreateSaga(create_request(), timeout=5)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    await assert_nothing_happened(mtls, pki, participants)


async def test_a_certificate_of_the_ca_that_is_not_on_the_allowlist_is_denied(
    mtls: Harness, pki: Pki, participants: dict[str, ScriptedParticipant]
) -> None:
    channel, stub = secure_stub(mtls, pki, pki.stranger)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CreateSaga(create_request(), timeout=5)
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "CN=mallory" in (refused.value.details() or "")
    await assert_nothing_happened(mtls, pki, participants)


async def assert_nothing_happened(
    harness: Harness, pki: Pki, participants: dict[str, ScriptedParticipant]
) -> None:
    channel, stub = secure_stub(harness, pki, pki.client)
    async with channel:
        counted = await stub.CountSagas(cpb.CountSagasRequest(), timeout=5)
    assert counted.total == 0
    assert calls(participants) == 0


def served_certificate(port: int, pki: Pki) -> str:
    """The common name of the certificate the server presents in a new handshake."""
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    client = pki.directory / "probe"
    context.load_cert_chain(*pki.client.write(client, "client"))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        certificate: Any = tls.getpeercert()
    subject = {key: value for ((key, value),) in certificate["subject"]}
    return str(subject["commonName"])


async def test_a_renewed_certificate_is_served_without_a_restart(
    tmp_path: Path, pki: Pki, participants: dict[str, ScriptedParticipant]
) -> None:
    certificate, key = pki.ca.issue("coordinator", dns=("localhost",)).write(tmp_path, "live")
    tls = ServerTls(certificate, key, client_ca=pki.ca_file)
    async with running_coordinator(
        tmp_path, participants, [four_step_definition("onboard")], tls=tls
    ) as harness:
        port = harness.coordinator.port
        assert await asyncio.to_thread(served_certificate, port, pki) == "coordinator"

        renewed = pki.ca.issue("coordinator-renewed", dns=("localhost",))
        time.sleep(0.01)  # a new modification time
        renewed.write(tmp_path, "live")

        assert await asyncio.to_thread(served_certificate, port, pki) == "coordinator-renewed"
        channel, stub = secure_stub(harness, pki, pki.client)
        async with channel:
            assert (await stub.CreateSaga(create_request(), timeout=10)).created


# --- bearer tokens -----------------------------------------------------------------------------


def tokens_file(directory: Path) -> Path:
    path = directory / "tokens.yaml"
    entries = []
    for token, (name, roles, definitions) in TOKENS.items():
        entry = {"name": name, "sha256": token_digest(token), "roles": roles}
        if definitions is not None:
            entry["definitions"] = definitions
        entries.append(entry)
    path.write_text(yaml.safe_dump({"tokens": entries}))
    return path


@dataclass
class Signer:
    private_key: ec.EllipticCurvePrivateKey
    public_file: Path

    def token(
        self, subject: str, roles: list[str], expires_in: float = 300, **extra: object
    ) -> str:
        claims = {"sub": subject, "roles": roles, "exp": int(time.time() + expires_in), **extra}
        return jwt.encode(claims, self.private_key, algorithm="ES256")


def hs256_signed_with(claims: dict[str, object], secret: bytes) -> str:
    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = part(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = part(json.dumps(claims).encode())
    signature = hmac.new(secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{part(signature)}"


@pytest.fixture
def signer(tmp_path: Path) -> Signer:
    key = ec.generate_private_key(ec.SECP256R1())
    public = tmp_path / "issuer.pub.pem"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return Signer(key, public)


@pytest.fixture
async def guarded(
    tmp_path: Path, signer: Signer, participants: dict[str, ScriptedParticipant]
) -> AsyncIterator[Harness]:
    auth = AuthSettings(
        tokens=tokens_file(tmp_path),
        jwt=JwtSettings(signer.public_file, ("ES256",), audience="sagas"),
    )
    async with running_coordinator(
        tmp_path,
        participants,
        [four_step_definition("onboard"), four_step_definition("offboard")],
        auth=auth,
        max_streams_per_caller=2,
        create_rate_per_caller=2.0,
        create_burst_per_caller=3,
    ) as harness:
        yield harness


async def counted(harness: Harness) -> int:
    answer = await harness.stub.CountSagas(
        cpb.CountSagasRequest(), metadata=bearer("admin-token-00004"), timeout=5
    )
    return answer.total


async def refused_with(
    harness: Harness, request: object, metadata: object, method: str = "CreateSaga"
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await getattr(harness.stub, method)(request, metadata=metadata, timeout=5)
    return refused.value


@pytest.mark.parametrize(
    ("metadata", "words"),
    [
        ((), "needs a bearer token"),
        ((("authorization", "Basic b3JkZXJzOnNlY3JldA=="),), "is not 'Bearer <token>'"),
        (bearer("not-a-token-anyone-knows"), "not one this coordinator knows"),
        (bearer("eyJhbGciOi.not-base64.at-all"), "is not valid"),
    ],
)
async def test_a_missing_or_unknown_token_is_unauthenticated(
    guarded: Harness,
    participants: dict[str, ScriptedParticipant],
    metadata: object,
    words: str,
) -> None:
    error = await refused_with(guarded, create_request(), metadata)

    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert words in (error.details() or "")
    assert reason_of(error) == "UNAUTHENTICATED"
    assert calls(participants) == 0
    assert await counted(guarded) == 0


async def test_an_expired_or_badly_signed_jwt_is_unauthenticated(
    guarded: Harness, signer: Signer, participants: dict[str, ScriptedParticipant]
) -> None:
    expired = signer.token("orders", ["client"], expires_in=-120, aud="sagas")
    forged_key = ec.generate_private_key(ec.SECP256R1())
    forged = jwt.encode(
        {"sub": "orders", "roles": ["admin"], "exp": int(time.time()) + 300, "aud": "sagas"},
        forged_key,
        algorithm="ES256",
    )
    wrong_audience = signer.token("orders", ["client"], aud="billing")
    hmac_confusion = hs256_signed_with(  # the old trick: the public key as an HMAC secret
        {"sub": "orders", "roles": ["admin"], "exp": int(time.time()) + 300, "aud": "sagas"},
        signer.public_file.read_bytes(),
    )

    for token, words in [
        (expired, "has expired"),
        (forged, "signature is not valid"),
        (wrong_audience, "is not valid"),
        (hmac_confusion, "is not valid"),
    ]:
        error = await refused_with(guarded, create_request(), bearer(token))
        assert error.code() is grpc.StatusCode.UNAUTHENTICATED, token
        assert words in (error.details() or ""), (words, error.details())
        assert token not in (error.details() or "")
    assert calls(participants) == 0
    assert await counted(guarded) == 0


async def test_a_role_that_does_not_allow_the_call_is_denied(
    guarded: Harness, signer: Signer, participants: dict[str, ScriptedParticipant]
) -> None:
    viewer_jwt = signer.token("grafana", ["viewer"], aud="sagas")
    cases = [
        (bearer("viewer-token-0001"), create_request(), "CreateSaga", "needs the client role"),
        (bearer(viewer_jwt), create_request(), "CreateSaga", "needs the client role"),
        (
            bearer("client-token-0002"),
            create_request(definition="offboard"),
            "CreateSaga",
            "may not use sagas of definition 'offboard'",
        ),
        (
            bearer("client-token-0002"),
            cpb.PruneSagasRequest(older_than=Duration(seconds=60)),
            "PruneSagas",
            "needs the admin role",
        ),
        (
            bearer("operator-token-03"),
            cpb.RegisterDefinitionRequest(),
            "RegisterDefinition",
            "needs the admin role",
        ),
        (
            bearer("client-token-0002"),
            cpb.ListSagasRequest(),
            "ListSagas",
            "name one of onboard in 'definition'",
        ),
    ]
    for metadata, request, method, words in cases:
        error = await refused_with(guarded, request, metadata, method)
        assert error.code() is grpc.StatusCode.PERMISSION_DENIED, (method, error.details())
        assert words in (error.details() or ""), (words, error.details())
    assert calls(participants) == 0
    assert await counted(guarded) == 0


async def test_allowed_callers_work_and_the_audit_names_the_authenticated_caller(
    guarded: Harness, signer: Signer, participants: dict[str, ScriptedParticipant]
) -> None:
    participants["accounts"].script("OpenAccount", ok(delay=5.0))
    orders = bearer("client-token-0002")
    await guarded.stub.CreateSaga(create_request("s-1"), metadata=orders, timeout=5)
    listed = await guarded.stub.ListSagas(
        cpb.ListSagasRequest(definition="onboard"), metadata=orders, timeout=5
    )
    assert [s.saga_id for s in listed.sagas] == ["s-1"]
    operator = bearer(signer.token("ana@example.com", ["operator"], aud="sagas"))

    cancelled = await guarded.stub.CancelSaga(
        cpb.CancelSagaRequest(name="sagas/s-1", reason="customer asked", actor="mallory"),
        metadata=operator,
        timeout=10,
    )

    assert [(entry.actor, entry.reason) for entry in cancelled.saga.audit] == [
        ("ana@example.com", "customer asked")
    ]


async def test_creations_over_the_rate_are_refused_with_a_retry_delay(
    guarded: Harness, participants: dict[str, ScriptedParticipant]
) -> None:
    orders = bearer("client-token-0002")
    for index in range(3):  # the burst
        await guarded.stub.CreateSaga(create_request(f"s-{index}"), metadata=orders, timeout=5)

    error = await refused_with(guarded, create_request("s-3"), orders)

    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(error)
    assert status is not None
    retry = error_details_pb2.RetryInfo()
    assert any(detail.Unpack(retry) for detail in status.details)
    delay = retry.retry_delay.ToTimedelta()
    assert timedelta(0) < delay <= timedelta(seconds=0.5)
    assert await counted(guarded) == 3
    # Another caller has its own bucket.
    await guarded.stub.CreateSaga(
        create_request("s-9"), metadata=bearer("admin-token-00004"), timeout=5
    )


async def test_a_caller_may_hold_only_so_many_streams_open(guarded: Harness) -> None:
    await guarded.stub.CreateSaga(  # something for the feeds to send
        create_request(), metadata=bearer("admin-token-00004"), timeout=5
    )
    viewer = bearer("viewer-token-0001")
    first = guarded.stub.WatchChanges(cpb.WatchChangesRequest(), metadata=viewer)
    second = guarded.stub.WatchChanges(cpb.WatchChangesRequest(), metadata=viewer)
    await first.read()
    await second.read()

    third = guarded.stub.WatchChanges(cpb.WatchChangesRequest(), metadata=viewer)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await third.read()

    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    first.cancel()
    await asyncio.sleep(0.2)
    fourth = guarded.stub.WatchChanges(cpb.WatchChangesRequest(), metadata=viewer)
    await fourth.read()  # one was closed: there is room again
    second.cancel()
    fourth.cancel()


# --- reflection and plaintext ------------------------------------------------------------------


async def reflected(port: int) -> list[str]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        async for response in responses:
            return sorted(s.name for s in response.list_services_response.service)
    return []


async def test_reflection_lists_only_the_services_served_and_can_be_turned_off(
    tmp_path: Path, participants: dict[str, ScriptedParticipant]
) -> None:
    definitions = [four_step_definition("onboard")]
    async with running_coordinator(tmp_path / "on", participants, definitions) as harness:
        assert await reflected(harness.coordinator.port) == [
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
            "saga.v1.CoordinatorService",
        ]
    async with running_coordinator(
        tmp_path / "off", participants, definitions, reflection=False
    ) as harness:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await reflected(harness.coordinator.port)
        assert refused.value.code() is grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ("listen: 0.0.0.0:50051\n", "listen: 0.0.0.0:50051 is not a loopback address"),
        ("listen: 10.1.2.3:50051\n", "--insecure-plaintext"),
        ("metrics_listen: 0.0.0.0:9464\n", "metrics_listen: 0.0.0.0:9464 is not a loopback"),
    ],
)
def test_plaintext_is_refused_off_loopback_unless_asked_for(
    tmp_path: Path, settings: str, words: str
) -> None:
    config = tmp_path / "saga.yaml"
    config.write_text(settings)
    with pytest.raises(ConfigError, match=words):
        load_settings(config)

    config.write_text(settings + "insecure_plaintext: true\n")
    assert load_settings(config).insecure_plaintext
    for loopback in ("127.0.0.1:50051", "[::1]:50051", "localhost:50051"):
        config.write_text(f"listen: '{loopback}'\n")
        assert load_settings(config).listen == loopback


async def test_a_private_key_readable_by_others_is_warned_about_at_start(
    tmp_path: Path,
    pki: Pki,
    participants: dict[str, ScriptedParticipant],
    caplog: pytest.LogCaptureFixture,
) -> None:
    certificate, key = pki.ca.issue("coordinator", dns=("localhost",)).write(tmp_path, "open")
    key.chmod(0o644)
    client_certificate, client_key = pki.ca.issue("coordinator", server=False).write(
        tmp_path, "client"
    )
    client_key.chmod(0o640)
    config = tmp_path / "saga.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "participants": {
                    "accounts": {
                        "address": "127.0.0.1:50062",
                        "tls": True,
                        "client_certificate": str(client_certificate),
                        "client_key": str(client_key),
                    }
                }
            }
        )
    )

    load_settings(config)
    async with running_coordinator(
        tmp_path, participants, [four_step_definition("onboard")], tls=ServerTls(certificate, key)
    ):
        pass

    warned = [r.getMessage() for r in caplog.records if "can be read by others" in r.getMessage()]
    assert [str(key) in line for line in warned] == [False, True]
    assert "(mode 640)" in warned[0]
    assert "(mode 644)" in warned[1]


async def test_a_nul_character_in_a_label_reason_or_actor_is_refused_as_invalid(
    tmp_path: Path, participants: dict[str, ScriptedParticipant]
) -> None:
    async with running_coordinator(
        tmp_path, participants, [four_step_definition("onboard")]
    ) as harness:
        with pytest.raises(grpc.aio.AioRpcError) as labelled:
            await harness.stub.CreateSaga(
                cpb.CreateSagaRequest(
                    saga_id="s-1", definition="onboard", input=b"{}", labels={"t": "a\x00b"}
                ),
                timeout=5,
            )
        participants["accounts"].script("OpenAccount", ok(delay=5.0))
        await harness.stub.CreateSaga(create_request("s-2"), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as cancelled:
            await harness.stub.CancelSaga(
                cpb.CancelSagaRequest(name="sagas/s-2", reason="x\x00y", actor="a\x00"),
                timeout=5,
            )

        assert labelled.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert cancelled.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        counted = await harness.stub.CountSagas(cpb.CountSagasRequest(), timeout=5)
        assert counted.total == 1
