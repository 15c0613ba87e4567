"""The flags of `saga console`, apart from the server so that `saga` starts without it."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_LISTEN = "127.0.0.1:8080"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `saga console`."""
    parser.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="the coordinator to read from and act on (default: $SAGA_TARGET, then the client "
        "config file's, else 127.0.0.1:50051)",
    )
    parser.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        help=f"where to serve the console (default {DEFAULT_LISTEN}; port 0 picks one)",
    )
    parser.add_argument(
        "--trace-url",
        metavar="TEMPLATE",
        default="",
        help="link each saga to its trace: {trace_id} and {saga_id} are filled in, e.g. "
        "'http://jaeger:16686/trace/{trace_id}'",
    )
    parser.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="another name (host or host:port) the console is reached by; other Host "
        "headers are refused (repeatable)",
    )
    parser.add_argument("--actor", help="who acts, in the audit trail (default console:user@host)")
    served = parser.add_argument_group("serving HTTPS")
    served.add_argument("--tls-certificate", metavar="PEM", type=Path, help="serve HTTPS")
    served.add_argument("--tls-key", metavar="PEM", type=Path, help="the certificate's key")
    served.add_argument(
        "--insecure-plaintext",
        action="store_true",
        help="serve plain HTTP on an address other than loopback: anyone on the network can "
        "read the sagas and act on them",
    )


def main(args: argparse.Namespace) -> int:
    """Run `saga console` (the server is imported only now)."""
    from coordinator.web import server

    return server.main(args)
