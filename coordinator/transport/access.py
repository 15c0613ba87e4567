"""Who may call what: callers authenticated by a bearer token, authorised by role, and limited.

Every CoordinatorService call is admitted here before its handler runs (see
``server.add_coordinator_service``): a caller without a valid token is refused with
UNAUTHENTICATED, one whose roles do not allow the method (or the definition it names) with
PERMISSION_DENIED, one over its limits with RESOURCE_EXHAUSTED and a RetryInfo; in every case
the handler is never invoked and nothing is stored.

Tokens come from a file of static tokens (stored as SHA-256 digests: the file holds no secret)
or are signed JWTs (HMAC or public-key, with an expiry), both mapping to an identity, roles and
optionally the definitions the caller may use. A token is never logged, never put in an error
message and never kept beyond the check.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import yaml

from coordinator.core.errors import SagaError


class Unauthenticated(SagaError):
    """No valid credentials came with the call."""

    reason = "UNAUTHENTICATED"


class PermissionDenied(SagaError):
    """The caller is known, and not allowed to do this."""

    reason = "PERMISSION_DENIED"


class TooManyRequests(SagaError):
    """The caller is over one of its limits; it may retry after ``retry_after``."""

    reason = "RATE_LIMITED"

    def __init__(self, message: str, retry_after: timedelta) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Role(StrEnum):
    """What a caller may do; each role may do everything the one before it may."""

    VIEWER = "viewer"
    """Read sagas, their events, counts, the change feed and the definitions."""
    CLIENT = "client"
    """Also create and cancel sagas."""
    OPERATOR = "operator"
    """Also take the operator actions: retry, resume, mark compensated, complete."""
    ADMIN = "admin"
    """Also register definitions and prune ended sagas."""


_READS = frozenset(
    {
        "GetSaga",
        "ListSagas",
        "WatchSaga",
        "CountSagas",
        "ListSagaEvents",
        "WatchChanges",
        "ListDefinitions",
        "GetDefinition",
    }
)
_METHODS: Mapping[Role, frozenset[str]] = {
    Role.VIEWER: _READS,
    Role.CLIENT: _READS | {"CreateSaga", "CancelSaga"},
    Role.OPERATOR: _READS
    | {"CreateSaga", "CancelSaga", "RetrySagaStep", "ResumeSaga", "MarkStepCompensated"}
    | {"CompleteStep"},
    Role.ADMIN: _READS
    | {"CreateSaga", "CancelSaga", "RetrySagaStep", "ResumeSaga", "MarkStepCompensated"}
    | {"CompleteStep", "RegisterDefinition", "PruneSagas"},
}
STREAMS = frozenset({"WatchSaga", "WatchChanges"})
"""The methods that hold a stream open: counted against a caller's open streams."""


@dataclass(frozen=True)
class Caller:
    """An authenticated caller."""

    identity: str
    """Who it is: the token's name, the JWT's subject, or the client certificate's identity."""
    roles: frozenset[Role]
    definitions: frozenset[str] | None = None
    """The definitions it may use (None: all)."""

    def may(self, method: str) -> bool:
        """Whether one of its roles allows ``method``."""
        return any(method in _METHODS[role] for role in self.roles)

    def may_use(self, definition: str) -> bool:
        """Whether it may use sagas of ``definition``."""
        return self.definitions is None or definition in self.definitions

    def check_definition(self, definition: str) -> None:
        """Raise PermissionDenied unless it may use ``definition``."""
        if not self.may_use(definition):
            raise PermissionDenied(
                f"{self.identity} may not use sagas of definition {definition!r}"
            )


ANYONE = Caller("", frozenset(Role))
"""The caller when no authentication is configured: allowed everything."""

_current: contextvars.ContextVar[Caller] = contextvars.ContextVar("saga_caller", default=ANYONE)


def current_caller() -> Caller:
    """The caller of the call being handled (``ANYONE`` without authentication)."""
    return _current.get()


def set_caller(caller: Caller) -> contextvars.Token[Caller]:
    """Make ``caller`` the current one for the call being handled."""
    return _current.set(caller)


class TokenVerifier(Protocol):
    """Turns a bearer token into a caller, or raises Unauthenticated."""

    def verify(self, token: str) -> Caller: ...


