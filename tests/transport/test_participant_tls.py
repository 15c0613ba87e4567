"""TLS and mTLS from the coordinator to participants: what gets through, and what never does.

Certificates come from a CA made by the tests. A participant the coordinator must not trust
(another CA, expired, another name) is never called: the handshake fails, the call is a
transient error, and the participant's handler count stays at 0.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from saga.v1 import coordinator_service_pb2_grpc as cpb_grpc
from saga.v1 import saga_pb2

from coordinator.config import ConfigError, ParticipantEndpoint, Settings, load_settings
from coordinator.core.calls import ParticipantCall
from coordinator.core.events import Outcome, Succeeded, Transient
from coordinator.core.model import Operation
from coordinator.serve import start_coordinator
from coordinator.transport.participant_gateway import GrpcParticipantGateway
from saga_sdk.participant import CompensateContext, ExecuteContext, Participant
from saga_sdk.tls import ServerTLS
from tests.support.coordinator import FAST_RETRY, Harness, write_definitions
from tests.support.pki import CertificateAuthority, Issued

NODE_SDK = Path(__file__).resolve().parents[2] / "clients" / "node"


@dataclass(frozen=True)
class Pki:
    """The coordinator's CA and what it signed, and a stranger CA."""

    ca: CertificateAuthority
    other_ca: CertificateAuthority
    accounts: Issued
    """The participant's certificate: 127.0.0.1, localhost and accounts.internal."""
    coordinator: Issued
    """The coordinator's client certificate."""
    stranger: Issued
    """A client certificate from the other CA."""


@pytest.fixture(scope="module")
def pki() -> Pki:
    ca, other = CertificateAuthority(), CertificateAuthority("another CA")
    return Pki(
        ca=ca,
        other_ca=other,
        accounts=ca.issue("accounts", dns=("localhost", "accounts.internal"), ips=("127.0.0.1",)),
        coordinator=ca.issue("coordinator", server=False),
        stranger=other.issue("coordinator", server=False),
    )


@dataclass
class Counted:
    """A running participant and the calls its handlers received."""

    port: int
    executed: list[str]
    compensated: list[str]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def handled(self) -> int:
        return len(self.executed) + len(self.compensated)


@asynccontextmanager
async def accounts_participant(tls: ServerTLS | None) -> AsyncIterator[Counted]:
    """A Python SDK participant serving `tls` (plaintext for None), counting handler calls."""
    participant = Participant("accounts")
    counted = Counted(0, [], [])

    @participant.action("OpenAccount")
    def open_account(ctx: ExecuteContext) -> dict[str, str]:
        counted.executed.append(ctx.request_id)
        return {"account": f"acc-{ctx.saga_id}"}

    @participant.compensation("CloseAccount")
    def close_account(ctx: CompensateContext) -> None:
        counted.compensated.append(ctx.request_id)

    counted.port = await participant.start("127.0.0.1:0", tls=tls)
    try:
        yield counted
    finally:
        await participant.stop(0)


def serving(issued: Issued, client_ca: bytes | None = None) -> ServerTLS:
    return ServerTLS(issued.certificate, issued.key, client_ca=client_ca)


def dial(
    address: str, pki: Pki, client: Issued | None = None, server_name: str | None = None
) -> ParticipantEndpoint:
    """TLS to `address`, trusting the tests' CA, presenting `client`'s certificate if any."""
    return ParticipantEndpoint(
        address,
        tls=True,
        root_certificates=pki.ca.pem,
        client_certificate=client.certificate if client else None,
        client_key=client.key if client else None,
        server_name=server_name,
    )


def execute(participant: str = "accounts") -> ParticipantCall:
    return ParticipantCall(
        participant=participant,
        operation=Operation.EXECUTE,
        saga_id="tls-1",
        definition="open",
        definition_version=1,
        step="open-account",
        action="OpenAccount",
        request_id="exec-tls-1",
        attempt=1,
        input=b"{}",
        timeout=timedelta(seconds=5),
        previous_outputs={},
        execute_output=None,
        execute_request_id="exec-tls-1",
    )


async def send(endpoint: ParticipantEndpoint, call: ParticipantCall | None = None) -> Outcome:
    gateway = GrpcParticipantGateway({"accounts": endpoint})
    try:
        return await gateway.send(call or execute())
    finally:
        await gateway.close()


