"""`saga console`: its flags, its settings, and serving it until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import signal
import socket
import ssl
import sys
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from coordinator.config import is_loopback
from coordinator.web.app import ConsoleConfig, create_app
from coordinator.web.flags import DEFAULT_LISTEN
from coordinator.web.gateway import Gateway
from coordinator.web.security import Guard
from saga_sdk.connection import Connection, TokenSource
from saga_sdk.requests import default_actor
from saga_sdk.tls import ClientTLS

SHUTDOWN_TIMEOUT = 2.0
"""Seconds open pages (live streams) get to close when the console stops."""


class ConsoleError(Exception):
    """Settings the console cannot start with; the message says which and why."""


@dataclass(frozen=True)
class ConsoleSettings:
    """Everything `saga console` runs with, built once from its flags."""

    target: str
    """The coordinator's host:port."""
    tls: ClientTLS | None = None
    """How to reach the coordinator over TLS; None: plaintext."""
    token: TokenSource | None = None
    """The bearer token sent to the coordinator (an operator's, for the actions)."""
    listen: str = DEFAULT_LISTEN
    """Where the console serves (host:port; port 0 picks a free one)."""
    certificate: Path | None = None
    """Serve HTTPS with this certificate (chain), PEM."""
    key: Path | None = None
    """The certificate's private key, PEM."""
    insecure_plaintext: bool = False
    """Serve plain HTTP on an address other than loopback."""
    trace_url: str = ""
    """URL template of a saga's trace, with {trace_id} or {saga_id}."""
    allowed_hosts: tuple[str, ...] = ()
    """Other names (host or host:port) the console is reached by."""
    actor: str = field(default_factory=lambda: f"console:{default_actor()}")
    """Who acts, as the audit trail records the console's actions."""


def split_listen(listen: str) -> tuple[str, int]:
    """host and port of `host:port` (`[::1]:8080` too)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConsoleError(f"--listen: expected HOST:PORT, got {listen!r}")
    return host.strip("[]"), int(port)


def _wildcard(host: str) -> bool:
    """Whether listening on `host` means every interface."""
    return host in ("0.0.0.0", "::")


def check_settings(settings: ConsoleSettings) -> None:
    """Refuse what would expose the console (plaintext off loopback) or cannot work."""
    host, _ = split_listen(settings.listen)
    if (settings.certificate is None) != (settings.key is None):
        raise ConsoleError("--tls-certificate and --tls-key go together")
    plaintext = settings.certificate is None and not settings.insecure_plaintext
    if plaintext and not is_loopback(settings.listen):
        raise ConsoleError(
            f"--listen {settings.listen}: plaintext HTTP is served on loopback only; give "
            "--tls-certificate and --tls-key, or, knowingly, --insecure-plaintext (anyone "
            "on the network could then read the sagas and act on them)"
        )
    if settings.certificate is None and _wildcard(host) and not settings.allowed_hosts:
        raise ConsoleError(
            f"--listen {settings.listen}: plaintext on every interface answers any Host header, "
            "so a web page elsewhere could reach the console through DNS rebinding; give "
            "--allowed-host NAME for each name it is reached by"
        )
    if settings.trace_url and not settings.trace_url.startswith(("http://", "https://")):
        raise ConsoleError(
            "--trace-url: an http:// or https:// URL template with {trace_id} or {saga_id}"
        )


def _ssl_context(settings: ConsoleSettings) -> ssl.SSLContext | None:
    if settings.certificate is None or settings.key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.certificate, settings.key)
    except (OSError, ssl.SSLError) as error:
        raise ConsoleError(
            f"--tls-certificate/--tls-key: cannot use {settings.certificate} and {settings.key}: "
            f"{error}"
        ) from None
    return context


def bind(listen: str) -> socket.socket:
    """A listening socket on `host:port`."""
    host, port = split_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise ConsoleError(f"--listen {listen}: {error.strerror or error}") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def serve(settings: ConsoleSettings, stop: asyncio.Event) -> None:
    """Serve the console until `stop` is set."""
    check_settings(settings)
    context = _ssl_context(settings)
    sock = bind(settings.listen)
    host, _ = split_listen(settings.listen)
    port = sock.getsockname()[1]
    wildcard = _wildcard(host)
    guard = Guard.create(
        listen_host=host,
        port=port,
        tls=context is not None,
        allowed_hosts=settings.allowed_hosts,
        any_host=wildcard and not settings.allowed_hosts,
    )
    gateway = Gateway(settings.target, tls=settings.tls, token=settings.token, actor=settings.actor)
    app = create_app(
        gateway,
        guard,
        ConsoleConfig(trace_url=settings.trace_url, secure_cookies=context is not None),
    )
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    try:
        site = web.SockSite(runner, sock, ssl_context=context)
        await site.start()
        scheme = "https" if context else "http"
        shown = f"[{host}]" if ":" in host else host
        print(
            f"saga console: serving {scheme}://{shown}:{port}/ (coordinator {settings.target})",
            flush=True,
        )
        if wildcard and not settings.allowed_hosts:
            print(
                "saga console: on every interface, any Host header is answered; give "
                "--allowed-host NAME to answer only the names it is reached by",
                file=sys.stderr,
                flush=True,
            )
        await stop.wait()
    finally:
        await runner.cleanup()
        await gateway.close()


def settings_from(args: argparse.Namespace) -> ConsoleSettings:
    """The settings from parsed flags (the connection flags as the client commands take)."""
    try:
        connection = Connection.from_environment(
            target=args.coordinator or args.target,
            tls=args.tls,
            ca=args.ca,
            certificate=args.cert,
            key=args.key,
            server_name=args.server_name,
            token_file=args.token_file,
        )
    except ValueError as error:
        raise ConsoleError(str(error)) from None
    settings = ConsoleSettings(
        target=connection.target,
        tls=connection.tls,
        token=connection.token,
        listen=args.listen,
        certificate=args.tls_certificate,
        key=args.tls_key,
        insecure_plaintext=args.insecure_plaintext,
        trace_url=args.trace_url,
        allowed_hosts=tuple(args.allowed_host),
    )
    if args.actor:
        settings = dataclasses.replace(settings, actor=args.actor)
    check_settings(settings)
    return settings


def main(args: argparse.Namespace) -> int:
    """Run `saga console`; 0 after SIGINT or SIGTERM, 2 for settings it cannot start with."""
    logging.basicConfig(level=logging.WARNING, format="saga console: %(levelname)s %(message)s")
    try:
        settings = settings_from(args)
    except ConsoleError as error:
        print(f"saga console: {error}", file=sys.stderr)
        return 2

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await serve(settings, stop)

    try:
        asyncio.run(run())
    except ConsoleError as error:
        print(f"saga console: {error}", file=sys.stderr)
        return 2
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    return 0
