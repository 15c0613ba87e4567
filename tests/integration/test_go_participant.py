"""A participant in Go with no SDK (clients/go): built from the protos with Debian's Go
packages, checked by its own unit tests and the conformance kit, and run as one step of a saga
with Python and Node.js participants through a `saga serve` process, killed and restarted."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from saga.v1 import participant_service_pb2, participant_service_pb2_grpc

from saga_sdk import AsyncSagaClient, SagaState
from saga_sdk.errors import Rejected
from saga_sdk.participant import CompensateContext, ExecuteContext, Participant
from saga_sdk.sqlite_barrier import SqliteBarrier
from tests.support.coordinator import four_step_definition, write_definitions
from tests.support.pki import CertificateAuthority
from tests.support.processes import CoordinatorProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
GO = ROOT / "clients" / "go"
NODE = ROOT / "clients" / "node"
# Generous for compensations: the Go service is killed and restarted during one saga.
PATIENT_RETRY = {"max_attempts": 40, "initial_backoff": "20ms", "max_backoff": "250ms"}
# The first test also pays for the session's cold Go build (grpc-go and its dependencies).
pytestmark = pytest.mark.timeout(400)


@dataclass(frozen=True)
class GoBuild:
    """The built participant, and the GOPATH tree and environment it was built in."""

    binary: Path
    source: Path
    env: dict[str, str]


@pytest.fixture(scope="session")
def go_build(tmp_path_factory: pytest.TempPathFactory) -> GoBuild:
    """`clients/go/build.sh` once per session, into the session's temporary directory."""
    if shutil.which("go") is None:
        pytest.skip("Go is not installed (make install installs Debian's golang-go as root)")
    out = tmp_path_factory.mktemp("go-accounts")
    env = {**os.environ, "GOCACHE": str(out / "gocache"), "GO_SKIP_TESTS": "1"}
    started = time.monotonic()
    result = subprocess.run(
        [str(GO / "build.sh"), str(out)], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    print(f"\nGo participant built in {time.monotonic() - started:.1f} s")
    go_env = {
        **env,
        "GO111MODULE": "off",
        "GOPROXY": "off",
        "GOFLAGS": "",
        "CGO_ENABLED": "1",
        "GOPATH": f"{out / 'gopath'}:/usr/share/gocode",
    }
    return GoBuild(out / "accounts", out / "gopath" / "src" / "saga-coordinator", go_env)


@dataclass
class GoAccounts:
    """The Go participant as a child process, on a fixed port so that it can be restarted."""

    binary: Path
    database: Path
    log: Path
    port: int = field(default_factory=free_port)
    flags: tuple[str, ...] = ()
    """More command-line flags (TLS)."""
    credentials: grpc.ChannelCredentials | None = None
    """What the tests dial it with; plaintext when None."""
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel(self) -> grpc.Channel:
        if self.credentials is None:
            return grpc.insecure_channel(self.address)
        return grpc.secure_channel(self.address, self.credentials)

    def start(self) -> None:
        """Start it and wait until its health check answers SERVING."""
        command = [str(self.binary), "-listen", self.address, "-database", str(self.database)]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*command, *self.flags], stdout=log, stderr=subprocess.STDOUT
            )
        with self.channel() as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for _ in range(400):
                assert self.process.poll() is None, self.log.read_text()
                try:
                    response = stub.Check(
                        health_pb2.HealthCheckRequest(service="saga.v1.ParticipantService"),
                        timeout=0.5,
                    )
                except grpc.RpcError:
                    time.sleep(0.025)
                    continue
                assert response.status == health_pb2.HealthCheckResponse.SERVING
                return
        raise AssertionError(f"the Go participant did not start:\n{self.log.read_text()}")

    def kill(self) -> None:
        """SIGKILL: no chance to finish anything."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> int:
        """SIGTERM, then its exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(15)

    def query(self, sql: str, *params: object) -> list[tuple[Any, ...]]:
        """Read its database, as it committed it."""
        with sqlite3.connect(self.database) as db:
            return db.execute(sql, params).fetchall()