def _roles(raw: Any, where: str) -> frozenset[Role]:
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{where}: roles: a list of {', '.join(r.value for r in Role)}")
    try:
        return frozenset(Role(str(role).lower()) for role in raw)
    except ValueError:
        raise ValueError(
            f"{where}: roles: unknown role in {raw!r}; use {', '.join(r.value for r in Role)}"
        ) from None


def _definitions(raw: Any, where: str) -> frozenset[str] | None:
    if raw is None or raw == "*" or raw == ["*"]:
        return None
    if not isinstance(raw, list) or not all(isinstance(d, str) and d for d in raw):
        raise ValueError(f"{where}: definitions: a list of definition names, or '*'")
    return frozenset(raw)


def token_digest(token: str) -> str:
    """How the tokens file holds a token: its SHA-256, hexadecimal."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class StaticTokens:
    """Tokens listed in a file, each under its SHA-256 digest, with a name, roles and
    optionally definitions::

        tokens:
          - name: orders-service
            sha256: 9f86d081884c7d65...
            roles: [client]
            definitions: [onboard-corporate-client]
    """

    by_digest: Mapping[str, Caller]

    @classmethod
    def load(cls, path: Path) -> StaticTokens:
        """Read the file; ValueError naming the entry for anything wrong in it."""
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as error:
            raise ValueError(f"{path}: cannot read the tokens: {error}") from None
        entries = raw.get("tokens") if isinstance(raw, dict) else None
        if not isinstance(entries, list):
            raise ValueError(f"{path}: expected 'tokens:' with a list of entries")
        by_digest: dict[str, Caller] = {}
        for index, entry in enumerate(entries):
            where = f"{path}: tokens[{index}]"
            if not isinstance(entry, dict):
                raise ValueError(f"{where}: expected a mapping with name, sha256 and roles")
            unknown = set(entry) - {"name", "sha256", "roles", "definitions"}
            if unknown:
                raise ValueError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
            name, digest = entry.get("name"), str(entry.get("sha256", "")).lower()
            if not isinstance(name, str) or not name:
                raise ValueError(f"{where}: name: the caller's name, as the audit trail shows it")
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(
                    f"{where}: sha256: the token's SHA-256 in hexadecimal (saga token new "
                    "prints it), never the token itself"
                )
            if digest in by_digest:
                raise ValueError(f"{where}: the same token is listed twice")
            by_digest[digest] = Caller(
                name,
                _roles(entry.get("roles"), where),
                _definitions(entry.get("definitions"), where),
            )
        return cls(by_digest)

    def verify(self, token: str) -> Caller:
        """The caller of a listed token; Unauthenticated otherwise."""
        digest = token_digest(token)
        for known, caller in self.by_digest.items():  # no early exit: constant in the digest
            if hmac.compare_digest(known, digest):
                return caller
        raise Unauthenticated("the bearer token is not one this coordinator knows")


_HMAC = ("HS256", "HS384", "HS512")
_PUBLIC = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "EdDSA")


@dataclass(frozen=True)
class JwtTokens:
    """Signed JWTs: an HMAC secret shared with the issuer, or the issuer's public key.

    The token must be signed with one of ``algorithms``, unexpired (``exp`` is required), and
    match ``issuer`` and ``audience`` when set. Its ``sub`` is the caller's identity, its
    ``roles`` claim (a list) its roles, and an optional ``definitions`` claim the definitions it
    may use.
    """

    key: str | bytes
    algorithms: tuple[str, ...]
    issuer: str | None = None
    audience: str | None = None
    leeway: timedelta = field(default=timedelta(seconds=30))

    @classmethod
    def load(
        cls,
        key_file: Path,
        algorithms: Sequence[str],
        issuer: str | None = None,
        audience: str | None = None,
    ) -> JwtTokens:
        """Read the key (the secret for HS*, the PEM public key otherwise)."""
        import jwt  # noqa: F401 - loaded with the settings that need it, not at the first call

        if not algorithms:
            raise ValueError("jwt: algorithms: at least one, e.g. RS256 or HS256")
        unknown = [a for a in algorithms if a not in (*_HMAC, *_PUBLIC)]
        if unknown:
            raise ValueError(f"jwt: unknown algorithm(s) {unknown}; use {(*_HMAC, *_PUBLIC)}")
        if any(a in _HMAC for a in algorithms) and any(a in _PUBLIC for a in algorithms):
            raise ValueError("jwt: do not mix HMAC and public-key algorithms under one key")
        try:
            data = key_file.read_bytes()
        except OSError as error:
            raise ValueError(f"jwt: key: cannot read {key_file}: {error}") from None
        if algorithms[0] in _HMAC:
            secret = data.strip()
            if len(secret) < 32:
                raise ValueError(f"jwt: key: an HMAC secret of at least 32 bytes ({key_file})")
            return cls(secret, tuple(algorithms), issuer, audience)
        if b"PRIVATE KEY" in data:
            raise ValueError(
                f"jwt: key: {key_file} holds a private key; give the issuer's public key"
            )
        return cls(data.decode(), tuple(algorithms), issuer, audience)

    def verify(self, token: str) -> Caller:
        """The caller the token names; Unauthenticated if it is not valid."""
        import jwt  # imported by `load` already: a dictionary lookup

        try:
            claims = jwt.decode(
                token,
                self.key,
                algorithms=list(self.algorithms),
                issuer=self.issuer,
                audience=self.audience,
                leeway=self.leeway,
                options={"require": ["exp", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the bearer token has expired") from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated("the bearer token's signature is not valid") from None
        except jwt.InvalidTokenError as error:
            # PyJWT's messages name claims and formats, never the token itself.
            raise Unauthenticated(f"the bearer token is not valid: {error}") from None
        try:
            roles = _roles(claims.get("roles"), "the token's claims")
            definitions = _definitions(claims.get("definitions"), "the token's claims")
        except ValueError as error:
            raise Unauthenticated(f"the bearer token is not valid: {error}") from None
        return Caller(str(claims["sub"]), roles, definitions)


class AnyOf:
    """Several verifiers: a token any of them accepts is accepted."""

    def __init__(self, verifiers: Sequence[TokenVerifier]) -> None:
        self._verifiers = tuple(verifiers)

    def verify(self, token: str) -> Caller:
        """The caller of the first verifier that accepts the token."""
        refusals: list[tuple[TokenVerifier, Unauthenticated]] = []
        for verifier in self._verifiers:
            try:
                return verifier.verify(token)
            except Unauthenticated as error:
                refusals.append((verifier, error))
        # The most telling refusal: the JWT check's for what looks like a JWT.
        signed = [e for v, e in refusals if isinstance(v, JwtTokens)]
        if signed and _looks_like_jwt(token):
            raise signed[0]
        raise refusals[0][1] if refusals else Unauthenticated("no token verifier is configured")


def _looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2


@dataclass
class _Bucket:
    tokens: float
    at: float


class Limits:
    """Per caller: open streams, and a rate of creations (a token bucket)."""

    def __init__(
        self,
        max_streams: int,
        creates_per_second: float,
        burst: int,
        clock: Any = time.monotonic,
    ) -> None:
        self._max_streams = max_streams
        self._rate = creates_per_second
        self._burst = max(1, burst)
        self._clock = clock
        self._streams: dict[str, int] = {}
        self._buckets: dict[str, _Bucket] = {}

    def open_stream(self, who: str) -> None:
        """Count a stream the caller opens; TooManyRequests when it has too many open."""
        opened = self._streams.get(who, 0)
        if opened >= self._max_streams:
            raise TooManyRequests(
                f"{who or 'this caller'} has {opened} streams open, the most allowed; close "
                "one first",
                timedelta(seconds=1),
            )
        self._streams[who] = opened + 1

    def close_stream(self, who: str) -> None:
        """Forget a stream the caller closed."""
        left = self._streams.get(who, 1) - 1
        if left > 0:
            self._streams[who] = left
        else:
            self._streams.pop(who, None)

    def create(self, who: str) -> None:
        """Take one creation from the caller's bucket; TooManyRequests when it is empty."""
        if self._rate <= 0:
            return
        now = self._clock()
        bucket = self._buckets.get(who)
        if bucket is None:
            bucket = self._buckets[who] = _Bucket(float(self._burst), now)
        bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.at) * self._rate)
        bucket.at = now
        if bucket.tokens < 1:
            wait = (1 - bucket.tokens) / self._rate
            raise TooManyRequests(
                f"{who or 'this caller'} creates sagas faster than {self._rate:g} per second",
                timedelta(seconds=math.ceil(wait * 1000) / 1000),
            )
        bucket.tokens -= 1
        if len(self._buckets) > 10_000:  # callers come and go: forget the full buckets
            full = [k for k, b in self._buckets.items() if b.tokens >= self._burst - 1]
            for key in full[:5_000]:
                del self._buckets[key]


