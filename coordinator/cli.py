"""The ``saga`` command: serve the coordinator; start, inspect, steer and prune sagas; manage
definitions; and bench."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.table import Table
from rich.text import Text

from coordinator.bench import run as bench
from coordinator.config import (
    AuthSettings,
    ConfigError,
    ParticipantEndpoint,
    ServerTls,
    load_settings,
)
from coordinator.config import parse_duration as config_duration
from coordinator.console import (
    SAGA_STYLE,
    change_line,
    console,
    counts_table,
    definition_mermaid,
    definition_view,
    definitions_table,
    event_lines,
    labels_text,
    saga_panel,
    timestamp,
    update_line,
)
from coordinator.core.errors import InvalidDefinition, SagaError
from coordinator.core.model import DEFAULT_TIMEOUT
from coordinator.logs import configure_logging
from coordinator.web import flags as console_flags
from saga_sdk import conformance
from saga_sdk import errors as sdk_errors
from saga_sdk.client import SagaClient
from saga_sdk.connection import Connection
from saga_sdk.model import (
    AuditEntry,
    DefinitionSummary,
    DefinitionVersion,
    RetryPolicy,
    Saga,
    SagaDefinition,
    SagaEvent,
    SagaState,
    StepKind,
    definition_from_proto,
)

DEFAULT_TARGET = "127.0.0.1:50051"
TARGET_VARIABLE = "SAGA_TARGET"

EXIT_OK = 0
"""The command did what it was asked."""
EXIT_REFUSED = 1
"""The coordinator refused (FAILED_PRECONDITION, ABORTED, ALREADY_EXISTS...), or a saga
started with --wait did not succeed."""
EXIT_USAGE = 2
"""Bad usage or invalid input (argparse's own code, and INVALID_ARGUMENT)."""
EXIT_NOT_FOUND = 3
"""No such saga or definition (NOT_FOUND)."""
EXIT_UNREACHABLE = 4
"""The coordinator could not be reached, or did not answer in time."""
EXIT_DENIED = 5
"""The coordinator did not let this caller do it: no valid token (UNAUTHENTICATED), or one
whose roles do not allow it (PERMISSION_DENIED)."""

EPILOG = f"""\
exit codes of the client commands:
  {EXIT_OK}  done
  {EXIT_REFUSED}  refused by the coordinator (FAILED_PRECONDITION such as ACTION_NOT_ALLOWED or
     SAGA_ENDED, ABORTED such as SAGA_VERSION_MISMATCH, ALREADY_EXISTS such as
     DEFINITION_VERSION_EXISTS ...), or `start --wait` of a saga that did not succeed
  {EXIT_USAGE}  bad usage or invalid input: a missing --reason, bad JSON, an invalid definition
     file, INVALID_ARGUMENT from the coordinator
  {EXIT_NOT_FOUND}  not found: no such saga or definition (NOT_FOUND)
  {EXIT_UNREACHABLE}  the coordinator is unreachable (UNAVAILABLE, DEADLINE_EXCEEDED), or the TLS
     handshake failed (no client certificate, a server certificate not trusted or not named so)
  {EXIT_DENIED}  not allowed: no valid bearer token (UNAUTHENTICATED), or one whose roles or
     definitions do not allow the call (PERMISSION_DENIED)

environment (a flag wins over its variable, which wins over the config file):
  {TARGET_VARIABLE}           the coordinator's address, like --target ({DEFAULT_TARGET})
  SAGA_TLS_CA           like --ca: the CA (PEM) that signed the coordinator's certificate
  SAGA_TLS_CERT         like --cert: this client's certificate (PEM), for mTLS
  SAGA_TLS_KEY          like --key: its private key (PEM, unencrypted)
  SAGA_TLS_SERVER_NAME  like --server-name: the name the coordinator's certificate carries
  SAGA_TLS=true         like --tls: TLS, trusting the system's CAs
  SAGA_TOKEN_FILE       like --token-file: a file holding the bearer token
  SAGA_TOKEN            the bearer token itself (there is no --token flag: a command line
                        shows in shell history and to `ps`)
  SAGA_CLIENT_CONFIG    a YAML file with target, tls (ca, certificate, key, server_name) and
                        token_file; default ~/.config/saga/client.yaml, when there is one
  SAGA_ACTOR            who acts, recorded in the saga's audit trail (default: user@host)
"""


class UsageError(Exception):
    """The command line asks for something that cannot be done (exit 2)."""


class _NoTokenFlag(argparse.Action):
    """Refuses `--token VALUE` without echoing VALUE (else argparse would take it for an
    abbreviation of --token-file, and name the token as a file it cannot read)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        parser.error(
            "there is no --token flag: a token on a command line shows in shell history and to "
            "ps; give --token-file FILE, or set SAGA_TOKEN_FILE or SAGA_TOKEN"
        )


def _participant(value: str) -> tuple[str, str]:
    name, sep, address = value.partition("=")
    if not sep or not name or not address:
        raise argparse.ArgumentTypeError(f"expected NAME=HOST:PORT, got {value!r}")
    return name, address


def parse_duration(value: str) -> timedelta:
    """A duration like 90s, 15m, 12h, 30d, 1h30m or 500ms (``config.parse_duration``)."""
    try:
        return config_duration(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_moment(value: str, now: datetime | None = None) -> datetime:
    """A point in time: a duration ago (1h, 30d) or an ISO time (local time when no zone)."""
    try:
        return (now or datetime.now(UTC)) - parse_duration(value)
    except argparse.ArgumentTypeError:
        pass
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a duration ago (1h, 30d) or an ISO time (2030-01-31T12:00), got {value!r}"
        ) from None
    return moment if moment.tzinfo is not None else moment.astimezone()


def _label(value: str) -> tuple[str, str]:
    key, sep, label = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    return key, label


def _non_negative(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value!r}")
    return number


def _positive(value: str) -> int:
    number = _non_negative(value)
    if number == 0:
        raise argparse.ArgumentTypeError("expected a number >= 1")
    return number


def _name_and_version(value: str) -> tuple[str, int]:
    """NAME or NAME@VERSION (VERSION as 2 or v2); version 0 means the newest."""
    name, sep, version = value.partition("@")
    if not name:
        raise argparse.ArgumentTypeError(f"expected NAME or NAME@VERSION, got {value!r}")
    if not sep:
        return name, 0
    try:
        number = int(version.removeprefix("v"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME@VERSION, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"a version is at least 1, got {value!r}")
    return name, number


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saga",
        description="A gRPC saga coordinator and its command-line client.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    serve.add_argument(
        "--retention",
        metavar="AGE",
        help="prune sagas that ended SUCCEEDED or COMPENSATED longer ago than this (30d, 12h); "
        "default: keep them",
    )
    serve.add_argument(
        "--tls-certificate", metavar="PEM", help="serve TLS with this certificate (chain)"
    )
    serve.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    serve.add_argument(
        "--tls-client-ca",
        metavar="PEM",
        help="require client certificates signed by this CA (mTLS)",
    )
    serve.add_argument(
        "--tokens",
        metavar="FILE",
        help="require bearer tokens listed in this file (see saga token new)",
    )
    serve.add_argument(
        "--insecure-plaintext",
        action="store_true",
        default=None,
        help="serve plaintext on an address other than loopback: anyone on the network can "
        "read and forge calls",
    )
    serve.add_argument(
        "--no-reflection",
        dest="reflection",
        action="store_false",
        default=None,
        help="do not serve gRPC reflection",
    )
    serve.add_argument(
        "--replica",
        metavar="NAME",
        help="this process's name among replicas on one store (default: host:port)",
    )
    serve.add_argument(
        "--lease",
        metavar="DURATION",
        help="how long this replica holds its sagas without renewing (default 10s): how long "
        "others wait before taking over from one that died",
    )

    def formats(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--output",
            "-o",
            choices=("table", "json"),
            default="table",
            help="print tables for people (default) or JSON",
        )
        sub.add_argument(
            "--json", dest="output", action="store_const", const="json", help="--output json"
        )

    def client(parent: Any, name: str, help: str, **extra: Any) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = parent.add_parser(
            name,
            help=help,
            description=extra.pop("description", help[:1].upper() + help[1:] + "."),
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            **extra,
        )
        connection(sub)
        formats(sub)
        return sub

    def connection(sub: argparse.ArgumentParser) -> None:
        group = sub.add_argument_group(
            "connecting to the coordinator",
            "Each flag wins over its SAGA_* variable, which wins over the config file (see\n"
            "environment below). Any TLS setting means TLS; none means plaintext.",
        )
        group.add_argument(
            "--target",
            help=f"coordinator address (default: ${TARGET_VARIABLE}, then the config file's, "
            f"else {DEFAULT_TARGET})",
        )
        group.add_argument(
            "--ca", metavar="PEM", help="trust the coordinator's certificate signed by this CA"
        )
        group.add_argument(
            "--cert",
            metavar="PEM",
            help="present this client certificate, to a coordinator that requires one (mTLS)",
        )
        group.add_argument("--key", metavar="PEM", help="the client certificate's private key")
        group.add_argument(
            "--server-name",
            metavar="NAME",
            help="the name the coordinator's certificate carries, when --target names another "
            "host or an IP address",
        )
        group.add_argument(
            "--tls",
            action="store_true",
            help="TLS trusting the system's CAs (implied by --ca, --cert, --key, --server-name)",
        )
        group.add_argument(
            "--token-file",
            metavar="FILE",
            help="send the bearer token this file holds with every call. There is no --token "
            "flag: a token on a command line shows in shell history and to ps; use this, "
            "$SAGA_TOKEN_FILE or $SAGA_TOKEN",
        )
        group.add_argument("--token", nargs="?", action=_NoTokenFlag, help=argparse.SUPPRESS)

    def filters(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--definition", help="only sagas of this definition")
        sub.add_argument(
            "--version",
            type=_positive,
            default=0,
            help="only sagas of this version of the definition (needs --definition)",
        )
        sub.add_argument(
            "--label",
            type=_label,
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="only sagas carrying this label (repeatable: every one must match)",
        )
        sub.add_argument(
            "--since",
            type=parse_moment,
            metavar="WHEN",
            help="only sagas created since: a duration ago (1h, 30d) or an ISO time",
        )
        sub.add_argument(
            "--until",
            type=parse_moment,
            metavar="WHEN",
            help="only sagas created before: a duration ago or an ISO time",
        )
        sub.add_argument(
            "--stuck-on",
            metavar="PARTICIPANT",
            help="only unfinished or parked sagas waiting on a step of this participant",
        )
        sub.add_argument(
            "--stuck-on-step",
            metavar="STEP",
            help="only unfinished or parked sagas waiting on the step of this name",
        )

    def operator(name: str, help: str, *, step: bool = True) -> argparse.ArgumentParser:
        sub = client(commands, name, help)
        sub.add_argument("saga_id", metavar="ID")
        if step:
            sub.add_argument(
                "step", metavar="STEP", nargs="?", default="", help="default: the step it waits on"
            )
        sub.add_argument("--reason", required=True, help="why (required; recorded in the audit)")
        sub.add_argument("--actor", help="who acts (default: $SAGA_ACTOR, else user@host)")
        sub.add_argument(
            "--expected-version",
            type=_non_negative,
            default=0,
            metavar="N",
            help="act only if the saga is still at this version (else refused, exit 1)",
        )
        return sub

    start = client(commands, "start", "start a saga")
    start.add_argument("definition", help="definition name")
    start.add_argument("--input", default="{}", help="input payload as JSON (default {})")
    start.add_argument("--id", dest="saga_id", help="saga id (the idempotency key)")
    start.add_argument("--version", type=int, default=0, help="definition version (0: newest)")
    start.add_argument(
        "--label",
        type=_label,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a label to find the saga by (repeatable)",
    )
    start.add_argument("--wait", action="store_true", help="wait for the saga to end")
    start.add_argument("--timeout", type=float, default=None, help="seconds to wait at most")

    get = client(commands, "get", "show a saga: its steps, labels, audit trail (and events)")
    get.add_argument("saga_id", metavar="ID")
    get.add_argument("--events", action="store_true", help="also show its event log")

    listing = client(commands, "list", "list sagas, oldest first")
    listing.add_argument(
        "--state", action="append", default=[], help="only sagas in this state (repeatable)"
    )
    filters(listing)
    listing.add_argument("--limit", type=_positive, default=100, help="at most this many")

    count = client(commands, "count", "count sagas per state, NEEDS_ATTENTION first")
    filters(count)

    cancel = client(commands, "cancel", "cancel a running saga (it compensates)")
    cancel.add_argument("saga_id", metavar="ID")
    cancel.add_argument("--reason", default="", help="why, recorded with the saga")
    cancel.add_argument("--actor", help="who acts (default: $SAGA_ACTOR, else user@host)")

    operator("retry", "send a step's pending call again now (a parked step gets a fresh budget)")
    resume = operator(
        "resume", "compensate again a saga parked on a failed compensation", step=False
    )
    resume.add_argument(
        "--max-attempts",
        type=_positive,
        help="the compensation's attempts from now on (default: the definition's)",
    )
    resume.add_argument("--initial-backoff", type=parse_duration, metavar="DURATION")
    resume.add_argument("--max-backoff", type=parse_duration, metavar="DURATION")
    operator("mark-compensated", "record a step as undone by hand; compensating goes on")
    complete = client(
        commands,
        "complete",
        "record a stuck pivot or retriable step as succeeded; the saga goes on",
    )
    complete.add_argument("saga_id", metavar="ID")
    complete.add_argument(
        "step", metavar="STEP", nargs="?", default="", help="default: the step it waits on"
    )
    complete.add_argument("--reason", required=True, help="why (required; recorded in the audit)")
    complete.add_argument("--actor", help="who acts (default: $SAGA_ACTOR, else user@host)")
    complete.add_argument(
        "--expected-version",
        type=_non_negative,
        default=0,
        metavar="N",
        help="act only if the saga is still at this version (else refused, exit 1)",
    )
    complete.add_argument(
        "--result",
        dest="step_output",
        metavar="JSON",
        help="the step's output as JSON, as its participant would have answered; later steps "
        "receive it (default: none)",
    )

    watch = client(commands, "watch", "follow a saga's changes until it ends")
    watch.add_argument("saga_id", metavar="ID")

    events = client(
        commands,
        "events",
        "show a saga's event log; without ID, the change feed of every saga",
        description="With ID: the saga's event log, one line per event. Without ID: the "
        "change feed, every change of every saga in commit order, each with its position "
        "(@N); --from N resumes after a position, --follow keeps following new changes.",
    )
    events.add_argument("saga_id", metavar="ID", nargs="?")
    events.add_argument(
        "--from",
        dest="after_position",
        type=_non_negative,
        default=0,
        metavar="POSITION",
        help="the feed after this position (default: from the oldest kept)",
    )
    events.add_argument("--follow", "-f", action="store_true", help="keep following the feed")
    events.add_argument("--definition", help="only changes of this definition's sagas")
    events.add_argument(
        "--state",
        action="append",
        default=[],
        metavar="STATE",
        help="only changes after which the saga is in this state (repeatable)",
    )
    events.add_argument(
        "--label",
        action="append",
        type=_label,
        default=[],
        metavar="K=V",
        help="only changes of sagas with this label (repeatable)",
    )

    prune = client(commands, "prune", "remove the sagas that ended long ago, with their events")
    prune.add_argument(
        "--older-than",
        type=parse_duration,
        required=True,
        metavar="DURATION",
        help="sagas that ended longer ago than this, e.g. 90s, 15m, 12h, 30d",
    )
    prune.add_argument("--dry-run", action="store_true", help="count them, remove nothing")

    definitions = commands.add_parser(
        "definitions",
        help="list, show, register, check and draw saga definitions",
        description="List, show, register, check and draw saga definitions.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    registry = definitions.add_subparsers(
        dest="definitions_command", required=True, metavar="COMMAND"
    )
    listed = client(registry, "list", "the definitions, their versions and unfinished sagas")
    listed.add_argument("name", nargs="?", help="only this definition")
    show = client(registry, "show", "one definition's steps, and its versions")
    show.add_argument("definition", type=_name_and_version, metavar="NAME[@VERSION]")
    apply = client(registry, "apply", "register a file's definition (a new version)")
    apply.add_argument("file", type=Path, metavar="FILE")
    lint = registry.add_parser(
        "lint",
        help="check definition files offline, as the coordinator would",
        description="Check definition files offline, exactly as the coordinator checks its "
        "definition files, and warn about steps without an explicit timeout or retry policy. "
        "Participants are checked only against a configuration given with --config. "
        "Exits 0 when every file is valid (warnings or not), 2 when one is invalid.",
    )
    lint.add_argument("files", type=Path, nargs="+", metavar="FILE")
    lint.add_argument(
        "--config", type=Path, help="the coordinator's configuration, to check participants"
    )
    formats(lint)
    graph = client(
        registry,
        "graph",
        "draw a definition as a Mermaid flowchart",
        description="Print a Mermaid flowchart of a registered definition (or of a definition "
        "file): the steps in order, the pivot and retriable steps marked, and each "
        "compensation as a dotted edge going backwards.",
    )
    graph.add_argument("definition", metavar="NAME[@VERSION]|FILE")

    console_command = commands.add_parser(
        "console",
        help="serve the web console: sagas, their timelines and repairs, in a browser",
        description="Serve the web console, a client of the coordinator like any other: the "
        "sagas with counts and filters, the parked ones grouped, one saga's timeline, log and "
        "audit trail, the operator actions behind a confirmation, and the definitions.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    connection(console_command)
    console_flags.add_arguments(console_command)

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
            "each side runs in a process of its own. With --database or --postgresql, also "
            "replicas sharing one PostgreSQL database (1, 2 and 3 of them, or --replicas), "
            "beside the coordinator on SQLite. Exits 1 if a case made the wrong calls, 2 if "
            "it could not run.",
        )
    )

    # Parsed by the SDK's kit itself (see main); listed here for `saga --help`.
    commands.add_parser(
        "conformance",
        help="check a participant, in any language, against the contract",
        add_help=False,
    )
    return parser


def _tls_flags(args: argparse.Namespace, configured: ServerTls | None) -> ServerTls | None:
    """TLS from the flags (over the file's), or None when no flag names it."""
    if not (args.tls_certificate or args.tls_key or args.tls_client_ca):
        return None
    certificate = args.tls_certificate or (configured and str(configured.certificate))
    key = args.tls_key or (configured and str(configured.key))
    if not certificate or not key:
        raise ConfigError("flags: --tls-certificate and --tls-key go together")
    client_ca = args.tls_client_ca or (configured and configured.client_ca)
    return ServerTls(
        Path(certificate),
        Path(key),
        None if not client_ca else Path(client_ca),
        configured.allowed_clients if configured else (),
    )


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
                "retention": args.retention,
                "replica": args.replica,
                "lease": args.lease,
                "tls": _tls_flags(args, settings.tls),
                "auth": None if args.tokens is None else AuthSettings(tokens=Path(args.tokens)),
                "insecure_plaintext": args.insecure_plaintext,
                "reflection": args.reflection,
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


def _exit_code(error: sdk_errors.SagaRpcError) -> int:
    """The exit code a coordinator's refusal maps to (see EPILOG)."""
    if error.code == grpc.StatusCode.NOT_FOUND:
        return EXIT_NOT_FOUND
    if error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return EXIT_UNREACHABLE
    if error.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
        return EXIT_USAGE
    if error.code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return EXIT_DENIED
    return EXIT_REFUSED


def _print_json(value: object) -> None:
    print(json.dumps(value))


def _time_json(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _payload_json(data: bytes | None) -> object:
    if data is None:
        return None
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return {"bytes": len(data)}


def _audit_json(entry: AuditEntry) -> dict[str, object]:
    return {
        "sequence": entry.sequence,
        "time": _time_json(entry.time),
        "actor": entry.actor,
        "action": entry.action.value,
        "step": entry.step,
        "reason": entry.reason,
    }


def _saga_json(saga: Saga) -> dict[str, object]:
    return {
        "saga_id": saga.saga_id,
        "definition": saga.definition,
        "definition_version": saga.definition_version,
        "state": saga.state.value,
        "input": _payload_json(saga.input),
        "failure": None if saga.failure is None else vars(saga.failure),
        "cancel_reason": saga.cancel_reason,
        "version": saga.version,
        "labels": dict(saga.labels),
        "create_time": _time_json(saga.create_time),
        "update_time": _time_json(saga.update_time),
        "end_time": _time_json(saga.end_time),
        "deadline_time": _time_json(saga.deadline_time),
        "steps": [
            {
                "name": step.name,
                "participant": step.participant,
                "kind": step.kind.value,
                "state": step.state.value,
                "execute_attempts": step.execute_attempts,
                "compensate_attempts": step.compensate_attempts,
                "output": _payload_json(step.output),
                "failure": None if step.failure is None else vars(step.failure),
                "by_operator": step.by_operator,
                "next_attempt_time": _time_json(step.next_attempt_time),
            }
            for step in saga.steps
        ],
        "audit": [_audit_json(entry) for entry in saga.audit],
    }


def _event_json(event: SagaEvent) -> dict[str, object]:
    return {
        "sequence": event.sequence,
        "type": event.type.value,
        "time": _time_json(event.time),
        "step": event.step,
        "operation": event.operation,
        "action": event.action,
        "attempt": event.attempt,
        "emits": event.emits,
        "actor": event.actor,
        "reason": event.reason,
        "failure": None if event.failure is None else vars(event.failure),
    }


def _seconds(value: timedelta) -> str:
    """A duration as definition files write it, e.g. "90s", "0.25s"."""
    return f"{value.total_seconds():.3f}".rstrip("0").rstrip(".") + "s"


def _retry_json(policy: RetryPolicy) -> dict[str, object]:
    # Zero means "the default" in the proto; a file refuses an explicit zero, so leave it out.
    fields: dict[str, object] = {}
    if policy.max_attempts:
        fields["max_attempts"] = policy.max_attempts
    if policy.initial_backoff:
        fields["initial_backoff"] = _seconds(policy.initial_backoff)
    if policy.max_backoff:
        fields["max_backoff"] = _seconds(policy.max_backoff)
    if policy.backoff_multiplier:
        fields["backoff_multiplier"] = policy.backoff_multiplier
    if policy.jitter is not None:
        fields["jitter"] = policy.jitter
    return fields


def _definition_json(definition: SagaDefinition) -> dict[str, object]:
    """The definition in the form of a definition file."""
    result: dict[str, object] = {"name": definition.name, "version": definition.version}
    if definition.description:
        result["description"] = definition.description
    if definition.deadline:
        result["deadline"] = _seconds(definition.deadline)
    if definition.retry is not None:
        result["retry"] = _retry_json(definition.retry)
    if definition.compensation_retry is not None:
        result["compensation_retry"] = _retry_json(definition.compensation_retry)
    steps = []
    for step in definition.steps:
        entry: dict[str, object] = {
            "name": step.name,
            "participant": step.participant,
            "action": step.action,
        }
        if step.compensation:
            entry["compensation"] = step.compensation
        entry["kind"] = step.kind.value.lower()
        if step.timeout:
            entry["timeout"] = _seconds(step.timeout)
        if step.retry is not None:
            entry["retry"] = _retry_json(step.retry)
        if step.compensation_retry is not None:
            entry["compensation_retry"] = _retry_json(step.compensation_retry)
        if step.max_attempts:
            entry["max_attempts"] = step.max_attempts
        if step.emits:
            entry["emits"] = step.emits
        steps.append(entry)
    result["steps"] = steps
    return result


def _version_json(info: DefinitionVersion) -> dict[str, object]:
    return {
        "version": info.version,
        "register_time": _time_json(info.register_time),
        "digest": info.digest,
        "unfinished_sagas": info.unfinished_sagas,
        "step_count": info.step_count,
    }


def _summary_json(summary: DefinitionSummary) -> dict[str, object]:
    return {
        "name": summary.name,
        "description": summary.description,
        "versions": [_version_json(v) for v in summary.versions],
    }


def _print_list(out: Console, sagas: Sequence[Saga], *, as_json: bool) -> None:
    if as_json:
        _print_json([_saga_json(s) for s in sagas])
        return
    table = Table("saga", "definition", "state", "created", "steps", "labels")
    for saga in sagas:
        done = sum(1 for s in saga.steps if s.state.value == "SUCCEEDED")
        table.add_row(
            saga.saga_id,
            f"{saga.definition} v{saga.definition_version}",
            f"[{SAGA_STYLE[saga.state]}]{saga.state.value}[/]",
            saga.create_time.isoformat(timespec="seconds") if saga.create_time else "",
            f"{done}/{len(saga.steps)} succeeded",
            labels_text(saga.labels),
        )
    out.print(table)


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    if args.version and not args.definition:
        raise UsageError("--version needs --definition")
    return {
        "definition": args.definition,
        "definition_version": args.version,
        "labels": dict(args.label),
        "created_after": args.since,
        "created_before": args.until,
        "stuck_on_participant": args.stuck_on,
        "stuck_on_step": args.stuck_on_step,
    }


def _show_saga(out: Console, args: argparse.Namespace, saga: Saga, headline: str = "") -> None:
    if args.output == "json":
        _print_json(_saga_json(saga))
        return
    if headline:
        out.print(headline)
    out.print(saga_panel(saga))


def _acted(verb: str, saga: Saga, step: str) -> str:
    where = f" step {step}" if step else ""
    return f"{verb} sagas/{saga.saga_id}{where}: now {saga.state.value} (version {saga.version})"


def _start(client: SagaClient, args: argparse.Namespace, out: Console) -> int:
    try:
        payload = json.loads(args.input)
    except json.JSONDecodeError as error:
        raise UsageError(f"--input is not valid JSON: {error}") from None
    result = client.create(
        args.definition,
        payload,
        saga_id=args.saga_id,
        definition_version=args.version,
        labels=dict(args.label),
    )
    saga = result.saga
    if args.wait:
        saga = client.wait(saga.saga_id, timeout=args.timeout)
        _show_saga(out, args, saga)
        return EXIT_OK if saga.state is SagaState.SUCCEEDED else EXIT_REFUSED
    if args.output == "json":
        _print_json(_saga_json(saga))
    else:
        verb = "started" if result.created else "already exists:"
        out.print(f"{verb} sagas/{saga.saga_id} ({saga.state.value})")
    return EXIT_OK


def _get(client: SagaClient, args: argparse.Namespace, out: Console) -> int:
    saga = client.get(args.saga_id)
    events = list(client.events(args.saga_id)) if args.events else None
    if args.output == "json":
        shown = _saga_json(saga)
        if events is not None:
            shown["events"] = [_event_json(e) for e in events]
        _print_json(shown)
    else:
        # The log names the event each succeeded step stands for (its definition's emits).
        log = events if events is not None else list(client.events(args.saga_id))
        out.print(saga_panel(saga, log))
        for line in event_lines(events or ()):
            out.print(line, soft_wrap=True)
    return EXIT_OK


def _states(values: Sequence[str]) -> list[SagaState]:
    try:
        return [SagaState(value.upper()) for value in values]
    except ValueError:
        known = ", ".join(s.value for s in SagaState if s is not SagaState.UNSPECIFIED)
        raise UsageError(f"--state: expected one of {known}") from None


def _list(client: SagaClient, args: argparse.Namespace, out: Console) -> int:
    states = _states(args.state)
    sagas: list[Saga] = []
    page_size = min(args.limit, 1000)
    for saga in client.list(states=states, page_size=page_size, **_filters(args)):
        sagas.append(saga)
        if len(sagas) >= args.limit:
            break
    _print_list(out, sagas, as_json=args.output == "json")
    return EXIT_OK


def _count(client: SagaClient, args: argparse.Namespace, out: Console) -> int:
    counts = client.count(**_filters(args))
    if args.output == "json":
        ordered = sorted(counts.counts, key=lambda s: s is not SagaState.NEEDS_ATTENTION)
        _print_json({"counts": {s.value: counts.counts[s] for s in ordered}, "total": counts.total})
    else:
        out.print(counts_table(counts))
    return EXIT_OK


def _cancel(client: SagaClient, args: argparse.Namespace, out: Console) -> int:
    saga = client.cancel(args.saga_id, args.reason, actor=args.actor)
    _show_saga(out, args, saga, _acted("cancelled", saga, ""))
    return EXIT_OK


def _retry(client: SagaClient, args: argparse.Namespace, out: Console) -> int:
    saga = client.retry(
        args.saga_id,
        args.step,
        reason=args.reason,
        actor=args.actor,
        expected_version=args.expected_version,
    )
    _show_saga(out, args, saga, _acted("retry sent for", saga, args.step))
    return EXIT_OK


def _resume(client: SagaClient, args: argparse.Namespace, out: Console) -> int:
    policy = None
    if args.max_attempts or args.initial_backoff or args.max_backoff:
        if (
            args.initial_backoff is not None
            and args.max_backoff is not None
            and args.max_backoff < args.initial_backoff
        ):
            raise UsageError("--max-backoff must not be below --initial-backoff")
        policy = RetryPolicy(
            max_attempts=args.max_attempts or 0,
            initial_backoff=args.initial_backoff,
            max_backoff=args.max_backoff,
        )
    saga = client.resume(
        args.saga_id,
        reason=args.reason,
        actor=args.actor,
        expected_version=args.expected_version,
        compensation_retry=policy,
    )
    _show_saga(out, args, saga, _acted("resumed", saga, ""))
    return EXIT_OK


def _mark_compensated(client: SagaClient, args: argparse.Namespace, out: Console) -> int:
    saga = client.mark_compensated(
        args.saga_id,
        args.step,
        reason=args.reason,
        actor=args.actor,
        expected_version=args.expected_version,
    )
    _show_saga(out, args, saga, _acted("marked compensated:", saga, args.step))
    return EXIT_OK


def _complete(client: SagaClient, args: argparse.Namespace, out: Console) -> int:
    output = None
    if args.step_output is not None:
        try:
            output = json.loads(args.step_output)
        except json.JSONDecodeError as error:
            raise UsageError(f"--result is not valid JSON: {error}") from None
        if output is None:
            output = b"null"  # an explicit JSON null, not "no output"
    saga = client.complete(
        args.saga_id,
        args.step,
        reason=args.reason,
        output=output,
        actor=args.actor,
        expected_version=args.expected_version,
    )
    _show_saga(out, args, saga, _acted("completed", saga, args.step))
    return EXIT_OK


def _watch(client: SagaClient, args: argparse.Namespace, out: Console) -> int:
    for update in client.watch(args.saga_id):
        if args.output == "json":
            shown = _saga_json(update.saga)
            shown["event"] = None if update.event is None else _event_json(update.event)
            _print_json(shown)
        else:
            out.print(update_line(update), soft_wrap=True)
    return EXIT_OK


def _events(client: SagaClient, args: argparse.Namespace, out: Console) -> int:
    if args.saga_id is None:
        return _feed(client, args, out)
    feed_only = args.follow or args.after_position or args.definition or args.state or args.label
    if feed_only:
        raise UsageError(
            "--from, --follow, --definition, --state and --label read the change "
            "feed: give them without a saga ID"
        )
    events = list(client.events(args.saga_id))
    if args.output == "json":
        _print_json([_event_json(e) for e in events])
    else:
        for line in event_lines(events):
            out.print(line, soft_wrap=True)
    return EXIT_OK


def _feed(client: SagaClient, args: argparse.Namespace, out: Console) -> int:
    changes = client.changes(
        args.after_position,
        definition=args.definition,
        states=_states(args.state),
        labels=dict(args.label),
        follow=args.follow,
    )
    for change in changes:
        if args.output == "json":
            print(
                json.dumps(
                    {
                        "position": change.position,
                        "saga_id": change.saga_id,
                        "definition": change.definition,
                        "definition_version": change.definition_version,
                        "state": change.state.value,
                        "labels": dict(change.labels),
                        "event": _event_json(change.event),
                    }
                ),
                flush=True,
            )
        else:
            out.print(change_line(change), soft_wrap=True)
    return EXIT_OK


def _prune(client: SagaClient, args: argparse.Namespace, out: Console) -> int:
    result = client.prune(args.older_than, dry_run=args.dry_run)
    if args.output == "json":
        _print_json(
            {
                "sagas": result.sagas,
                "events": result.events,
                "cutoff": _time_json(result.cutoff),
                "dry_run": result.dry_run,
            }
        )
    else:
        verb = "would prune" if result.dry_run else "pruned"
        out.print(
            f"{verb} {result.sagas} sagas ({result.events} events) "
            f"that ended before {timestamp(result.cutoff)}"
        )
    return EXIT_OK


def _definitions_list(client: SagaClient, args: argparse.Namespace, out: Console) -> int:
    summaries = client.definitions(args.name)
    if args.name and not summaries:
        raise sdk_errors.NotFound(
            grpc.StatusCode.NOT_FOUND,
            f"no saga definition named {args.name!r}",
            reason="DEFINITION_NOT_FOUND",
        )
    if args.output == "json":
        _print_json([_summary_json(s) for s in summaries])
    else:
        out.print(definitions_table(summaries))
    return EXIT_OK


def _definitions_show(client: SagaClient, args: argparse.Namespace, out: Console) -> int:
    name, version = args.definition
    registered = client.definition(name, version)
    versions: tuple[DefinitionVersion, ...] = ()
    for summary in client.definitions(name):
        if summary.name == name:
            versions = summary.versions
    if args.output == "json":
        _print_json(
            {
                "definition": _definition_json(registered.definition),
                "info": None if registered.info is None else _version_json(registered.info),
                "versions": [_version_json(v) for v in versions],
            }
        )
    else:
        out.print(definition_view(registered.definition, versions))
    return EXIT_OK


def _definitions_apply(client: SagaClient, args: argparse.Namespace, out: Console) -> int:
    from coordinator.transport.definition_files import read_definition_message

    message = read_definition_message(args.file)
    result = client.register_definition(message)
    definition = result.definition
    if args.output == "json":
        _print_json(
            {
                "created": result.created,
                "name": definition.name,
                "version": definition.version,
                "info": None if result.info is None else _version_json(result.info),
            }
        )
    elif result.created:
        out.print(f"created {definition.name} v{definition.version} ({args.file})")
    else:
        out.print(
            f"unchanged: {definition.name} v{definition.version} is registered already "
            f"with the same content ({args.file})"
        )
    return EXIT_OK


def _definitions_graph(client: SagaClient, args: argparse.Namespace, out: Console) -> int:
    from coordinator.transport.definition_files import SUFFIXES, read_definition_message

    path = Path(args.definition)
    if path.suffix in SUFFIXES and path.is_file():
        definition = definition_from_proto(read_definition_message(path))
    else:
        name, version = _name_and_version(args.definition)
        definition = client.definition(name, version).definition
    chart = definition_mermaid(definition)
    if args.output == "json":
        _print_json({"name": definition.name, "version": definition.version, "mermaid": chart})
    else:
        sys.stdout.write(chart)
    return EXIT_OK


Handler = Callable[[SagaClient, argparse.Namespace, Console], int]

HANDLERS: dict[str, Handler] = {
    "start": _start,
    "get": _get,
    "list": _list,
    "count": _count,
    "cancel": _cancel,
    "retry": _retry,
    "resume": _resume,
    "mark-compensated": _mark_compensated,
    "complete": _complete,
    "watch": _watch,
    "events": _events,
    "prune": _prune,
    "definitions list": _definitions_list,
    "definitions show": _definitions_show,
    "definitions apply": _definitions_apply,
    "definitions graph": _definitions_graph,
}


def _command_name(args: argparse.Namespace) -> str:
    if args.command == "definitions":
        return f"definitions {args.definitions_command}"
    return str(args.command)


def _hint(error: sdk_errors.SagaRpcError, connection: Connection) -> str:
    """What to check, after a refusal that the connection's settings may explain."""
    if error.code == grpc.StatusCode.UNAUTHENTICATED and connection.token is None:
        return " (give a token: --token-file FILE, $SAGA_TOKEN_FILE or $SAGA_TOKEN)"
    if _exit_code(error) != EXIT_UNREACHABLE:
        return ""
    if connection.tls is None:
        return (
            f" (is the coordinator running at {connection.target}? If it serves TLS, give "
            "--ca, and --cert and --key if it requires a client certificate)"
        )
    return (
        f" (is the coordinator running at {connection.target}, and do --ca, --cert, --key and "
        "--server-name fit its certificate and what it requires?)"
    )


def _client_command(args: argparse.Namespace) -> int:
    out = console()
    name = _command_name(args)
    handler = HANDLERS[name]
    try:
        connection = Connection.from_environment(
            target=args.target,
            tls=args.tls,
            ca=args.ca,
            certificate=args.cert,
            key=args.key,
            server_name=args.server_name,
            token_file=args.token_file,
        )
    except ValueError as error:
        print(f"saga {name}: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with SagaClient(connection.target, tls=connection.tls, token=connection.token) as client:
            return handler(client, args, out)
    except (UsageError, ValueError, argparse.ArgumentTypeError) as error:
        print(f"saga {name}: {error}", file=sys.stderr)
        return EXIT_USAGE
    except InvalidDefinition as error:
        print(f"saga {name}: {error.message}", file=sys.stderr)
        return EXIT_USAGE
    except sdk_errors.SagaRpcError as error:
        code = _exit_code(error)
        detail = "".join(f"\n  {v.field}: {v.description}" for v in error.field_violations)
        reason = f" {error.reason}" if error.reason else ""
        print(
            f"saga {name}: {error.code.name}{reason}: {error.message}"
            f"{_hint(error, connection)}{detail}",
            file=sys.stderr,
        )
        return code
    except sdk_errors.SagaSdkError as error:
        print(f"saga {name}: {error}", file=sys.stderr)
        return EXIT_REFUSED


def _lint_warnings(definition: SagaDefinition) -> list[tuple[str, str]]:
    """What a file leaves to the defaults that an operator usually wants to decide."""
    warnings = []
    for index, step in enumerate(definition.steps):
        where = f"steps[{index}] {step.name}"
        if step.timeout is None:
            warnings.append(
                (where, f"no timeout: each call waits the default {_seconds(DEFAULT_TIMEOUT)}")
            )
        if step.retry is None and definition.retry is None:
            warnings.append((where, "no retry policy, on the step or the definition: defaults"))
        if (
            step.compensation
            and step.compensation_retry is None
            and definition.compensation_retry is None
        ):
            warnings.append(
                (where, "no compensation retry policy, on the step or the definition: defaults")
            )
        if step.kind in (StepKind.PIVOT, StepKind.RETRIABLE) and not step.max_attempts:
            warnings.append(
                (where, f"{step.kind.value.lower()} step without max_attempts: retried forever")
            )
    return warnings


def _lint(args: argparse.Namespace) -> int:
    """Check definition files offline, as `saga serve` checks its definitions directory."""
    from coordinator.transport.definition_files import (
        load_definition_file,
        read_definition_message,
    )

    out = console()
    participants: set[str] | None = None
    if args.config is not None:
        try:
            participants = set(load_settings(args.config).participants)
        except ConfigError as error:
            print(f"saga definitions lint: {error}", file=sys.stderr)
            return EXIT_USAGE
    reports: list[dict[str, object]] = []
    invalid = False
    for path in args.files:
        report: dict[str, object] = {"file": str(path)}
        try:
            message = read_definition_message(path)
            # Without a configuration the participants cannot be known: take the file's own.
            known = participants
            if known is None:
                known = {step.participant for step in message.steps if step.participant}
            load_definition_file(path, known)
        except InvalidDefinition as error:
            invalid = True
            report.update(
                valid=False,
                message=error.message,
                errors=[{"field": v.field, "description": v.description} for v in error.violations],
            )
            reports.append(report)
            continue
        definition = definition_from_proto(message)
        report.update(
            valid=True,
            name=definition.name,
            version=definition.version,
            participants_checked=participants is not None,
            warnings=[{"field": f, "warning": w} for f, w in _lint_warnings(definition)],
        )
        reports.append(report)
    if args.output == "json":
        _print_json(reports)
    else:
        _print_lint(out, reports)
    return EXIT_USAGE if invalid else EXIT_OK


def _print_lint(out: Console, reports: Iterable[dict[str, Any]]) -> None:
    for report in reports:
        if not report["valid"]:
            out.print(Text(f"{report['file']}: invalid", style="bold red"), soft_wrap=True)
            for problem in report["errors"] or [{"field": "", "description": report["message"]}]:
                field = f"{problem['field']}: " if problem["field"] else ""
                out.print(f"  error: {field}{problem['description']}", soft_wrap=True)
            continue
        warnings = report["warnings"]
        summary = f"{report['file']}: valid ({report['name']} v{report['version']})"
        out.print(Text(summary, style="green"), soft_wrap=True)
        for warning in warnings:
            out.print(
                Text(f"  warning: {warning['field']}: {warning['warning']}", style="yellow"),
                soft_wrap=True,
            )
        if not report["participants_checked"]:
            out.print(
                Text("  note: participants not checked (give --config FILE)", style="dim"),
                soft_wrap=True,
            )


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
    if args.command == "console":
        return console_flags.main(args)
    if args.command == "check-store":
        return _check_store(args.database)
    if args.command == "definitions" and args.definitions_command == "lint":
        return _lint(args)
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
