"""A participant serving TLS, and mTLS with `client_ca`: a caller the handshake refuses never
reaches a handler. Certificates come from a CA made by the tests."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from saga.v1 import participant_service_pb2 as pb
from saga.v1 import participant_service_pb2_grpc as pb_grpc

from saga_sdk.participant import ExecuteContext, Participant, ServerTLS
from tests.support.pki import CertificateAuthority, Issued


@dataclass(frozen=True)
class Pki:
    ca: CertificateAuthority
    participant: Issued
    coordinator: Issued
    stranger: Issued
    """A client certificate from another CA."""


@pytest.fixture(scope="module")
def pki() -> Pki:
    ca, other = CertificateAuthority(), CertificateAuthority("another CA")
    return Pki(
        ca=ca,
        participant=ca.issue("cards", dns=("localhost",), ips=("127.0.0.1",)),
        coordinator=ca.issue("coordinator", server=False),
        stranger=other.issue("coordinator", server=False),
    )


@asynccontextmanager
async def cards(tls: ServerTLS | None) -> AsyncIterator[tuple[int, list[str]]]:
    """A participant serving `tls` on a loopback port; yields the port and its handler calls."""
    participant = Participant("cards")
    calls: list[str] = []

    @participant.action("IssueCard")
    def issue_card(ctx: ExecuteContext) -> dict[str, int]:
        calls.append(ctx.request_id)
        return {"call": len(calls)}

    port = await participant.start("127.0.0.1:0", tls=tls)
    try:
        yield port, calls
    finally:
        await participant.stop(0)


async def execute(port: int, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    """One Execute; the status code it ends with."""
    address = f"127.0.0.1:{port}"
    channel = (
        grpc.aio.insecure_channel(address)
        if credentials is None
        else grpc.aio.secure_channel(address, credentials)
    )
    request = pb.ExecuteRequest(saga="sagas/s-1", step="card", action="IssueCard", request_id="r")
    try:
        await pb_grpc.ParticipantServiceStub(channel).Execute(request, timeout=10)
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as error:
        return error.code()
    finally:
        await channel.close()


def trusting(pki: Pki, client: Issued | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        pki.ca.pem,
        private_key=client.key if client else None,
        certificate_chain=client.certificate if client else None,
    )


async def test_a_participant_serving_tls_answers_a_caller_that_trusts_its_ca(pki: Pki) -> None:
    async with cards(ServerTLS(pki.participant.certificate, pki.participant.key)) as (port, calls):
        assert await execute(port, trusting(pki)) is grpc.StatusCode.OK
        assert await execute(port, None) is grpc.StatusCode.UNAVAILABLE

    assert calls == ["r"]


async def test_with_client_ca_only_callers_with_a_certificate_from_it_reach_a_handler(
    pki: Pki,
) -> None:
    tls = ServerTLS(pki.participant.certificate, pki.participant.key, client_ca=pki.ca.pem)
    async with cards(tls) as (port, calls):
        anonymous = await execute(port, trusting(pki))
        stranger = await execute(port, trusting(pki, pki.stranger))
        refused_calls = len(calls)
        coordinator = await execute(port, trusting(pki, pki.coordinator))

    assert anonymous is grpc.StatusCode.UNAVAILABLE
    assert stranger is grpc.StatusCode.UNAVAILABLE
    assert refused_calls == 0
    assert coordinator is grpc.StatusCode.OK
    assert calls == ["r"]


def test_server_tls_reads_pem_files_and_names_the_one_that_is_wrong(
    tmp_path: Path, pki: Pki
) -> None:
    certificate, key = pki.participant.write(tmp_path, "cards")
    ca = pki.ca.write(tmp_path)

    tls = ServerTLS.from_files(certificate, key, client_ca=ca)

    assert tls == ServerTLS(pki.participant.certificate, pki.participant.key, pki.ca.pem)
    assert tls.requires_client_certificate
    assert "PRIVATE KEY" not in repr(tls)
    with pytest.raises(ValueError, match=rf"certificate_chain holds no PEM certificate \({key}\)"):
        ServerTLS.from_files(key, key)
    with pytest.raises(ValueError, match=rf"private_key holds no .*private key \({certificate}\)"):
        ServerTLS.from_files(certificate, certificate)
    with pytest.raises(ValueError, match=rf"client_ca: cannot read {tmp_path / 'nope.pem'}"):
        ServerTLS.from_files(certificate, key, client_ca=tmp_path / "nope.pem")


async def test_tls_and_credentials_cannot_both_be_given(pki: Pki) -> None:
    participant = Participant("cards")
    tls = ServerTLS(pki.participant.certificate, pki.participant.key)

    with pytest.raises(ValueError, match="tls or credentials, not both"):
        await participant.start(tls=tls, credentials=tls.credentials())


async def test_plaintext_beyond_loopback_is_served_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    participant = Participant("cards")
    with caplog.at_level(logging.WARNING, logger="saga_sdk.participant"):
        await participant.start("127.0.0.1:0")
        await participant.stop(0)
        assert caplog.records == []
        await participant.start("0.0.0.0:0")
        await participant.stop(0)

    (warning,) = caplog.records
    assert "serves plaintext on 0.0.0.0:0" in warning.getMessage()
