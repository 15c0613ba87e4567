"""The Node.js client against a real coordinator that requires mTLS and bearer tokens, configured
by the same environment variables as the Python SDK and the ``saga`` command."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from coordinator.config import AuthSettings, ServerTls
from coordinator.transport.access import token_digest
from tests.support.coordinator import Harness, four_step_definition, running_coordinator
from tests.support.participants import ScriptedParticipant
from tests.support.pki import CertificateAuthority

NODE = shutil.which("node")
SDK = Path(__file__).resolve().parents[2] / "clients" / "node" / "src" / "index.js"
TOKEN = "orders-token-5e2f7a9c1d"

pytestmark = pytest.mark.skipif(NODE is None, reason="node (Node.js >= 20.6) is not on PATH")

SCRIPT = f"""
import {{ SagaClient }} from {json.dumps(SDK.as_uri())};

const client = SagaClient.fromEnvironment({{ timeoutMs: 10_000 }});
try {{
  const {{ saga }} = await client.create('onboard', {{}}, {{ sagaId: 'from-node' }});
  const done = await client.wait(saga.sagaId, {{ timeoutMs: 20_000 }});
  const changes = [];
  for await (const change of client.changes({{ follow: false }})) changes.push(change.state);
  console.log(JSON.stringify({{ state: done.state, last: changes.at(-1) }}));
}} catch (error) {{
  console.log(JSON.stringify({{ error: error.codeName ?? error.name, message: error.message }}));
}} finally {{
  client.close();
}}
"""


@pytest.fixture
async def secured(
    tmp_path: Path, participants: dict[str, ScriptedParticipant]
) -> AsyncIterator[tuple[Harness, dict[str, str]]]:
    ca = CertificateAuthority()
    server = ca.issue("coordinator", dns=("localhost",)).write(tmp_path, "server")
    certificate, key = ca.issue("orders-service", server=False).write(tmp_path, "client")
    tokens = tmp_path / "tokens.yaml"
    entry = {"name": "orders-service", "sha256": token_digest(TOKEN), "roles": ["client"]}
    tokens.write_text(yaml.safe_dump({"tokens": [entry]}))
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    async with running_coordinator(
        tmp_path,
        participants,
        [four_step_definition("onboard")],
        tls=ServerTls(*server, client_ca=ca.write(tmp_path)),
        auth=AuthSettings(tokens=tokens),
    ) as harness:
        yield (
            harness,
            {
                "SAGA_TARGET": f"localhost:{harness.coordinator.port}",
                "SAGA_TLS_CA": str(tmp_path / "ca.pem"),
                "SAGA_TLS_CERT": str(certificate),
                "SAGA_TLS_KEY": str(key),
                "SAGA_TOKEN_FILE": str(token_file),
            },
        )


async def run_node(tmp_path: Path, environ: dict[str, str]) -> dict[str, str]:
    script = tmp_path / "client.mjs"
    script.write_text(SCRIPT)
    clean = {name: value for name, value in os.environ.items() if not name.startswith("SAGA_")}
    assert NODE is not None
    process = await asyncio.create_subprocess_exec(
        NODE,
        str(script),
        env={**clean, **environ},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    answer: dict[str, str] = json.loads(out.decode().strip().splitlines()[-1])
    return answer


async def test_the_node_client_runs_a_saga_over_mtls_with_a_token_from_the_environment(
    tmp_path: Path, secured: tuple[Harness, dict[str, str]]
) -> None:
    _, environ = secured

    answer = await run_node(tmp_path, environ)

    assert answer == {"state": "SUCCEEDED", "last": "SUCCEEDED"}


async def test_the_node_client_without_a_token_or_a_certificate_is_refused(
    tmp_path: Path,
    secured: tuple[Harness, dict[str, str]],
    participants: dict[str, ScriptedParticipant],
) -> None:
    _, environ = secured
    no_token = {k: v for k, v in environ.items() if k != "SAGA_TOKEN_FILE"}
    no_certificate = {
        k: v for k, v in environ.items() if k not in ("SAGA_TLS_CERT", "SAGA_TLS_KEY")
    }

    unauthenticated = await run_node(tmp_path, no_token)
    handshake = await run_node(tmp_path, no_certificate)

    assert unauthenticated["error"] == "UNAUTHENTICATED"
    assert "needs a bearer token" in unauthenticated["message"]
    assert handshake["error"] == "UNAVAILABLE"
    assert TOKEN not in json.dumps(handshake)
    assert sum(len(p.calls()) for p in participants.values()) == 0
