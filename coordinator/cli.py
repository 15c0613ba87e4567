"""The ``saga`` command: serve the coordinator, start, inspect and cancel sagas, and bench."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from coordinator.bench import run as bench
from coordinator.config import ConfigError, ParticipantEndpoint, load_settings
from coordinator.console import SAGA_STYLE, console, saga_panel, update_line
from coordinator.core.errors import SagaError
from coordinator.logs import configure_logging
from saga_sdk import conformance
from saga_sdk import errors as sdk_errors
from saga_sdk.client import SagaClient
from saga_sdk.model import Saga, SagaState

DEFAULT_TARGET = "127.0.0.1:50051"


def _participant(value: str) -> tuple[str, str]:
    name, sep, address = value.partition("=")
    if not sep or not name or not address:
        raise argparse.ArgumentTypeError(f"expected NAME=HOST:PORT, got {value!r}")
    return name, address


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saga", description="A gRPC saga coordinator and its command-line client."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the coordinator")
    serve.add_argument("--config", type=Path, help="YAML configuration file")
    serve.add_argument("--database", help="store URL (default sqlite:///saga.db)")
    serve.add_argument("--listen", help="address to listen on (default 127.0.0.1:50051)")
    serve.add_argument("--definitions", type=Path, help="directory of saga definitions")
    serve.add_argument(
        "--participant",
        type=_participant,
        action="append",
        default=[],
        metavar="NAME=HOST:PORT",
        help="a participant's address (repeatable; adds to the configuration's)",
    )
    serve.add_argument("--synchronous", choices=("FULL", "NORMAL"))
    serve.add_argument("--shutdown-grace", type=float, metavar="SECONDS")
    serve.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    serve.add_argument("--log-format", choices=("text", "json"), help="log lines (default text)")
    serve.add_argument(
        "--log-payloads",
        action="store_true",
        default=None,
        help="also log saga inputs and step outputs",
    )
    serve.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        help="export traces and metrics over OTLP/gRPC (e.g. http://127.0.0.1:4317); "
        "default: the OTEL_EXPORTER_OTLP_ENDPOINT variable, else nothing is exported",
    )
    serve.add_argument(
        "--metrics-listen", metavar="HOST:PORT", help="serve Prometheus metrics on /metrics"
    )
    serve.add_argument(
        "--event-loop", choices=("asyncio", "uvloop"), help="the event loop (default asyncio)"
    )

    def client(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help)
        sub.add_argument("--target", default=DEFAULT_TARGET, help="coordinator address")
        sub.add_argument("--json", action="store_true", help="print JSON instead of tables")
        return sub

    start = client("start", "start a saga")
    start.add_argument("definition", help="definition name")
    start.add_argument("--input", default="{}", help="input payload as JSON (default {})")
    start.add_argument("--id", dest="saga_id", help="saga id (the idempotency key)")
    start.add_argument("--version", type=int, default=0, help="definition version (0: newest)")
    start.add_argument("--wait", action="store_true", help="wait for the saga to end")
    start.add_argument("--timeout", type=float, default=None, help="seconds to wait at most")

    get = client("get", "show a saga")
    get.add_argument("saga_id")

    listing = client("list", "list sagas")
    listing.add_argument("--state", action="append", default=[], help="filter by state")
    listing.add_argument("--definition", help="filter by definition name")
    listing.add_argument("--limit", type=int, default=100, help="at most this many")

    cancel = client("cancel", "cancel a running saga (it compensates)")
    cancel.add_argument("saga_id")
    cancel.add_argument("--reason", default="", help="why, recorded with the saga")

    watch = client("watch", "follow a saga's changes until it ends")
    watch.add_argument("saga_id")

    check = commands.add_parser(
        "check-store",
        help="scan a SQLite store for damage (read-only; the coordinator may keep running)",
    )
    check.add_argument("database", help="store URL, sqlite:///path (or a file path)")

    bench.add_arguments(
        commands.add_parser(
            "bench",
            help="measure sagas/s, latency and CPU against floors of the same calls",
            description="Measure four-step sagas through a fresh coordinator process against "
            "two floors, the same calls made directly and with one SQLite commit per call; "
            "each side runs in a process of its own. Exits 1 if a case made the wrong calls.",
        )
    )

    # Parsed by the SDK's kit itself (see main); listed here for `saga --help`.
    commands.add_parser(
        "conformance",
        help="check a participant, in any language, against the contract",
        add_help=False,
    )
    return parser


def _serve(args: argparse.Namespace) -> int:
    from coordinator.serve import run

    participants: dict[str, ParticipantEndpoint] = {}
    try:
        settings = load_settings(args.config)
        participants = dict(settings.participants)
        participants.update({n: ParticipantEndpoint(a) for n, a in args.participant})
        settings = load_settings(
            args.config,
            {
                "database": args.database,
                "listen": args.listen,
                "definitions": args.definitions,
                "participants": participants,
                "synchronous": args.synchronous,
                "shutdown_grace": args.shutdown_grace,
                "log_level": args.log_level,
                "log_format": args.log_format,
                "log_payloads": args.log_payloads,
                "otlp_endpoint": args.otlp_endpoint,
                "metrics_listen": args.metrics_listen,
                "event_loop": args.event_loop,
            },
        )
    except ConfigError as error:
        print(f"saga serve: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    try:
        return run(settings)
    except SagaError as error:
        print(f"saga serve: {error.message}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError, ValueError) as error:
        print(f"saga serve: {error}", file=sys.stderr)
        return 2


def _client_command(args: argparse.Namespace) -> int:
    out = console()

    def show(saga: Saga) -> None:
        if args.json:
            print(json.dumps(_saga_json(saga)))
        else:
            out.print(saga_panel(saga))

    try:
        with SagaClient(args.target) as client:
            if args.command == "start":
                try:
                    payload = json.loads(args.input)
                except json.JSONDecodeError as error:
                    print(f"saga start: --input is not valid JSON: {error}", file=sys.stderr)
                    return 2
                result = client.create(
                    args.definition,
                    payload,
                    saga_id=args.saga_id,
                    definition_version=args.version,
                )
                saga = result.saga
                if args.wait:
                    saga = client.wait(saga.saga_id, timeout=args.timeout)
                    show(saga)
                    return 0 if saga.state is SagaState.SUCCEEDED else 1
                if args.json:
                    show(saga)
                else:
                    verb = "started" if result.created else "already exists:"
                    out.print(f"{verb} sagas/{saga.saga_id} ({saga.state.value})")
            elif args.command == "get":
                show(client.get(args.saga_id))
            elif args.command == "list":
                states = [SagaState(s.upper()) for s in args.state]
                sagas = []
                for saga in client.list(states=states, definition=args.definition):
                    sagas.append(saga)
                    if len(sagas) >= args.limit:
                        break
                _print_list(out, sagas, as_json=args.json)
            elif args.command == "cancel":
                saga = client.cancel(args.saga_id, args.reason)
                show(saga)
            elif args.command == "watch":
                for update in client.watch(args.saga_id):
                    if args.json:
                        print(json.dumps(_saga_json(update.saga)))
                    else:
                        out.print(update_line(update))
    except ValueError as error:
        print(f"saga {args.command}: {error}", file=sys.stderr)
        return 2
    except sdk_errors.SagaRpcError as error:
        detail = "".join(f"\n  {v.field}: {v.description}" for v in error.field_violations)
        print(
            f"saga {args.command}: {error.code.name} {error.reason}: {error.message}{detail}",
            file=sys.stderr,
        )
        return 1
    except sdk_errors.SagaSdkError as error:
        print(f"saga {args.command}: {error}", file=sys.stderr)
        return 1
    return 0


def _saga_json(saga: Saga) -> dict[str, object]:
    def payload(data: bytes | None) -> object:
        if data is None:
            return None
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError):
            return {"bytes": len(data)}

    return {
        "saga_id": saga.saga_id,
        "definition": saga.definition,
        "definition_version": saga.definition_version,
        "state": saga.state.value,
        "input": payload(saga.input),
        "failure": None if saga.failure is None else vars(saga.failure),
        "cancel_reason": saga.cancel_reason,
        "version": saga.version,
        "steps": [
            {
                "name": step.name,
                "participant": step.participant,
                "state": step.state.value,
                "execute_attempts": step.execute_attempts,
                "compensate_attempts": step.compensate_attempts,
                "output": payload(step.output),
            }
            for step in saga.steps
        ],
    }


def _print_list(out: Console, sagas: Sequence[Saga], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps([_saga_json(s) for s in sagas]))
        return
    table = Table("saga", "definition", "state", "created", "steps")
    for saga in sagas:
        done = sum(1 for s in saga.steps if s.state.value == "SUCCEEDED")
        table.add_row(
            saga.saga_id,
            f"{saga.definition} v{saga.definition_version}",
            f"[{SAGA_STYLE[saga.state]}]{saga.state.value}[/]",
            saga.create_time.isoformat(timespec="seconds") if saga.create_time else "",
            f"{done}/{len(saga.steps)} succeeded",
        )
    out.print(table)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``saga`` command; return its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["conformance"]:
        return conformance.main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "bench":
        return bench.main(args)
    if args.command == "check-store":
        return _check_store(args.database)
    return _client_command(args)


def _check_store(database: str) -> int:
    """Scan the whole file; 0 when it is sound, 1 when damaged, 2 when it cannot be checked."""
    from coordinator.store import sqlite_path
    from coordinator.store.sqlite_schema import check_integrity

    try:
        path = sqlite_path(database) if database.startswith("sqlite:") else Path(database)
        problems = check_integrity(path)
    except SagaError as error:
        print(f"saga check-store: {error.message}", file=sys.stderr)
        return 2
    if problems:
        print(f"{path}: damaged", file=sys.stderr)
        for problem in problems[:20]:
            print(f"  {problem}", file=sys.stderr)
        return 1
    print(f"{path}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