def refused_in_handshake(outcome: Outcome, why: str) -> None:
    assert isinstance(outcome, Transient), outcome
    assert outcome.code == "UNAVAILABLE"
    assert why in outcome.message.lower(), outcome.message


# --- the gateway, dialling a Python SDK participant ----------------------------------------------


async def test_the_gateway_calls_a_participant_whose_certificate_its_ca_signed(pki: Pki) -> None:
    async with accounts_participant(serving(pki.accounts)) as accounts:
        outcome = await send(dial(accounts.address, pki))

    assert isinstance(outcome, Succeeded)
    assert json.loads(outcome.output or b"") == {"account": "acc-tls-1"}
    assert accounts.executed == ["exec-tls-1"]


@pytest.mark.parametrize(
    ("certificate", "why"),
    [
        pytest.param(
            lambda pki: pki.other_ca.issue("accounts", ips=("127.0.0.1",)),
            "unable to get local issuer certificate",
            id="signed-by-another-ca",
        ),
        pytest.param(
            lambda pki: pki.ca.issue("accounts", ips=("127.0.0.1",), expired=True),
            "certificate has expired",
            id="expired",
        ),
        pytest.param(
            lambda pki: pki.ca.issue("billing", dns=("billing.internal",)),
            "hostname verification",
            id="made-out-to-another-name",
        ),
    ],
)
async def test_a_participant_the_coordinator_cannot_trust_is_never_called(
    pki: Pki, certificate: Any, why: str
) -> None:
    async with accounts_participant(serving(certificate(pki))) as accounts:
        outcome = await send(dial(accounts.address, pki))

    refused_in_handshake(outcome, why)
    assert accounts.handled == 0


async def test_server_name_is_the_name_checked_when_it_is_not_the_address_host(pki: Pki) -> None:
    internal = pki.ca.issue("accounts", dns=("accounts.internal",))
    async with accounts_participant(serving(internal)) as accounts:
        by_address = await send(dial(accounts.address, pki))
        by_name = await send(dial(accounts.address, pki, server_name="accounts.internal"))
        by_another_name = await send(dial(accounts.address, pki, server_name="billing.internal"))

    refused_in_handshake(by_address, "hostname verification")
    refused_in_handshake(by_another_name, "hostname verification")
    assert isinstance(by_name, Succeeded)
    assert len(accounts.executed) == 1


async def test_tls_never_falls_back_to_plaintext(pki: Pki) -> None:
    async with accounts_participant(None) as plaintext:
        outcome = await send(dial(plaintext.address, pki))

    assert isinstance(outcome, Transient)
    assert outcome.code == "UNAVAILABLE"
    assert plaintext.handled == 0


async def test_a_participant_requiring_mtls_refuses_callers_without_a_certificate_of_its_ca(
    pki: Pki,
) -> None:
    async with accounts_participant(serving(pki.accounts, client_ca=pki.ca.pem)) as accounts:
        anonymous = await send(dial(accounts.address, pki))
        stranger = await send(dial(accounts.address, pki, pki.stranger))
        handled_before = accounts.handled
        coordinator = await send(dial(accounts.address, pki, pki.coordinator))

    for refused in (anonymous, stranger):
        assert isinstance(refused, Transient), refused
        assert refused.code == "UNAVAILABLE"
    assert handled_before == 0
    assert isinstance(coordinator, Succeeded)
    assert accounts.executed == ["exec-tls-1"]


# --- the configuration -------------------------------------------------------------------------


def write_pki(directory: Path, pki: Pki) -> None:
    pki.ca.write(directory, "ca")
    pki.coordinator.write(directory, "coordinator")


def config_with(tmp_path: Path, accounts: dict[str, Any]) -> Path:
    path = tmp_path / "saga.yaml"
    path.write_text(yaml.safe_dump({"participants": {"accounts": accounts}}))
    return path


