"""The Python SDK against a real coordinator that requires mTLS and bearer tokens: with the right
settings every call works, streams and reopened feeds included; without them the coordinator
refuses, and the token never shows in what the SDK raises or prints."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest
import yaml

from coordinator.config import AuthSettings, ServerTls
from coordinator.transport.access import token_digest
from saga_sdk import (
    AsyncSagaClient,
    ClientTLS,
    PermissionDenied,
    SagaChange,
    SagaClient,
    SagaRpcError,
    SagaState,
    Unauthenticated,
    Unavailable,
)
from tests.support.coordinator import Harness, four_step_definition, running_coordinator
from tests.support.participants import ScriptedParticipant
from tests.support.pki import CertificateAuthority

ADMIN = "admin-token-4f1c9e2a7b"
VIEWER = "viewer-token-8d3b6a0c5e"
STRANGER = "not-a-token-anyone-knows-1234"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server: tuple[Path, Path]
    client: tuple[Path, Path]

    def tls(self, server_name: str | None = None) -> ClientTLS:
        certificate, key = self.client
        return ClientTLS.from_files(
            ca=self.ca, certificate=certificate, key=key, server_name=server_name
        )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority()
    server = ca.issue("coordinator", dns=("localhost", "coordinator.internal"))
    return Pki(
        ca.write(directory),
        server.write(directory, "server"),
        ca.issue("orders-service", server=False).write(directory, "client"),
    )


def tokens_file(directory: Path) -> Path:
    path = directory / "tokens.yaml"
    entries = [
        {"name": "platform", "sha256": token_digest(ADMIN), "roles": ["admin"]},
        {"name": "dashboard", "sha256": token_digest(VIEWER), "roles": ["viewer"]},
    ]
    path.write_text(yaml.safe_dump({"tokens": entries}))
    return path


@pytest.fixture
async def secured(
    tmp_path: Path, pki: Pki, participants: dict[str, ScriptedParticipant]
) -> AsyncIterator[Harness]:
    async with running_coordinator(
        tmp_path,
        participants,
        [four_step_definition("onboard")],
        tls=ServerTls(*pki.server, client_ca=pki.ca),
        auth=AuthSettings(tokens=tokens_file(tmp_path)),
    ) as harness:
        yield harness


def target(harness: Harness, host: str = "localhost") -> str:
    return f"{host}:{harness.coordinator.port}"


def calls(participants: dict[str, ScriptedParticipant]) -> int:
    return sum(len(p.calls()) for p in participants.values())


async def sagas_stored(harness: Harness, pki: Pki) -> int:
    async with AsyncSagaClient(target(harness), tls=pki.tls(), token=ADMIN) as client:
        return (await client.count()).total


async def test_the_blocking_client_creates_watches_reads_and_follows_over_mtls_with_a_token(
    secured: Harness, pki: Pki
) -> None:
    def session() -> tuple[bool, list[SagaState], SagaState, list[str], list[str], int]:
        with SagaClient(target(secured), tls=pki.tls(), token=ADMIN, timeout=10) as client:
            created = client.create("onboard", {"company": "ACME"}, saga_id="acme")
            watched = [update.saga.state for update in client.watch("acme")]
            saga = client.get("acme")
            fed = [change.saga_id for change in client.changes(follow=False)]
            listed = [saga.saga_id for saga in client.list()]
            events = len(list(client.events("acme")))
        return created.created, watched, saga.state, fed, listed, events

    created, watched, state, fed, listed, events = await asyncio.to_thread(session)

    assert created
    assert watched[-1] is SagaState.SUCCEEDED
    assert state is SagaState.SUCCEEDED
    assert set(fed) == {"acme"}
    assert len(fed) == events
    assert listed == ["acme"]


async def test_the_async_client_runs_a_saga_with_a_token_from_a_coroutine(
    secured: Harness, pki: Pki
) -> None:
    asked = 0

    async def token() -> str:
        nonlocal asked
        asked += 1
        return ADMIN

    async with AsyncSagaClient(target(secured), tls=pki.tls(), token=token) as client:
        await client.create("onboard", {"company": "ACME"}, saga_id="acme")
        saga = await client.wait("acme", timeout=20)
        changes = [change async for change in client.changes(follow=False)]

    assert saga.state is SagaState.SUCCEEDED
    assert changes[-1].state is SagaState.SUCCEEDED
    assert asked == 3


async def test_a_reopened_change_feed_asks_for_a_fresh_token(
    tmp_path: Path, pki: Pki, participants: dict[str, ScriptedParticipant]
) -> None:
    asked = 0

    def token() -> str:
        nonlocal asked
        asked += 1
        return ADMIN

    async with (
        running_coordinator(
            tmp_path,
            participants,
            [four_step_definition("onboard")],
            tls=ServerTls(*pki.server, client_ca=pki.ca),
            auth=AuthSettings(tokens=tokens_file(tmp_path)),
            max_streams_per_caller=1,
        ) as harness,
        AsyncSagaClient(target(harness), tls=pki.tls(), token=token) as client,
    ):
        await client.create("onboard", saga_id="acme")
        # Async generators, to close them at once; holder holds the one stream allowed.
        holder = cast(AsyncGenerator[SagaChange, None], client.changes())
        await anext(holder)
        before = asked

        follower = cast(AsyncGenerator[SagaChange, None], client.changes())
        first = asyncio.ensure_future(anext(follower))
        await asyncio.sleep(0.5)
        assert not first.done()  # refused (RESOURCE_EXHAUSTED): waits, and opens it again
        await holder.aclose()
        change = await asyncio.wait_for(first, 10)
        await follower.aclose()

    assert change.saga_id == "acme"
    assert asked - before >= 2  # every attempt to open the feed asked for the token


async def test_without_a_token_every_call_is_unauthenticated_and_nothing_happens(
    secured: Harness, pki: Pki, participants: dict[str, ScriptedParticipant]
) -> None:
    async with AsyncSagaClient(target(secured), tls=pki.tls()) as client:
        with pytest.raises(Unauthenticated, match="needs a bearer token"):
            await client.create("onboard", saga_id="acme")
        with pytest.raises(Unauthenticated):
            await client.get("acme")
        with pytest.raises(Unauthenticated):
            await anext(client.changes())

    assert await sagas_stored(secured, pki) == 0
    assert calls(participants) == 0


async def test_an_unknown_token_or_a_role_that_does_not_allow_the_call_is_refused_unshown(
    secured: Harness, pki: Pki, participants: dict[str, ScriptedParticipant]
) -> None:
    shown: list[str] = []
    for token, refusal in [(STRANGER, Unauthenticated), (VIEWER, PermissionDenied)]:
        client = SagaClient(target(secured), tls=pki.tls(), token=token, timeout=10)
        with client, pytest.raises(refusal) as refused:
            await asyncio.to_thread(client.create, "onboard", saga_id="acme")
        error: SagaRpcError = refused.value
        shown += [str(error), repr(error), error.message, repr(client), str(error.metadata)]
    assert "needs the client role" in shown[5]
    assert not [text for text in shown if STRANGER in text or VIEWER in text]
    assert await sagas_stored(secured, pki) == 0
    assert calls(participants) == 0


async def test_without_the_client_certificate_the_handshake_fails(
    secured: Harness, pki: Pki, participants: dict[str, ScriptedParticipant]
) -> None:
    only_the_ca = ClientTLS.from_files(ca=pki.ca)
    async with AsyncSagaClient(target(secured), tls=only_the_ca, token=ADMIN) as client:
        with pytest.raises(Unavailable):
            await client.create("onboard", saga_id="acme")
    async with AsyncSagaClient(target(secured), token=ADMIN) as plaintext:
        with pytest.raises(Unavailable):
            await plaintext.get("acme")

    assert await sagas_stored(secured, pki) == 0
    assert calls(participants) == 0


async def test_server_name_checks_the_certificate_when_the_target_names_an_address(
    secured: Harness, pki: Pki
) -> None:
    address = target(secured, "127.0.0.1")
    async with AsyncSagaClient(address, tls=pki.tls("coordinator.internal"), token=ADMIN) as client:
        assert (await client.count()).total == 0
    async with AsyncSagaClient(address, tls=pki.tls("payments.internal"), token=ADMIN) as client:
        with pytest.raises(Unavailable):
            await client.count()


async def test_from_environment_connects_with_variables_or_the_config_file(
    secured: Harness, pki: Pki, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text(ADMIN + "\n")
    certificate, key = pki.client
    variables = {
        "HOME": str(tmp_path),  # no config file there
        "SAGA_TARGET": target(secured),
        "SAGA_TLS_CA": str(pki.ca),
        "SAGA_TLS_CERT": str(certificate),
        "SAGA_TLS_KEY": str(key),
        "SAGA_TOKEN_FILE": str(token),
    }
    config = tmp_path / "client.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "target": target(secured, "127.0.0.1"),
                "tls": {
                    "ca": str(pki.ca),
                    "certificate": str(certificate),
                    "key": str(key),
                    "server_name": "coordinator.internal",
                },
                "token_file": "token",  # beside the config file
            }
        )
    )
    from_file = {"HOME": str(tmp_path), "SAGA_CLIENT_CONFIG": str(config)}

    def created(environ: dict[str, str], saga_id: str) -> bool:
        with SagaClient.from_environment(environ, timeout=10) as client:
            return client.create("onboard", saga_id=saga_id).created

    assert await asyncio.to_thread(created, variables, "from-variables")
    assert await asyncio.to_thread(created, from_file, "from-the-file")
    async with AsyncSagaClient.from_environment(from_file) as client:
        assert (await client.count()).total == 2