@pytest.fixture
def go_accounts(go_build: GoBuild, tmp_path: Path) -> Iterator[GoAccounts]:
    accounts = GoAccounts(go_build.binary, tmp_path / "accounts go.db", tmp_path / "go.log")
    accounts.start()
    yield accounts
    assert accounts.stop() == 0, accounts.log.read_text()  # a graceful stop exits 0
    assert "stopped" in accounts.log.read_text()


def test_the_go_participants_unit_tests_pass(go_build: GoBuild) -> None:
    # -vet=off: build.sh ran the whole of go vet already.
    result = subprocess.run(
        ["go", "test", "-count=1", "-vet=off", "-v", "./accounts"],
        cwd=go_build.source,
        env=go_build.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    passed = re.findall(r"^--- PASS: (\w+)", result.stdout, flags=re.MULTILINE)
    assert "TestConcurrentDuplicatesApplyOnceAndAllAnswerTheSame" in passed
    assert "TestCompensateBeforeExecuteIsNullAndRefusesTheLateExecute" in passed
    assert "TestAnswersSurviveReopeningTheFile" in passed
    assert "--- FAIL" not in result.stdout


def test_the_go_participant_passes_the_conformance_kit(go_accounts: GoAccounts) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "coordinator.cli",
            "conformance",
            "--target",
            go_accounts.address,
            "--action",
            "OpenAccount",
            "--compensation",
            "CloseAccount",
            "--payload",
            '{"company": "Initech", "currency": "USD"}',
            "--previous",
            'create-user={"user_id": "usr_1"}',
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\b\d+ passed, 0 failed", result.stdout), result.stdout
    for check in (
        "duplicate-execute",
        "duplicate-compensate",
        "null-compensation",
        "no-hanging-execute",
        "concurrent-duplicates",
        "past-deadline",
        "unknown-action",
    ):
        assert check in result.stdout
    # What the kit cannot see: each Execute that answered OK opened exactly one account, and
    # the one compensated before it arrived opened none.
    accounts = go_accounts.query("SELECT saga_id, execute_request_id, currency FROM accounts")
    applied = go_accounts.query(
        "SELECT saga_id, request_id FROM saga_barrier WHERE operation = 'execute'"
        " AND state = 'done'"
    )
    blocked = go_accounts.query("SELECT saga_id FROM saga_barrier WHERE state = 'blocked'")
    assert sorted((saga, request) for saga, request, _ in accounts) == sorted(applied)
    assert len({saga for saga, _, _ in accounts}) == len(accounts)
    assert {currency for _, _, currency in accounts} == {"USD"}
    assert blocked
    assert not {saga for (saga,) in blocked} & {saga for saga, _, _ in accounts}


def test_the_go_participant_serves_mtls_to_callers_with_a_certificate_of_its_ca(
    go_build: GoBuild, tmp_path: Path
) -> None:
    ca = CertificateAuthority()
    server = ca.issue("accounts", ips=("127.0.0.1",), client=False).write(tmp_path, "accounts")
    client = ca.issue("coordinator", server=False)
    stranger = CertificateAuthority().issue("stranger", server=False)
    ca_file = ca.write(tmp_path)
    accounts = GoAccounts(
        go_build.binary,
        tmp_path / "accounts.db",
        tmp_path / "go.log",
        flags=("-tls-cert", str(server[0]), "-tls-key", str(server[1]), "-client-ca", str(ca_file)),
        credentials=grpc.ssl_channel_credentials(ca.pem, client.key, client.certificate),
    )
    accounts.start()
    try:
        request = participant_service_pb2.ExecuteRequest(
            saga="sagas/tls-1",
            step="open-account",
            action="OpenAccount",
            request_id="tls-1-execute",
            attempt=1,
            input=b"{}",
            previous_outputs={"create-user": b'{"user_id": "usr_tls"}'},
        )
        with accounts.channel() as channel:
            answer = participant_service_pb2_grpc.ParticipantServiceStub(channel).Execute(
                request, timeout=10
            )
        refused = []
        for credentials in (
            grpc.ssl_channel_credentials(ca.pem),  # no client certificate
            grpc.ssl_channel_credentials(ca.pem, stranger.key, stranger.certificate),
        ):
            with (
                grpc.secure_channel(accounts.address, credentials) as channel,
                pytest.raises(grpc.RpcError) as caught,
            ):
                participant_service_pb2_grpc.ParticipantServiceStub(channel).Execute(
                    participant_service_pb2.ExecuteRequest(
                        saga="sagas/tls-2",
                        step="open-account",
                        action="OpenAccount",
                        request_id="tls-2-execute",
                        previous_outputs={"create-user": b'{"user_id": "usr_x"}'},
                    ),
                    timeout=10,
                )
            refused.append(caught.value.code())
    finally:
        assert accounts.stop() == 0, accounts.log.read_text()

    assert json.loads(answer.output)["owner"] == "usr_tls"
    assert refused == [grpc.StatusCode.UNAVAILABLE] * 2
    assert accounts.query("SELECT saga_id FROM accounts") == [("tls-1",)]
    assert "mTLS" in accounts.log.read_text()


def python_participant(name: str, database: Path) -> Participant:
    """Identity or Billing on the Python SDK: Billing records the account Go opened."""
    barrier = SqliteBarrier(database)
    with barrier.connect() as db:
        db.execute("CREATE TABLE IF NOT EXISTS ledger (saga TEXT, what TEXT, account TEXT)")
    participant = Participant(name, barrier=barrier)
    if name == "identity":

        @participant.action("CreateUser")
        def create_user(ctx: ExecuteContext) -> dict[str, str]:
            ctx.tx.execute("INSERT INTO ledger VALUES (?, 'CreateUser', '')", (ctx.saga_id,))
            return {"user_id": f"usr_{ctx.saga_id}"}

        @participant.compensation("DeactivateUser")
        def deactivate_user(ctx: CompensateContext) -> None:
            ctx.tx.execute("INSERT INTO ledger VALUES (?, 'DeactivateUser', '')", (ctx.saga_id,))

    else:

        @participant.action("CreateSubscription")
        def subscribe(ctx: ExecuteContext) -> dict[str, str]:
            time.sleep(ctx.input.get("slow", 0))  # a worker thread: the event loop goes on
            if ctx.input.get("no_billing"):
                raise Rejected("BILLING_REFUSED", "no subscription for this client")
            account = ctx.previous_outputs["open-account"]["account_id"]
            ctx.tx.execute(
                "INSERT INTO ledger VALUES (?, 'CreateSubscription', ?)", (ctx.saga_id, account)
            )
            return {"subscription_id": f"sub_{ctx.saga_id}", "account": account}

        @participant.compensation("CancelSubscription")
        def cancel(ctx: CompensateContext) -> None:
            ctx.tx.execute(
                "INSERT INTO ledger VALUES (?, 'CancelSubscription', '')", (ctx.saga_id,)
            )

    return participant


@pytest.fixture
async def node_cards(tmp_path: Path) -> AsyncIterator[str]:
    """The Node.js SDK's Cards example, as a real process."""
    port = free_port()
    log = tmp_path / "cards.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                "node",
                str(NODE / "examples" / "cards.js"),
                "--port",
                str(port),
                "--database",
                str(tmp_path / "cards.db"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        )
    address = f"127.0.0.1:{port}"
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            async with asyncio.timeout(30):
                while True:
                    assert process.poll() is None, log.read_text()
                    try:
                        await health_pb2_grpc.HealthStub(channel).Check(
                            health_pb2.HealthCheckRequest(), timeout=0.5
                        )
                        break
                    except grpc.aio.AioRpcError:
                        await asyncio.sleep(0.05)
        yield address
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 30) == 0, log.read_text()


