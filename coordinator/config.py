"""The coordinator's settings: one frozen object, read from a YAML file and flags, built once."""

from __future__ import annotations

import ipaddress
import logging
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_DURATION_UNITS = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 7 * 86400.0,
}
log = logging.getLogger("coordinator.config")

_REPLICA = re.compile(r"^[A-Za-z0-9._:-]{1,100}$")
ADDRESS_PATTERN = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+|unix):[0-9A-Za-z/._-]+$")


class ConfigError(Exception):
    """The configuration is invalid; the message names the file and the field."""


@dataclass(frozen=True)
class ParticipantEndpoint:
    """Where a named participant is reached. Definitions name participants, never addresses."""

    address: str
    """``host:port`` of the participant's gRPC server."""
    tls: bool = False
    """Dial with TLS; never falls back to plaintext. A participant whose certificate is
    expired, signed by another CA or made out to another name is never called: the handshake
    fails and the call is retried as a transient error."""
    root_certificates: bytes | None = None
    """PEM roots to verify the participant with (TLS only); None means the system's roots."""
    client_certificate: bytes | None = None
    """PEM certificate chain the coordinator presents to the participant (mTLS; TLS only,
    with ``client_key``)."""
    client_key: bytes | None = None
    """PEM private key of ``client_certificate``."""
    server_name: str | None = None
    """The name the participant's certificate must be made out to, when it is not the host of
    ``address`` (TLS only)."""

    def __post_init__(self) -> None:
        # TLS settings without TLS would be ignored, and the calls sent in plaintext.
        given = [
            name
            for name in ("root_certificates", "client_certificate", "client_key", "server_name")
            if getattr(self, name) is not None
        ]
        if given and not self.tls:
            raise ValueError(f"{', '.join(given)} need tls")
        if (self.client_certificate is None) != (self.client_key is None):
            raise ValueError("client_certificate and client_key go together")


@dataclass(frozen=True)
class ServerTls:
    """TLS on the coordinator's port: its certificate and key files, and optionally the CA
    of its clients (mTLS) and the client identities admitted."""

    certificate: Path
    key: Path
    client_ca: Path | None = None
    """Require a client certificate signed by this CA (mTLS)."""
    allowed_clients: tuple[str, ...] = ()
    """Admit only client certificates with one of these identities: ``CN=name``,
    ``DNS:host.name``, ``URI:spiffe://...`` or ``IP:10.0.0.7`` (empty: any from the CA)."""


@dataclass(frozen=True)
class JwtSettings:
    """Bearer tokens that are signed JWTs."""

    key: Path
    """The issuer's public key (PEM), or the shared secret for HS256/384/512."""
    algorithms: tuple[str, ...] = ("RS256",)
    issuer: str | None = None
    audience: str | None = None


@dataclass(frozen=True)
class AuthSettings:
    """Who may call: bearer tokens from a file of static tokens, signed JWTs, or both."""

    tokens: Path | None = None
    """The file of static tokens (their SHA-256, names, roles, definitions)."""
    jwt: JwtSettings | None = None


EVENT_LOOPS = ("asyncio", "uvloop")
"""The event loops ``saga serve`` can run on."""


