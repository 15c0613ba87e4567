"""The main job: onboard two corporate clients; one succeeds, one is refused a card and undone.

Starts four participant processes, each with its own SQLite database: Identity, Accounts and
Billing in Python, Cards in Node.js, all with the SDKs' idempotency barriers; and the
coordinator on its own SQLite file. Runs the two sagas, prints each saga's steps and ending,
then stops every process it started.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.rule import Rule

from coordinator.console import console, saga_panel, update_line
from coordinator.devcerts import CertificateAuthority
from coordinator.store import redacted_url
from coordinator.transport.access import token_digest
from saga_sdk.client import SagaClient
from saga_sdk.model import SagaState
from saga_sdk.tls import ClientTLS

HERE = Path(__file__).resolve().parent / "demo"
NODE_CARDS = HERE.parent.parent / "clients" / "node" / "examples" / "cards.js"
SERVICES = ("identity", "accounts", "cards", "billing")
CLIENTS = (
    ("acme-corp", {"company": "Acme Corp", "admin": "ada@acme.example", "plan": "business"}),
    (
        "globex-corp",
        {
            "company": "Globex Corp",
            "admin": "hank@globex.example",
            "plan": "business",
            "card_limit": 250_000,
        },
    ),
)


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_serving(
    address: str,
    process: subprocess.Popen[bytes],
    log: Path,
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    """Wait until the process at ``address`` answers its health check."""
    deadline = time.monotonic() + 30
    with (
        grpc.insecure_channel(address)
        if credentials is None
        else grpc.secure_channel(address, credentials)
    ) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if process.poll() is not None:
                raise SystemExit(f"{log.stem} exited early:\n{log.read_text()[-2000:]}")
            try:
                answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{log.stem} did not start in time:\n{log.read_text()[-2000:]}")
            time.sleep(0.05)


@dataclass
class Processes:
    """Every process the demo started, so that each one is stopped, by its pid."""

    workdir: Path
    started: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    credentials: grpc.ChannelCredentials | None = None
    """How health checks reach the processes (TLS with --secure)."""

    def start(self, name: str, command: list[str], address: str) -> None:
        self.spawn(name, command)
        self.wait(name, address)

    def spawn(self, name: str, command: list[str]) -> None:
        log = self.workdir / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        self.started.append((name, process))

    def wait(self, name: str, address: str) -> None:
        process = dict(self.started)[name]
        wait_serving(address, process, self.workdir / f"{name}.log", self.credentials)

    def stop_all(self) -> None:
        for _, process in reversed(self.started):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for name, process in reversed(self.started):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                print(f"{name} did not stop on SIGTERM; killing pid {process.pid}")
                process.kill()
                process.wait()


@dataclass(frozen=True)
class Secrets:
    """What --secure makes for a run: a CA, each process's certificate, the client's token."""

    certs: Path
    token: str

    def service(self, name: str) -> list[str]:
        """A service's flags: its certificate, and the coordinator's CA to require."""
        return [
            *("--tls-cert", str(self.certs / f"{name}.pem")),
            *("--tls-key", str(self.certs / f"{name}.key")),
            *("--client-ca", str(self.certs / "ca.pem")),
        ]

    def participant(self, address: str) -> dict[str, Any]:
        """How the coordinator reaches a service: TLS, with its own client certificate."""
        return {
            "address": address,
            "tls": True,
            "root_certificates": str(self.certs / "ca.pem"),
            "client_certificate": str(self.certs / "coordinator-client.pem"),
            "client_key": str(self.certs / "coordinator-client.key"),
        }

    def coordinator(self) -> dict[str, Any]:
        """The coordinator's own TLS (requiring the demo client's certificate) and tokens."""
        return {
            "tls": {
                "certificate": str(self.certs / "coordinator.pem"),
                "key": str(self.certs / "coordinator.key"),
                "client_ca": str(self.certs / "ca.pem"),
                "allowed_clients": ["CN=demo-client", "CN=demo-console"],
            },
            "auth": {"tokens": str(self.certs / "tokens.yaml")},
        }

    def credentials(self) -> grpc.ChannelCredentials:
        """The demo client's TLS: the run's CA, and its own certificate."""
        return grpc.ssl_channel_credentials(
            (self.certs / "ca.pem").read_bytes(),
            (self.certs / "demo-client.key").read_bytes(),
            (self.certs / "demo-client.pem").read_bytes(),
        )

    def client(self, target: str) -> SagaClient:
        """The demo's client: its certificate, and its token on every call."""
        tls = ClientTLS.from_files(
            ca=self.certs / "ca.pem",
            certificate=self.certs / "demo-client.pem",
            key=self.certs / "demo-client.key",
        )
        return SagaClient(target, tls=tls, token=self.token)

    def exports(self) -> str:
        """The variables that point the saga command (or any SDK client) at the run."""
        return (
            f"export SAGA_TLS_CA={self.certs / 'ca.pem'} "
            f"SAGA_TLS_CERT={self.certs / 'demo-client.pem'} "
            f"SAGA_TLS_KEY={self.certs / 'demo-client.key'} "
            f"SAGA_TOKEN_FILE={self.certs / 'demo-client.token'}"
        )


