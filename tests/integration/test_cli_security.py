"""The ``saga`` command against a coordinator that requires mTLS and bearer tokens: TLS and the
token from flags, environment variables or the config file; refusals exit with their documented
codes and say what to give, and the token never shows."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from coordinator.cli import EXIT_DENIED, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE
from coordinator.config import AuthSettings, ServerTls
from coordinator.transport.access import token_digest
from tests.support.coordinator import four_step_definition, running_coordinator
from tests.support.participants import ScriptedParticipant
from tests.support.pki import CertificateAuthority

ADMIN = "admin-token-7c2e9b4f10"
VIEWER = "viewer-token-3a8d5e6b21"
STRANGER = "stranger-token-9f0e1d2c33"


@dataclass(frozen=True)
class Secured:
    """A running coordinator requiring mTLS and tokens, and the files a client needs."""

    target: str
    home: Path
    ca: Path
    certificate: Path
    key: Path
    admin: Path
    viewer: Path
    stranger: Path

    def flags(self, token: Path | None = None) -> list[str]:
        flags = ["--target", self.target, "--ca", str(self.ca)]
        flags += ["--cert", str(self.certificate), "--key", str(self.key)]
        return flags + (["--token-file", str(token)] if token is not None else [])


@pytest.fixture
async def secured(
    tmp_path: Path, participants: dict[str, ScriptedParticipant]
) -> AsyncIterator[Secured]:
    ca = CertificateAuthority()
    server = ca.issue("coordinator", dns=("localhost",)).write(tmp_path, "server")
    certificate, key = ca.issue("operator-laptop", server=False).write(tmp_path, "client")
    entries = [
        {"name": "ana", "sha256": token_digest(ADMIN), "roles": ["admin"]},
        {"name": "dashboard", "sha256": token_digest(VIEWER), "roles": ["viewer"]},
    ]
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(yaml.safe_dump({"tokens": entries}))
    files = {}
    for name, token in (("admin", ADMIN), ("viewer", VIEWER), ("stranger", STRANGER)):
        files[name] = tmp_path / f"{name}.token"
        files[name].write_text(token + "\n")
    home = tmp_path / "home"  # no ~/.config/saga/client.yaml unless a test writes one
    home.mkdir()
    async with running_coordinator(
        tmp_path,
        participants,
        [four_step_definition("onboard")],
        tls=ServerTls(*server, client_ca=ca.write(tmp_path)),
        auth=AuthSettings(tokens=tokens),
    ) as harness:
        yield Secured(
            f"localhost:{harness.coordinator.port}",
            home,
            tmp_path / "ca.pem",
            certificate,
            key,
            files["admin"],
            files["viewer"],
            files["stranger"],
        )


async def saga(
    secured: Secured, *args: str, environ: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {name: value for name, value in os.environ.items() if not name.startswith("SAGA_")}
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "coordinator.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, "HOME": str(secured.home), **(environ or {})},
    )


def shows_no_token(*runs: subprocess.CompletedProcess[str]) -> bool:
    text = "".join(run.stdout + run.stderr for run in runs)
    return not any(token in text for token in (ADMIN, VIEWER, STRANGER))


async def test_start_and_get_over_mtls_with_the_flags(secured: Secured) -> None:
    flags = secured.flags(secured.admin)

    started = await saga(secured, "start", "onboard", "--id", "acme", "--wait", "--json", *flags)
    got = await saga(secured, "get", "acme", "--json", *flags)

    assert started.returncode == EXIT_OK, started.stderr
    assert json.loads(started.stdout)["state"] == "SUCCEEDED"
    assert got.returncode == EXIT_OK, got.stderr
    assert json.loads(got.stdout)["saga_id"] == "acme"
    assert shows_no_token(started, got)


async def test_the_environment_and_the_config_file_stand_in_for_the_flags(
    secured: Secured,
) -> None:
    variables = {
        "SAGA_TARGET": secured.target,
        "SAGA_TLS_CA": str(secured.ca),
        "SAGA_TLS_CERT": str(secured.certificate),
        "SAGA_TLS_KEY": str(secured.key),
        "SAGA_TOKEN_FILE": str(secured.admin),
    }
    config = secured.home / ".config" / "saga" / "client.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(
        yaml.safe_dump(
            {
                "target": secured.target,
                "tls": {
                    "ca": str(secured.ca),
                    "certificate": str(secured.certificate),
                    "key": str(secured.key),
                },
                "token_file": str(secured.admin),
            }
        )
    )

    started = await saga(secured, "start", "onboard", "--id", "acme", environ=variables)
    counted = await saga(secured, "count", "--json")  # the default config file
    watched = await saga(secured, "watch", "acme", "--json")
    fed = await saga(secured, "events", "--json", environ={"SAGA_TOKEN": ADMIN})
    # A flag wins over the file: the viewer may read, not start.
    refused = await saga(secured, "start", "onboard", "--token-file", str(secured.viewer))

    assert started.returncode == EXIT_OK, started.stderr
    assert counted.returncode == EXIT_OK, counted.stderr
    assert json.loads(counted.stdout)["total"] == 1
    assert watched.returncode == EXIT_OK, watched.stderr
    assert json.loads(watched.stdout.splitlines()[-1])["state"] == "SUCCEEDED"
    assert fed.returncode == EXIT_OK, fed.stderr
    assert {json.loads(line)["saga_id"] for line in fed.stdout.splitlines()} == {"acme"}
    assert refused.returncode == EXIT_DENIED
    assert "PERMISSION_DENIED" in refused.stderr
    assert shows_no_token(started, counted, watched, fed, refused)


async def test_a_missing_or_refused_token_exits_5_saying_what_to_give(secured: Secured) -> None:
    missing = await saga(secured, "get", "acme", *secured.flags())
    unknown = await saga(secured, "get", "acme", *secured.flags(secured.stranger))
    denied = await saga(secured, "cancel", "acme", *secured.flags(secured.viewer))

    assert missing.returncode == EXIT_DENIED
    assert "UNAUTHENTICATED" in missing.stderr
    assert "give a token: --token-file FILE, $SAGA_TOKEN_FILE or $SAGA_TOKEN" in missing.stderr
    assert unknown.returncode == EXIT_DENIED
    assert "not one this coordinator knows" in unknown.stderr
    assert denied.returncode == EXIT_DENIED
    assert "PERMISSION_DENIED" in denied.stderr
    assert "needs the client role" in denied.stderr
    assert shows_no_token(missing, unknown, denied)


async def test_a_failed_handshake_exits_4_saying_what_to_check(secured: Secured) -> None:
    no_certificate = ["--target", secured.target, "--ca", str(secured.ca)]
    plaintext = ["--target", secured.target]

    refused = await saga(
        secured, "get", "acme", *no_certificate, "--token-file", str(secured.admin)
    )
    unencrypted = await saga(secured, "get", "acme", *plaintext)

    assert refused.returncode == EXIT_UNREACHABLE
    assert "do --ca, --cert, --key and --server-name fit" in refused.stderr
    assert unencrypted.returncode == EXIT_UNREACHABLE
    assert "If it serves TLS, give --ca" in unencrypted.stderr


async def test_settings_that_cannot_work_exit_2_and_a_token_flag_does_not_exist(
    secured: Secured,
) -> None:
    key_alone = await saga(secured, "get", "acme", "--target", secured.target, "--key", "k.pem")
    no_file = await saga(secured, "get", "acme", *secured.flags(secured.home / "missing"))
    on_the_command_line = await saga(secured, "get", "acme", "--token", ADMIN)
    in_the_environment = await saga(
        secured, "get", "acme", *secured.flags(), environ={"SAGA_TOKEN": f"{ADMIN} \n"}
    )

    assert key_alone.returncode == EXIT_USAGE
    assert "a client key needs its certificate" in key_alone.stderr
    assert no_file.returncode == EXIT_USAGE
    assert "missing: cannot read it" in no_file.stderr
    assert on_the_command_line.returncode == EXIT_USAGE
    assert "there is no --token flag" in on_the_command_line.stderr
    assert in_the_environment.returncode == EXIT_USAGE
    assert "SAGA_TOKEN: the token holds whitespace" in in_the_environment.stderr
    assert shows_no_token(key_alone, no_file, on_the_command_line, in_the_environment)
    help_text = " ".join((await saga(secured, "get", "--help")).stdout.split())
    assert "There is no --token flag: a token on a command line shows in shell history" in help_text