@dataclass(frozen=True)
class Settings:
    """Everything ``saga serve`` needs to run."""

    database: str = "sqlite:///saga.db"
    """Store URL: ``sqlite:///relative.db``, ``sqlite:////absolute.db`` or ``memory:``."""
    listen: str = "127.0.0.1:50051"
    """Address the gRPC server listens on."""
    definitions: Path = Path("definitions")
    """Directory of saga definitions (``*.yaml``, ``*.yml``, ``*.json``)."""
    participants: Mapping[str, ParticipantEndpoint] = field(default_factory=dict)
    """Participants by name."""
    synchronous: str = "FULL"
    """SQLite ``synchronous`` setting: FULL (no acknowledged write lost on power loss) or NORMAL."""
    busy_timeout_ms: int = 5000
    """How long a SQLite write waits for a lock before the request fails as UNAVAILABLE."""
    shutdown_grace: float = 10.0
    """Seconds calls in flight may take to finish on SIGTERM before they are cut off."""
    max_payload_bytes: int = 1024 * 1024
    """Largest saga input accepted by CreateSaga, and largest step output accepted from a
    participant (a larger one fails the step)."""
    max_message_bytes: int = 4 * 1024 * 1024
    """Largest gRPC message sent or received."""
    max_calls_per_participant: int = 64
    """Calls in flight to one participant at most; the other sagas wait their turn."""
    log_level: str = "INFO"
    """Logging level."""
    log_format: str = "text"
    """Log lines as ``text`` or ``json`` (one object per line, with saga id, step, trace id)."""
    log_payloads: bool = False
    """Log saga inputs and step outputs (off: payloads may hold personal data)."""
    otlp_endpoint: str | None = None
    """OTLP/gRPC endpoint for traces and metrics (what Jaeger ingests on 4317), e.g.
    ``http://127.0.0.1:4317``. Unset: the standard ``OTEL_EXPORTER_OTLP_*`` variables, else
    nothing is exported."""
    otlp_timeout: float = 2.0
    """Seconds an export may take; a collector that is down costs at most this, off the path
    of sagas."""
    metrics_interval: float = 10.0
    """Seconds between two OTLP metric exports."""
    metrics_listen: str | None = None
    """``host:port`` of a Prometheus scrape endpoint (``/metrics``); unset: none."""
    service_name: str = "saga-coordinator"
    """``service.name`` of the telemetry (``OTEL_SERVICE_NAME`` wins)."""
    event_loop: str = "asyncio"
    """The event loop: ``asyncio`` (the standard library's) or ``uvloop`` (faster, where the
    ``uvloop`` package is installed; ``saga bench`` measures both)."""
    feed_stall_timeout: float = 30.0
    """Seconds a change feed consumer may leave a message unread before it is cut off
    (RESOURCE_EXHAUSTED; it resumes from its position)."""
    retention: timedelta | None = None
    """Sagas that ended SUCCEEDED or COMPENSATED longer ago than this are pruned, with their
    events, in the background (``30d``, ``12h``); unset: kept for ever. Parked and running
    sagas are never pruned."""
    tls: ServerTls | None = None
    """TLS (and optionally mTLS) on ``listen``. Without it the port is plaintext, which is
    allowed only on a loopback address unless ``insecure_plaintext`` says otherwise."""
    auth: AuthSettings | None = None
    """Bearer tokens every call must carry; unset: callers are not authenticated."""
    insecure_plaintext: bool = False
    """Serve plaintext (the gRPC port, the metrics endpoint) on an address other than loopback:
    anyone on the network can then read and forge calls."""
    reflection: bool = True
    """Serve gRPC reflection (it lists the services served, nothing else)."""
    max_streams_per_caller: int = 100
    """Watches and change feeds one caller may hold open at once."""
    create_rate_per_caller: float = 0.0
    """Sagas one caller may create per second, on average (0: no limit); above it, creations
    are refused with RESOURCE_EXHAUSTED and a RetryInfo."""
    create_burst_per_caller: int = 100
    """Creations one caller may make at once above its rate."""
    replica: str | None = None
    """This process's name among the replicas on one store. Unset: the host's name and the
    listening port, which a restarted process keeps (it then takes its sagas up at once)."""
    lease: timedelta = timedelta(seconds=10)
    """How long this replica holds its sagas without renewing (every third of it), by the
    store's clock: how long the others wait before taking over the sagas of one that died."""


def parse_duration(value: str) -> timedelta:
    """A duration like 90s, 15m, 12h, 30d, 1h30m or 500ms; ValueError otherwise."""
    text = value.strip().lower()
    parts = _DURATION_PART.findall(text)
    if not text or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"expected a duration like 90s, 15m, 12h or 30d, got {value!r}")
    return timedelta(seconds=sum(float(n) * _DURATION_UNITS[u] for n, u in parts))


_TOP_LEVEL = set(Settings.__dataclass_fields__)


# Each TLS file of a participant, and the PEM block it must hold (gRPC takes keys unencrypted).
_TLS_FILES = {
    "root_certificates": ("certificates", re.compile(rb"-----BEGIN CERTIFICATE-----")),
    "client_certificate": ("certificate", re.compile(rb"-----BEGIN CERTIFICATE-----")),
    "client_key": (
        "unencrypted private key",
        re.compile(rb"-----BEGIN (RSA |EC )?PRIVATE KEY-----"),
    ),
}
_SERVER_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?$")