def make_secrets(workdir: Path) -> Secrets:
    """A CA for the run, a certificate for each process, and a token for the demo client."""
    certs = workdir / "certs"
    ca = CertificateAuthority("saga demo CA")
    ca.write(certs)
    local = {"dns": ("localhost",), "ips": ("127.0.0.1",)}
    for name in (*SERVICES, "coordinator"):
        ca.issue(name, **local).write(certs, name)  # type: ignore[arg-type]
    ca.issue("coordinator", server=False).write(certs, "coordinator-client")
    entries = []
    # The demo's client starts and watches sagas; the console also repairs them (operator).
    for name, role in (("demo-client", "client"), ("demo-console", "operator")):
        ca.issue(name, server=False).write(certs, name)
        token = secrets.token_urlsafe(32)
        token_file = certs / f"{name}.token"
        token_file.touch(mode=0o600)
        token_file.write_text(token)
        entries.append({"name": name, "sha256": token_digest(token), "roles": [role]})
    (certs / "tokens.yaml").write_text(yaml.safe_dump({"tokens": entries}))
    return Secrets(certs, (certs / "demo-client.token").read_text())


def service_command(
    name: str, port: int, database: Path, security: Secrets | None = None
) -> list[str]:
    """How to start one of the demo's services: Cards runs on Node.js, the others on Python."""
    arguments = ["--port", str(port), "--database", str(database)]
    if security is not None:
        arguments += security.service(name)
    if name == "cards":
        return ["node", str(NODE_CARDS), *arguments]
    return [sys.executable, str(HERE / "services.py"), name, *arguments]