async def test_a_configured_participant_is_dialled_with_the_files_the_configuration_names(
    tmp_path: Path, pki: Pki
) -> None:
    write_pki(tmp_path / "pki", pki)
    internal = pki.ca.issue("accounts", dns=("accounts.internal",))
    async with accounts_participant(serving(internal, client_ca=pki.ca.pem)) as accounts:
        config = config_with(
            tmp_path,
            {
                "address": accounts.address,
                "tls": True,
                "root_certificates": "pki/ca.pem",
                "client_certificate": "pki/coordinator.pem",
                "client_key": "pki/coordinator.key",
                "server_name": "accounts.internal",
            },
        )
        settings = load_settings(config)
        outcome = await send(settings.participants["accounts"])

    endpoint = settings.participants["accounts"]
    assert endpoint.client_certificate == pki.coordinator.certificate
    assert endpoint.client_key == pki.coordinator.key
    assert endpoint.server_name == "accounts.internal"
    assert isinstance(outcome, Succeeded)
    assert len(accounts.executed) == 1


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        pytest.param(
            {"tls": True, "client_certificate": "pki/coordinator.pem"},
            "participants.accounts: client_certificate and client_key go together",
            id="certificate-without-key",
        ),
        pytest.param(
            {"tls": True, "client_key": "pki/coordinator.key"},
            "participants.accounts: client_certificate and client_key go together",
            id="key-without-certificate",
        ),
        pytest.param(
            {"root_certificates": "pki/ca.pem"},
            "participants.accounts: root_certificates need tls: true",
            id="roots-without-tls",
        ),
        pytest.param(
            {
                "tls": False,
                "client_certificate": "pki/coordinator.pem",
                "client_key": "pki/coordinator.key",
                "server_name": "accounts.internal",
            },
            "server_name, client_certificate, client_key need tls: true",
            id="mtls-without-tls",
        ),
        pytest.param(
            {"tls": True, "server_name": "not a name"},
            "participants.accounts.server_name: expected a host name",
            id="server-name-not-a-name",
        ),
        pytest.param(
            {"tls": True, "root_certificates": "pki/missing.pem"},
            "participants.accounts.root_certificates: cannot read {tmp}/pki/missing.pem",
            id="roots-missing",
        ),
        pytest.param(
            {
                "tls": True,
                "client_certificate": "pki/coordinator.key",
                "client_key": "pki/coordinator.key",
            },
            "participants.accounts.client_certificate: {tmp}/pki/coordinator.key holds no PEM "
            "certificate",
            id="key-given-as-certificate",
        ),
        pytest.param(
            {
                "tls": True,
                "client_certificate": "pki/coordinator.pem",
                "client_key": "pki/coordinator.pem",
            },
            "participants.accounts.client_key: {tmp}/pki/coordinator.pem holds no PEM "
            "unencrypted private key",
            id="certificate-given-as-key",
        ),
        pytest.param(
            {"tls": True, "client_key_file": "pki/coordinator.key"},
            "participants.accounts: unknown field(s) client_key_file",
            id="unknown-field",
        ),
    ],
)
def test_tls_settings_that_cannot_work_are_configuration_errors(
    tmp_path: Path, pki: Pki, fields: dict[str, Any], error: str
) -> None:
    write_pki(tmp_path / "pki", pki)
    config = config_with(tmp_path, {"address": "127.0.0.1:50062", **fields})

    with pytest.raises(ConfigError) as raised:
        load_settings(config)

    assert error.format(tmp=tmp_path) in str(raised.value)
    assert str(config) in str(raised.value)


def test_an_endpoint_built_in_code_keeps_the_same_rules() -> None:
    with pytest.raises(ValueError, match="root_certificates need tls"):
        ParticipantEndpoint("127.0.0.1:1", root_certificates=b"x")
    with pytest.raises(ValueError, match="client_certificate and client_key go together"):
        ParticipantEndpoint("127.0.0.1:1", tls=True, client_certificate=b"x")


# --- a whole saga, through a coordinator -------------------------------------------------------

OPEN = {
    "name": "open",
    "version": 1,
    "retry": FAST_RETRY,
    "compensation_retry": FAST_RETRY,
    "steps": [
        {
            "name": "open-account",
            "participant": "accounts",
            "action": "OpenAccount",
            "compensation": "CloseAccount",
        }
    ],
}


