"""The console's defences at its edge: which hosts it answers, cross-site requests, headers.

- Host: only the names it is reached by (its listening address, the loopback names, and any
  `--allowed-host`), so that a page of another site cannot rebind its own name to the console.
- Actions: a POST is refused with 403 unless it comes from the console's own origin (`Origin`,
  else `Sec-Fetch-Site`) and carries the token tied to the browser's session cookie.
- Every answer forbids framing, sniffing and scripts from anywhere but the console itself.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

SESSION_COOKIE = "saga_console_session"
CSRF_FIELD = "csrf_token"

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


class Forbidden(Exception):
    """A request the console refuses to act on; the message says why."""


def _host_names(listen_host: str, port: int, extra: Iterable[str]) -> frozenset[str]:
    hosts = {listen_host, "localhost", "127.0.0.1", "[::1]"}
    names = set()
    for host in hosts:
        shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
        names.add(f"{shown}:{port}".lower())
    for entry in extra:
        names.add(entry.lower() if ":" in entry.rsplit("]", 1)[-1] else f"{entry}:{port}".lower())
    return frozenset(names)


@dataclass(frozen=True)
class Guard:
    """The console's checks, with the secret its session tokens are derived from."""

    secret: bytes
    scheme: str
    """"http" or "https"."""
    allowed_hosts: frozenset[str] | None
    """The Host headers answered (host:port, lower case); None answers any."""

    @classmethod
    def create(
        cls,
        *,
        listen_host: str,
        port: int,
        tls: bool,
        allowed_hosts: Iterable[str] = (),
        any_host: bool = False,
    ) -> Guard:
        """A guard with a fresh secret: sessions last as long as the process."""
        allowed = None if any_host else _host_names(listen_host, port, allowed_hosts)
        return cls(secrets.token_bytes(32), "https" if tls else "http", allowed)

    def check_host(self, host: str | None) -> None:
        """Refuse a Host the console is not reached by."""
        if self.allowed_hosts is None:
            return
        if host is None or host.lower() not in self.allowed_hosts:
            raise Forbidden(
                f"this console does not answer to the host {host!r}; start it with "
                "--allowed-host NAME to reach it by another name"
            )

    @staticmethod
    def new_session() -> str:
        """A fresh session id for the cookie."""
        return secrets.token_urlsafe(32)

    def csrf_token(self, session: str) -> str:
        """The token the session's forms carry."""
        return hmac.new(self.secret, session.encode(), hashlib.sha256).hexdigest()

    def check_post(
        self,
        *,
        host: str | None,
        origin: str | None,
        fetch_site: str | None,
        session: str | None,
        token: str | None,
    ) -> None:
        """Refuse a state-changing request from another site, or without the session's token."""
        self.check_host(host)
        if origin is not None:
            if origin == "null" or origin.lower() != f"{self.scheme}://{host}".lower():
                raise Forbidden(f"cross-origin request refused (Origin {origin})")
        elif fetch_site is not None:
            if fetch_site not in ("same-origin", "none"):
                raise Forbidden(f"cross-site request refused (Sec-Fetch-Site {fetch_site})")
        else:
            raise Forbidden("request refused: it says neither its Origin nor its Sec-Fetch-Site")
        if not session or not token:
            raise Forbidden("request refused: no session token (reload the page)")
        if not hmac.compare_digest(self.csrf_token(session), token):
            raise Forbidden("request refused: the session token does not match (reload the page)")