async def wait_for_step(client: AsyncSagaClient, saga_id: str, step: str, state: str) -> None:
    async with asyncio.timeout(20):
        while (await client.get(saga_id)).step(step).state.value != state:
            await asyncio.sleep(0.02)


async def test_go_takes_a_step_of_a_saga_with_python_and_node_and_survives_sigkill(
    tmp_path: Path, go_accounts: GoAccounts, node_cards: str
) -> None:
    python = {n: python_participant(n, tmp_path / f"{n}.db") for n in ("identity", "billing")}
    addresses = {n: f"127.0.0.1:{await p.start('127.0.0.1:0')}" for n, p in python.items()}
    addresses |= {"accounts": go_accounts.address, "cards": node_cards}
    definition = four_step_definition("onboard")
    definition["retry"] = definition["compensation_retry"] = PATIENT_RETRY
    write_definitions(tmp_path / "definitions", [definition])
    coordinator = CoordinatorProcess.configure(
        tmp_path / "saga.yaml", tmp_path / "saga.db", addresses
    )
    await coordinator.start()
    try:
        async with AsyncSagaClient(coordinator.target) as client:
            await client.create("onboard", {"company": "Acme"}, saga_id="go-ok")
            await client.create(
                "onboard", {"company": "Globex", "currency": "XYZ"}, saga_id="go-refuses"
            )
            ok = await client.wait("go-ok", timeout=30)
            refused = await client.wait("go-refuses", timeout=30)

            # Billing, the step after Go's, takes its time and then says no. Meanwhile the Go
            # service is killed with SIGKILL and started again on the same file.
            await client.create(
                "onboard",
                {"company": "Initech", "no_billing": True, "slow": 1.5},
                saga_id="go-killed",
            )
            await wait_for_step(client, "go-killed", "issue-card", "SUCCEEDED")
            go_accounts.kill()
            go_accounts.start()
            killed = await client.wait("go-killed", timeout=30)
    finally:
        assert await coordinator.stop() == 0
        for participant in python.values():
            await participant.stop(0)

    # Go's output is read by Python: Billing subscribed the account that Go opened.
    assert ok.state is SagaState.SUCCEEDED
    account = ok.step("open-account").output_json()
    assert account["owner"] == "usr_go-ok"  # Python's output, read by Go
    assert account["currency"] == "EUR"
    assert ok.step("subscribe").output_json()["account"] == account["account_id"]
    assert ok.step("issue-card").output_json()["card_id"].startswith("card-")

    # Go's business "no" compensates the step before it, and Go's own step (k included) with a
    # null compensation; the steps after it never ran.
    assert refused.state is SagaState.COMPENSATED
    step = refused.step("open-account")
    assert step.state.value == "COMPENSATED"
    assert step.failure is not None
    assert step.failure.reason == "CURRENCY_NOT_SUPPORTED"
    assert refused.step("create-user").state.value == "COMPENSATED"
    assert refused.step("issue-card").state.value == "PENDING"

    # The step after Go's said no after the restart: the restarted Go service closed the account
    # it had opened before the kill.
    assert killed.state is SagaState.COMPENSATED
    assert [s.state.value for s in killed.steps] == ["COMPENSATED"] * 4
    opened = killed.step("open-account").output_json()

    rows = go_accounts.query("SELECT saga_id, id, status FROM accounts ORDER BY saga_id")
    assert rows == [
        ("go-killed", opened["account_id"], "closed"),
        ("go-ok", account["account_id"], "open"),
    ]
    # A duplicate of the Execute the coordinator sent before the kill, sent to the restarted
    # process: the stored answer, and still one account.
    ((request_id,),) = go_accounts.query(
        "SELECT request_id FROM saga_barrier WHERE saga_id = 'go-killed' AND operation = 'execute'"
    )
    with grpc.insecure_channel(go_accounts.address) as channel:
        answer = participant_service_pb2_grpc.ParticipantServiceStub(channel).Execute(
            participant_service_pb2.ExecuteRequest(
                saga="sagas/go-killed",
                definition="onboard",
                definition_version=1,
                step="open-account",
                action="OpenAccount",
                request_id=request_id,
                attempt=1,
                input=killed.input,
                previous_outputs={"create-user": b'{"user_id": "usr_go-killed"}'},
            ),
            timeout=10,
        )
    assert json.loads(answer.output) == opened
    assert go_accounts.query("SELECT count(*) FROM accounts WHERE saga_id = 'go-killed'") == [(1,)]
    with sqlite3.connect(tmp_path / "billing.db") as db:
        subscribed = db.execute("SELECT saga, account FROM ledger").fetchall()
    assert subscribed == [("go-ok", account["account_id"])]