@asynccontextmanager
async def coordinator_of(directory: Path, accounts: ParticipantEndpoint) -> AsyncIterator[Harness]:
    """An in-process coordinator on a SQLite file, whose `accounts` participant is `accounts`."""
    coordinator = await start_coordinator(
        Settings(
            database=f"sqlite:///{directory / 'saga.db'}",
            listen="127.0.0.1:0",
            definitions=write_definitions(directory / "definitions", [OPEN]),
            participants={"accounts": accounts},
            shutdown_grace=1.0,
        )
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{coordinator.port}")
    try:
        yield Harness(coordinator, cpb_grpc.CoordinatorServiceStub(channel), channel)
    finally:
        await channel.close()
        await coordinator.stop()


async def test_a_saga_runs_through_a_coordinator_to_a_participant_requiring_mtls(
    tmp_path: Path, pki: Pki
) -> None:
    async with accounts_participant(serving(pki.accounts, client_ca=pki.ca.pem)) as accounts:
        endpoint = dial(accounts.address, pki, pki.coordinator)
        async with coordinator_of(tmp_path, endpoint) as harness:
            await harness.create("open", b'{"owner": "ACME"}', saga_id="acme-1")
            saga = await harness.wait("acme-1")

    assert saga.state == saga_pb2.SAGA_STATE_SUCCEEDED
    assert json.loads(saga.steps[0].output) == {"account": "acc-acme-1"}
    assert len(accounts.executed) == 1


async def test_a_saga_whose_participant_another_ca_signed_never_reaches_it(
    tmp_path: Path, pki: Pki
) -> None:
    impostor = pki.other_ca.issue("accounts", ips=("127.0.0.1",))
    async with accounts_participant(serving(impostor, client_ca=pki.ca.pem)) as accounts:
        endpoint = dial(accounts.address, pki, pki.coordinator)
        async with coordinator_of(tmp_path, endpoint) as harness:
            await harness.create("open", b'{"owner": "ACME"}', saga_id="acme-1")
            saga = await harness.wait("acme-1")

    # No answer ever came: the Execute's outcome is unknown, so it is compensated, and the
    # Compensate cannot get through either; the saga waits for an operator.
    assert saga.state == saga_pb2.SAGA_STATE_NEEDS_ATTENTION
    assert saga.failure.code == "UNAVAILABLE"
    assert "unable to get local issuer certificate" in saga.failure.message
    assert accounts.handled == 0


# --- a Node.js participant ---------------------------------------------------------------------

NODE_PARTICIPANT = """
import fs from 'node:fs';
import { Participant } from '%s';

let calls = 0;
const cards = new Participant('cards', { logger: { info() {}, error: console.error } });
cards.action('OpenAccount', () => ({ call: ++calls }));
await cards.serve('127.0.0.1:0', {
  graceMs: 0,
  tls: {
    certChain: fs.readFileSync(process.env.CERT),
    privateKey: fs.readFileSync(process.env.KEY),
    clientCa: fs.readFileSync(process.env.CLIENT_CA),
  },
  onListening: (port) => console.log(`listening ${port}`),
});
"""


@pytest.fixture
def node() -> str:
    found = shutil.which("node")
    if found is None or not (NODE_SDK / "node_modules").is_dir():
        pytest.skip("Node.js and the Node.js SDK's dependencies are needed")
    return found


async def test_a_nodejs_participant_requiring_mtls_answers_only_the_coordinator(
    tmp_path: Path, pki: Pki, node: str
) -> None:
    script = tmp_path / "cards.mjs"
    script.write_text(NODE_PARTICIPANT % (NODE_SDK / "src" / "index.js").as_uri())
    certificate, key = pki.accounts.write(tmp_path, "cards")
    process = await asyncio.create_subprocess_exec(
        node,
        str(script),
        stdout=asyncio.subprocess.PIPE,
        env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "CERT": str(certificate),
            "KEY": str(key),
            "CLIENT_CA": str(pki.ca.write(tmp_path)),
        },
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 20)
        assert line.startswith(b"listening "), line
        address = f"127.0.0.1:{int(line.split()[1])}"

        anonymous = await send(dial(address, pki))
        stranger = await send(dial(address, pki, pki.stranger))
        coordinator = await send(dial(address, pki, pki.coordinator))
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 10)

    for refused in (anonymous, stranger):
        assert isinstance(refused, Transient), refused
        assert refused.code == "UNAVAILABLE"
    # The first call its handler ever saw is the coordinator's.
    assert coordinator == Succeeded(output=b'{"call":1}')