def start_console(processes: Processes, target: str, security: Secrets | None) -> str:
    """`saga console` on a free loopback port, against the demo's coordinator; its address."""
    port = free_port()
    command = [
        sys.executable,
        *("-m", "coordinator.cli", "console"),
        *("--coordinator", target, "--listen", f"127.0.0.1:{port}"),
    ]
    if security is not None:
        command += [
            *("--ca", str(security.certs / "ca.pem")),
            *("--cert", str(security.certs / "demo-console.pem")),
            *("--key", str(security.certs / "demo-console.key")),
            *("--token-file", str(security.certs / "demo-console.token")),
        ]
    processes.spawn("console", command)
    address = f"http://127.0.0.1:{port}/"
    process = dict(processes.started)["console"]
    log = processes.workdir / "console.log"
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the console exited early:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{address}definitions", timeout=2) as answer:
                if answer.status == 200:
                    return address
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"the console did not start in time:\n{log.read_text()[-2000:]}")
        time.sleep(0.1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(".demo"), help="where files go")
    parser.add_argument(
        "--keep-running",
        action="store_true",
        help="leave the services and the coordinator running after the two sagas, to try the "
        "saga command on them (SAGA_TARGET is printed); Ctrl-C stops them",
    )
    parser.add_argument(
        "--database",
        metavar="URL",
        help="the coordinator's store (default: a SQLite file in the work directory), e.g. "
        "postgresql://saga@127.0.0.1:5432/sagas",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="coordinator processes sharing the store (PostgreSQL): sagas are created on the "
        "first and watched on the last",
    )
    parser.add_argument(
        "--console",
        action="store_true",
        help="after the two sagas, also serve the web console (saga console) on a free "
        "loopback port and keep everything running until Ctrl-C; the address is printed",
    )
    parser.add_argument(
        "--secure",
        action="store_true",
        help="TLS on both hops with certificates made for the run (the coordinator requires "
        "the demo client's, each service the coordinator's), and a bearer token",
    )
    args = parser.parse_args()
    if args.replicas < 1 or (args.replicas > 1 and not args.database):
        parser.error("--replicas above 1 needs a shared --database (postgresql://...)")
    out = console()
    workdir: Path = args.workdir.resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)

    ports = {name: free_port() for name in SERVICES}
    coordinators = [free_port() for _ in range(args.replicas)]
    database = args.database or f"sqlite:///{workdir / 'saga.db'}"
    security = make_secrets(workdir) if args.secure else None
    configs = []
    for index, port in enumerate(coordinators):
        config = workdir / f"saga-{index + 1}.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "database": database,
                    "listen": f"127.0.0.1:{port}",
                    "definitions": str(HERE / "definitions"),
                    "participants": {
                        name: (
                            security.participant(f"127.0.0.1:{ports[name]}")
                            if security
                            else f"127.0.0.1:{ports[name]}"
                        )
                        for name in SERVICES
                    },
                    **(security.coordinator() if security else {}),
                }
            )
        )
        configs.append(config)
    processes = Processes(workdir, credentials=security.credentials() if security else None)
    started_at = time.monotonic()
    try:
        out.print(Rule("Starting the four services and the coordinator"))
        for name in SERVICES:  # all four start at once, then each is awaited
            processes.spawn(
                name, service_command(name, ports[name], workdir / f"{name}.db", security)
            )
        for name in SERVICES:
            processes.wait(name, f"127.0.0.1:{ports[name]}")
            language = "Node.js" if name == "cards" else "Python"
            out.print(
                f"  {name:<11} on 127.0.0.1:{ports[name]}  ({language}, {workdir / f'{name}.db'})"
            )
        targets = [f"127.0.0.1:{port}" for port in coordinators]
        shown = redacted_url(database)
        for index, (target, config) in enumerate(zip(targets, configs, strict=True)):
            name = "coordinator" if len(targets) == 1 else f"coordinator-{index + 1}"
            processes.start(
                name,
                [sys.executable, "-m", "coordinator.cli", "serve", "--config", str(config)],
                target,
            )
            out.print(f"  {name:<11} on {target}  ({shown})")
        target = targets[0]

        outcomes = []
        connect = security.client if security else SagaClient
        if security:
            out.print(
                f"  TLS on both hops, certificates and the client's token in {security.certs}"
            )
        with connect(targets[0]) as client, connect(targets[-1]) as watcher:
            for saga_id, payload in CLIENTS:
                out.print(Rule(f"Onboarding {payload['company']}"))
                result = client.create("onboard-corporate-client", payload, saga_id=saga_id)
                out.print(f"started sagas/{result.saga.saga_id} on {targets[0]}")
                if len(targets) > 1:
                    out.print(f"watching it on {targets[-1]}")
                events = []
                for update in watcher.watch(saga_id):
                    out.print("  ", update_line(update))
                    if update.event is not None:
                        events.append(update.event)
                saga = watcher.get(saga_id)
                out.print(saga_panel(saga, events))
                outcomes.append(saga.state)
        expected = [SagaState.SUCCEEDED, SagaState.COMPENSATED]
        out.print(Rule("Done"))
        out.print(
            f"{len(outcomes)} sagas: "
            + ", ".join(
                f"{sid} {state.value}" for (sid, _), state in zip(CLIENTS, outcomes, strict=True)
            )
            + f" in {time.monotonic() - started_at:.1f}s. Logs and databases in {workdir}"
        )
        if args.console:
            address = start_console(processes, target, security)
            out.print(Rule("The console"))
            out.print(f"The web console: {address}   (Ctrl-C stops everything)")
        if args.keep_running or args.console:
            out.print(f"Still running: export SAGA_TARGET={target}   (Ctrl-C stops everything)")
            if security:
                out.print(security.exports(), soft_wrap=True)
            stop = {signal.SIGINT, signal.SIGTERM}
            signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # taken by sigwait, not by handlers
            signal.sigwait(stop)
        return 0 if outcomes == expected else 1
    finally:
        processes.stop_all()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
