"""The demo's Python services: Identity, Accounts and Billing, one per process (Cards is the
Node.js SDK's example, clients/node/examples/cards.js).

Each is a participant written with the Python SDK, with its own SQLite database: the business
rows and the idempotency barrier commit in one local transaction, so a repeated or late call
never applies its effect twice. With OTEL_EXPORTER_OTLP_ENDPOINT set, each exports its spans,
which continue the saga's trace.

    python scripts/demo/services.py accounts --port 50062 --database accounts.db

With ACCOUNTS_LEDGER_LOCK naming a file, Accounts refuses to close an account while that file
exists: what the README's "Operating sagas" uses to park a saga and repair it.
"""

from __future__ import annotations

import argparse
import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from saga_sdk.errors import Rejected
from saga_sdk.participant import CompensateContext, ExecuteContext, Participant
from saga_sdk.sqlite_barrier import SqliteBarrier
from saga_sdk.tls import ServerTLS


def identity(participant: Participant) -> str:
    @participant.action("CreateUser")
    def create_user(ctx: ExecuteContext) -> dict[str, str]:
        user_id = f"usr_{uuid.uuid4().hex[:10]}"
        ctx.tx.execute(
            "INSERT INTO users (id, saga, email, company, active) VALUES (?, ?, ?, ?, 1)",
            (user_id, ctx.saga_id, ctx.input["admin"], ctx.input["company"]),
        )
        return {"user_id": user_id}

    @participant.compensation("DeactivateUser")
    def deactivate_user(ctx: CompensateContext) -> None:
        ctx.tx.execute("UPDATE users SET active = 0 WHERE saga = ?", (ctx.saga_id,))

    return (
        "CREATE TABLE IF NOT EXISTS users (id TEXT PRIMARY KEY, saga TEXT, email TEXT,"
        " company TEXT, active INTEGER)"
    )


def accounts(participant: Participant) -> str:
    @participant.action("OpenAccount")
    def open_account(ctx: ExecuteContext) -> dict[str, str]:
        owner = ctx.previous_outputs["create-user"]["user_id"]
        account_id = f"acc_{uuid.uuid4().hex[:10]}"
        ctx.tx.execute(
            "INSERT INTO accounts (id, saga, owner, status) VALUES (?, ?, ?, 'open')",
            (account_id, ctx.saga_id, owner),
        )
        return {"account_id": account_id, "iban": f"DE89 3704 {account_id[-8:].upper()}"}

    @participant.compensation("CloseAccount")
    def close_account(ctx: CompensateContext) -> None:
        lock = os.environ.get("ACCOUNTS_LEDGER_LOCK")
        if lock and Path(lock).exists():
            # The ledger is closed for the month's end: no account can be closed until then.
            raise Rejected("LEDGER_LOCKED", f"the ledger is locked ({lock} exists)")
        ctx.tx.execute("UPDATE accounts SET status = 'closed' WHERE saga = ?", (ctx.saga_id,))

    return (
        "CREATE TABLE IF NOT EXISTS accounts (id TEXT PRIMARY KEY, saga TEXT, owner TEXT,"
        " status TEXT)"
    )


def billing(participant: Participant) -> str:
    @participant.action("CreateSubscription")
    def create_subscription(ctx: ExecuteContext) -> dict[str, str]:
        subscription_id = f"sub_{uuid.uuid4().hex[:10]}"
        ctx.tx.execute(
            "INSERT INTO subscriptions (id, saga, account, plan, status)"
            " VALUES (?, ?, ?, ?, 'active')",
            (
                subscription_id,
                ctx.saga_id,
                ctx.previous_outputs["open-account"]["account_id"],
                ctx.input.get("plan", "business"),
            ),
        )
        return {"subscription_id": subscription_id}

    @participant.compensation("CancelSubscription")
    def cancel_subscription(ctx: CompensateContext) -> None:
        ctx.tx.execute(
            "UPDATE subscriptions SET status = 'cancelled' WHERE saga = ?", (ctx.saga_id,)
        )

    return (
        "CREATE TABLE IF NOT EXISTS subscriptions (id TEXT PRIMARY KEY, saga TEXT, account TEXT,"
        " plan TEXT, status TEXT)"
    )


SERVICES: dict[str, Callable[[Participant], str]] = {
    "identity": identity,
    "accounts": accounts,
    "billing": billing,
}


def tracer_provider(name: str) -> TracerProvider | None:
    """Export this service's spans over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set."""
    if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return None
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(insecure=True, timeout=2)))
    return provider


def build(name: str, database: Path, tracing: TracerProvider | None = None) -> Participant:
    """The participant ``name`` with its handlers, barrier and business table."""
    barrier = SqliteBarrier(database)
    participant = Participant(name, barrier=barrier, tracer_provider=tracing)
    schema = SERVICES[name](participant)
    connection = barrier.connect()
    try:
        connection.execute(schema)
    finally:
        connection.close()
    return participant


def main() -> None:
    parser = argparse.ArgumentParser(description="Run one of the demo's domain services.")
    parser.add_argument("service", choices=sorted(SERVICES))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--database", type=Path, required=True)
    parser.add_argument("--tls-cert", type=Path, help="serve TLS with this certificate")
    parser.add_argument("--tls-key", type=Path, help="the certificate's key")
    parser.add_argument("--client-ca", type=Path, help="require client certificates of this CA")
    args = parser.parse_args()
    tls = None
    if args.tls_cert is not None:
        tls = ServerTLS.from_files(args.tls_cert, args.tls_key, client_ca=args.client_ca)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.service}: %(message)s")
    tracing = tracer_provider(args.service)
    try:
        build(args.service, args.database, tracing).run(f"127.0.0.1:{args.port}", tls=tls)
    finally:
        if tracing is not None:
            tracing.shutdown()


if __name__ == "__main__":
    main()