def _endpoint(name: str, raw: Any, source: str, base: Path) -> ParticipantEndpoint:
    where = f"{source}: participants.{name}"
    if isinstance(raw, str):
        raw = {"address": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected an address or a mapping with 'address'")
    unknown = set(raw) - {"address", "tls", "server_name", *_TLS_FILES}
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    address = raw.get("address")
    if not isinstance(address, str) or not ADDRESS_PATTERN.match(address):
        raise ConfigError(f"{where}.address: expected host:port, got {address!r}")
    tls = raw.get("tls", False)
    if not isinstance(tls, bool):
        raise ConfigError(f"{where}.tls: expected true or false")
    given = [key for key in ("server_name", *_TLS_FILES) if raw.get(key) is not None]
    if given and not tls:
        # TLS settings with tls off would be ignored, and the calls sent in plaintext.
        raise ConfigError(f"{where}: {', '.join(given)} need tls: true")
    if ("client_certificate" in given) != ("client_key" in given):
        raise ConfigError(
            f"{where}: client_certificate and client_key go together (mTLS): set both or neither"
        )
    server_name = raw.get("server_name")
    if server_name is not None and (
        not isinstance(server_name, str) or not _SERVER_NAME.match(server_name)
    ):
        raise ConfigError(f"{where}.server_name: expected a host name, got {server_name!r}")
    files: dict[str, bytes | None] = {}
    for key, (kind, block) in _TLS_FILES.items():
        files[key] = None
        if raw.get(key) is None:
            continue
        path = base / str(raw[key])
        try:
            pem = path.read_bytes()
        except OSError as error:
            raise ConfigError(f"{where}.{key}: cannot read {path}: {error}") from None
        if not block.search(pem):
            raise ConfigError(f"{where}.{key}: {path} holds no PEM {kind}")
        if key == "client_key":
            check_private_key_file(path)
        files[key] = pem
    return ParticipantEndpoint(
        address,
        tls,
        files["root_certificates"],
        client_certificate=files["client_certificate"],
        client_key=files["client_key"],
        server_name=server_name,
    )


def load_settings(path: Path | None, overrides: Mapping[str, Any] | None = None) -> Settings:
    """Settings from a YAML file (relative paths are relative to it), then flag overrides."""
    settings = Settings()
    if path is not None:
        source = str(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except OSError as error:
            raise ConfigError(f"{source}: cannot read the configuration: {error}") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{source}: not valid YAML: {error}") from None
        except RecursionError:
            raise ConfigError(f"{source}: nested too deeply") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level")
        unknown = set(raw) - _TOP_LEVEL
        if unknown:
            raise ConfigError(
                f"{source}: unknown field(s) {', '.join(sorted(unknown))} "
                f"(known: {', '.join(sorted(_TOP_LEVEL))})"
            )
        base = path.parent
        values: dict[str, Any] = {}
        participants = raw.pop("participants", None) or {}
        if not isinstance(participants, dict):
            raise ConfigError(f"{source}: participants: expected a mapping of name to address")
        values["participants"] = {
            str(name): _endpoint(str(name), value, source, base)
            for name, value in participants.items()
        }
        if raw.get("tls") is not None:
            values["tls"] = _server_tls(raw.pop("tls"), source, base)
        if raw.get("auth") is not None:
            values["auth"] = _auth(raw.pop("auth"), source, base)
        if "definitions" in raw:
            values["definitions"] = base / str(raw.pop("definitions"))
        if isinstance(raw.get("database"), str) and raw["database"].startswith("sqlite:///"):
            db = raw.pop("database").removeprefix("sqlite:///")
            values["database"] = "sqlite:///" + (db if db.startswith("/") else str(base / db))
        values.update(raw)
        settings = _checked(replace(settings, **values), source)
    if overrides:
        settings = _checked(
            replace(settings, **{k: v for k, v in overrides.items() if v is not None}), "flags"
        )
    return settings


def _checked(settings: Settings, source: str) -> Settings:
    for name, expected in (
        ("database", str),
        ("listen", str),
        ("synchronous", str),
        ("log_level", str),
        ("busy_timeout_ms", int),
        ("max_payload_bytes", int),
        ("max_message_bytes", int),
        ("max_calls_per_participant", int),
        ("shutdown_grace", (int, float)),
        ("log_format", str),
        ("log_payloads", bool),
        ("otlp_timeout", (int, float)),
        ("metrics_interval", (int, float)),
        ("feed_stall_timeout", (int, float)),
        ("service_name", str),
        ("event_loop", str),
        ("insecure_plaintext", bool),
        ("reflection", bool),
        ("max_streams_per_caller", int),
        ("create_rate_per_caller", (int, float)),
        ("create_burst_per_caller", int),
    ):
        value = getattr(settings, name)
        if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
            raise ConfigError(f"{source}: {name}: unexpected value {value!r}")
    for name in ("otlp_endpoint", "metrics_listen"):
        value = getattr(settings, name)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{source}: {name}: unexpected value {value!r}")
    if settings.metrics_listen is not None and not ADDRESS_PATTERN.match(settings.metrics_listen):
        raise ConfigError(f"{source}: metrics_listen: expected host:port")
    if settings.event_loop not in EVENT_LOOPS:
        raise ConfigError(f"{source}: event_loop: expected one of {', '.join(EVENT_LOOPS)}")
    if settings.log_format not in ("text", "json"):
        raise ConfigError(f"{source}: log_format: expected text or json")
    if settings.otlp_timeout <= 0 or settings.metrics_interval <= 0:
        raise ConfigError(f"{source}: otlp_timeout and metrics_interval must be positive")
    if settings.feed_stall_timeout <= 0:
        raise ConfigError(f"{source}: feed_stall_timeout: must be positive")
    if not ADDRESS_PATTERN.match(settings.listen):
        raise ConfigError(f"{source}: listen: expected host:port, got {settings.listen!r}")
    if settings.max_streams_per_caller < 1 or settings.create_burst_per_caller < 1:
        raise ConfigError(
            f"{source}: max_streams_per_caller and create_burst_per_caller: at least 1"
        )
    if settings.create_rate_per_caller < 0:
        raise ConfigError(f"{source}: create_rate_per_caller: 0 (no limit) or more")
    if not settings.insecure_plaintext:
        if settings.tls is None and not is_loopback(settings.listen):
            raise ConfigError(
                f"{source}: listen: {settings.listen} is not a loopback address, and the port "
                "would be plaintext: anyone on the network could read and forge calls. Give "
                "tls: (certificate and key), or, knowingly, --insecure-plaintext"
            )
        if settings.metrics_listen is not None and not is_loopback(settings.metrics_listen):
            raise ConfigError(
                f"{source}: metrics_listen: {settings.metrics_listen} is not a loopback "
                "address and the metrics endpoint is plaintext HTTP; serve it on 127.0.0.1 "
                "(behind a proxy that adds TLS), or, knowingly, --insecure-plaintext"
            )
    if settings.synchronous.upper() not in ("FULL", "NORMAL"):
        raise ConfigError(f"{source}: synchronous: expected FULL or NORMAL")
    if settings.max_payload_bytes <= 0 or settings.max_payload_bytes > settings.max_message_bytes:
        raise ConfigError(f"{source}: max_payload_bytes: must be from 1 to max_message_bytes")
    if settings.max_calls_per_participant < 1:
        raise ConfigError(f"{source}: max_calls_per_participant: must be at least 1")
    if settings.shutdown_grace < 0:
        raise ConfigError(f"{source}: shutdown_grace: must not be negative")
    retention: object = settings.retention  # a string when read from YAML
    if isinstance(retention, str):
        try:
            retention = parse_duration(retention)
        except ValueError as error:
            raise ConfigError(f"{source}: retention: {error}") from None
    if retention is not None and (
        not isinstance(retention, timedelta) or retention < timedelta(minutes=1)
    ):
        raise ConfigError(f"{source}: retention: at least 1m, e.g. 30d")
    lease: object = settings.lease
    if isinstance(lease, str):
        try:
            lease = parse_duration(lease)
        except ValueError as error:
            raise ConfigError(f"{source}: lease: {error}") from None
    if isinstance(lease, int | float) and not isinstance(lease, bool):
        lease = timedelta(seconds=lease)
    if not isinstance(lease, timedelta) or lease < timedelta(milliseconds=500):
        raise ConfigError(f"{source}: lease: at least 500ms, e.g. 10s")
    replica = settings.replica
    if replica is not None and (not isinstance(replica, str) or not _REPLICA.match(replica)):
        raise ConfigError(
            f"{source}: replica: 1 to 100 letters, digits and . _ : - (got {replica!r})"
        )
    return replace(
        settings,
        definitions=Path(settings.definitions),
        retention=retention or None,
        lease=lease,
    )


def is_loopback(address: str) -> bool:
    """Whether ``host:port`` (or a ``unix:`` socket) is reachable from this machine only."""
    if address.startswith("unix:"):
        return True
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _server_tls(raw: Any, source: str, base: Path) -> ServerTls:
    where = f"{source}: tls"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected certificate, key and optionally client_ca")
    unknown = set(raw) - {"certificate", "key", "client_ca", "allowed_clients"}
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    for name in ("certificate", "key"):
        if not isinstance(raw.get(name), str):
            raise ConfigError(f"{where}.{name}: the PEM file's path")
    allowed = raw.get("allowed_clients") or []
    if not isinstance(allowed, list) or not all(isinstance(a, str) for a in allowed):
        raise ConfigError(f"{where}.allowed_clients: a list like ['CN=orders', 'DNS:a.b']")
    for name in allowed:
        if not name.startswith(("CN=", "DNS:", "URI:", "IP:")) or len(name) < 4:
            raise ConfigError(
                f"{where}.allowed_clients: {name!r} is not an identity: write CN=name, "
                "DNS:host.name, URI:spiffe://... or IP:10.0.0.7"
            )
    client_ca = raw.get("client_ca")
    if allowed and client_ca is None:
        raise ConfigError(f"{where}.allowed_clients: needs client_ca (client certificates)")
    return ServerTls(
        base / raw["certificate"],
        base / raw["key"],
        None if client_ca is None else base / str(client_ca),
        tuple(allowed),
    )


def _auth(raw: Any, source: str, base: Path) -> AuthSettings:
    where = f"{source}: auth"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected tokens: FILE and/or jwt: {{key, algorithms}}")
    unknown = set(raw) - {"tokens", "jwt"}
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    tokens = raw.get("tokens")
    if tokens is not None and not isinstance(tokens, str):
        raise ConfigError(f"{where}.tokens: the path of the tokens file")
    jwt_raw = raw.get("jwt")
    jwt = None
    if jwt_raw is not None:
        if not isinstance(jwt_raw, dict) or not isinstance(jwt_raw.get("key"), str):
            raise ConfigError(f"{where}.jwt: expected key: FILE and algorithms: [RS256]")
        unknown = set(jwt_raw) - {"key", "algorithms", "issuer", "audience"}
        if unknown:
            raise ConfigError(f"{where}.jwt: unknown field(s) {', '.join(sorted(unknown))}")
        algorithms = jwt_raw.get("algorithms", ["RS256"])
        if isinstance(algorithms, str):
            algorithms = [algorithms]
        if not isinstance(algorithms, list) or not all(isinstance(a, str) for a in algorithms):
            raise ConfigError(f"{where}.jwt.algorithms: a list such as [RS256]")
        jwt = JwtSettings(
            base / jwt_raw["key"],
            tuple(algorithms),
            jwt_raw.get("issuer"),
            jwt_raw.get("audience"),
        )
    if tokens is None and jwt is None:
        raise ConfigError(f"{where}: give tokens: FILE, jwt: {{...}}, or both")
    return AuthSettings(None if tokens is None else base / tokens, jwt)


def check_private_key_file(path: Path) -> None:
    """Warn when a private key file can be read by others than its owner."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "the private key %s can be read by others than its owner (mode %o): chmod 600 it",
            path,
            stat.S_IMODE(mode),
        )