_NAMED_BY = {
    "CreateSaga": "definition",
    "ListSagas": "definition",
    "CountSagas": "definition",
    "WatchChanges": "definition",
    "ListDefinitions": "name",
    "GetDefinition": "name",
}
"""Where a request names the definition it concerns (empty: every definition)."""


def _needed_role(method: str) -> Role:
    return next(role for role in Role if method in _METHODS[role])


class AuthContext(Protocol):
    """What the gate reads from a call: its metadata, its peer and its TLS identity."""

    def invocation_metadata(self) -> Any: ...

    def peer(self) -> str: ...

    def auth_context(self) -> Any: ...


class Gate:
    """Admits a call or refuses it before its handler runs; see the module docstring.

    ``verifier`` None: no token is asked for (every caller may do everything, as on a
    development machine). ``allowed_clients``: the client certificate must carry one of these
    identities. ``limits``: per caller.
    """

    def __init__(
        self,
        verifier: TokenVerifier | None = None,
        allowed_clients: frozenset[str] = frozenset(),
        limits: Limits | None = None,
    ) -> None:
        self._verifier = verifier
        self._allowed = allowed_clients
        self.limits = limits or Limits(max_streams=1_000_000, creates_per_second=0, burst=1)

    @property
    def checks_tokens(self) -> bool:
        """Whether calls need a bearer token."""
        return self._verifier is not None

    def admit(self, method: str, request: Any, context: AuthContext) -> Caller:
        """The caller of this call, if it may make it; raises otherwise."""
        identities = frozenset[str]()
        if self._allowed:
            from coordinator.transport.tls import peer_identities

            identities = peer_identities(context.auth_context() or {})
            if not identities & self._allowed:
                shown = ", ".join(sorted(identities)) or "no client certificate"
                raise PermissionDenied(
                    f"the client certificate ({shown}) is not one of the allowed clients"
                )
        if self._verifier is None:
            caller = ANYONE if not identities else Caller(min(identities), frozenset(Role))
        else:
            token = bearer_token(context.invocation_metadata())
            caller = self._verifier.verify(token)
        if not caller.may(method):
            needed = _needed_role(method)
            raise PermissionDenied(
                f"{caller.identity} may not call {method}: it needs the {needed.value} role "
                f"(it has {', '.join(sorted(r.value for r in caller.roles))})"
            )
        field_name = _NAMED_BY.get(method)
        if caller.definitions is not None and field_name is not None:
            named = getattr(request, field_name, "")
            if not named:
                raise PermissionDenied(
                    f"{caller.identity} may use only some definitions: name one of "
                    f"{', '.join(sorted(caller.definitions))} in '{field_name}'"
                )
            caller.check_definition(named)
        if method == "RegisterDefinition" and caller.definitions is not None:
            caller.check_definition(request.definition.name)
        if method == "CreateSaga":
            self.limits.create(caller.identity or _peer_host(context.peer()))
        return caller

    def who(self, caller: Caller, context: AuthContext) -> str:
        """Whose limits a call counts against: the caller, or its address when anonymous."""
        return caller.identity or _peer_host(context.peer())


def bearer_token(metadata: Any) -> str:
    """The bearer token of ``authorization: Bearer <token>``; Unauthenticated without one."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value.decode() if isinstance(value, bytes) else str(value)
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("the authorization header is not 'Bearer <token>'")
        return token.strip()
    raise Unauthenticated(
        "this coordinator needs a bearer token: send the metadata 'authorization: Bearer <token>'"
    )


def _peer_host(peer: str) -> str:
    """``ipv4:10.0.0.7:51234`` → ``10.0.0.7``: limits of anonymous callers go by address."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rsplit(":", 1)[0]
    return peer
