"""How a client reaches a secured coordinator: its address, TLS settings and bearer token, and
where they come from (arguments, environment variables, a YAML config file).

    client = SagaClient.from_environment()  # what the `saga` command reads too

The environment variables, and the config file's keys::

    SAGA_TARGET             target                 host:port (default 127.0.0.1:50051)
    SAGA_TLS_CA             tls.ca                 CA certificates (PEM) to trust the coordinator
    SAGA_TLS_CERT           tls.certificate        this client's certificate (PEM), for mTLS
    SAGA_TLS_KEY            tls.key                its private key (PEM, unencrypted)
    SAGA_TLS_SERVER_NAME    tls.server_name        the name the coordinator's certificate carries
    SAGA_TLS=true           tls: true              TLS with the system's CAs, without any file
    SAGA_TOKEN                                     the bearer token itself
    SAGA_TOKEN_FILE         token_file             a file holding the bearer token
    SAGA_CLIENT_CONFIG                             the config file (default
                                                   $XDG_CONFIG_HOME/saga/client.yaml, else
                                                   ~/.config/saga/client.yaml)

Explicit arguments (the `saga` command's flags) win over the environment, which wins over the
file, field by field. Relative paths in the file are relative to the file's directory. Any of
the TLS settings means TLS; none means plaintext. Everything is checked when loaded, and a
problem raises ValueError naming the variable, the file and key, or the path at fault. A token
is never put in a message or a repr: the config file cannot hold one (only `token_file`), and a
token file is read again when it changes, so a rotated token is sent from the next call on.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saga_sdk.tls import ClientTLS

DEFAULT_TARGET = "127.0.0.1:50051"
"""The coordinator's address when nothing names one."""

TARGET = "SAGA_TARGET"
TLS = "SAGA_TLS"
TLS_CA = "SAGA_TLS_CA"
TLS_CERT = "SAGA_TLS_CERT"
TLS_KEY = "SAGA_TLS_KEY"
TLS_SERVER_NAME = "SAGA_TLS_SERVER_NAME"
TOKEN = "SAGA_TOKEN"
TOKEN_FILE = "SAGA_TOKEN_FILE"
CONFIG = "SAGA_CLIENT_CONFIG"

TokenSource = str | Callable[[], str]
"""A bearer token, or a callable asked for a fresh one before every call."""
AsyncTokenSource = str | Callable[[], str | Awaitable[str]]
"""For `AsyncSagaClient`: the callable may also be a coroutine function."""

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})
_FILE_KEYS = ("target", "tls", "token_file")
_TLS_KEYS = ("ca", "certificate", "key", "server_name")


def check_token(token: object, where: str) -> str:
    """`token` if it can be sent as a bearer token; else ValueError naming `where` (never the
    token itself)."""
    if not isinstance(token, str):
        raise TypeError(f"{where}: a token is a string, got {type(token).__name__}")
    if not token:
        raise ValueError(f"{where}: the token is empty")
    if token[:6].lower() == "bearer" and token[6:7].isspace():
        raise ValueError(f"{where}: give the token alone; 'Bearer ' is added to it")
    if any(c.isspace() for c in token):
        raise ValueError(
            f"{where}: the token holds whitespace or a line break; a token is one word (a token "
            "file may end with a newline, nothing else)"
        )
    if not all(0x21 <= ord(c) <= 0x7E for c in token):
        raise ValueError(f"{where}: the token holds a character a gRPC header cannot carry")
    return token


class BearerToken:
    """What is sent as `authorization: Bearer <token>` on every call: a fixed token, checked
    once, or a callable's answer, asked for and checked before each call."""

    __slots__ = ("_source",)

    def __init__(self, source: AsyncTokenSource) -> None:
        if isinstance(source, str):
            check_token(source, "token")
        elif not callable(source):
            raise TypeError("token: a string, or a callable returning one")
        self._source = source

    def header(self) -> tuple[str, str]:
        """The metadata entry for the next call."""
        if isinstance(self._source, str):
            return _header(self._source)
        token = self._source()
        if inspect.isawaitable(token):
            _close(token)
            raise TypeError("token: the callable returned an awaitable; use AsyncSagaClient")
        return _header(check_token(token, "token: the callable's answer"))

    async def header_async(self) -> tuple[str, str]:
        """The metadata entry for the next call; the callable may be a coroutine function."""
        if isinstance(self._source, str):
            return _header(self._source)
        token = self._source()
        if inspect.isawaitable(token):
            token = await token
        return _header(check_token(token, "token: the callable's answer"))

    def __repr__(self) -> str:
        return "BearerToken(<hidden>)"


def _header(token: str) -> tuple[str, str]:
    return ("authorization", f"Bearer {token}")


def _close(awaitable: object) -> None:
    close = getattr(awaitable, "close", None)
    if callable(close):
        close()  # no "never awaited" warning for a coroutine refused


class TokenFile:
    """A token kept in a file (only the token, optionally with a final newline), read again
    when the file changes: a rotated token is sent from the next call on. A file that cannot
    be read when it changes keeps the previous token (a rotation may replace it in two steps).
    """

    def __init__(self, path: str | Path, *, origin: str = "") -> None:
        self.path = Path(path).expanduser()
        self._where = f"token file {self.path}" + (f" ({origin})" if origin else "")
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._token = ""
        self._token = self._load()  # a file that does not work is reported at once

    def _load(self) -> str:
        try:
            stamp = _stamp(self.path)
            text = self.path.read_text(encoding="utf-8")
        except OSError as error:
            raise ValueError(f"{self._where}: cannot read it: {error.strerror}") from None
        except UnicodeDecodeError:
            raise ValueError(f"{self._where}: not a token: the file is not text") from None
        token = check_token(text.strip(), self._where)
        self._stamp = stamp
        return token

    def __call__(self) -> str:
        with self._lock:
            try:
                changed = _stamp(self.path) != self._stamp
            except OSError:
                changed = False
            if changed:
                # A file that does not load keeps the previous token; the coordinator says
                # whether that one is still good.
                with contextlib.suppress(ValueError):
                    self._token = self._load()
            return self._token

    def __repr__(self) -> str:
        return f"TokenFile({str(self.path)!r})"


def _stamp(path: Path) -> tuple[int, int, int]:
    info = path.stat()
    return (info.st_mtime_ns, info.st_size, info.st_ino)


@dataclass(frozen=True, repr=False)
class Connection:
    """Where the coordinator is and how to reach it: what `SagaClient.from_environment` and the
    `saga` command's client commands connect with."""

    target: str = DEFAULT_TARGET
    """host:port of the coordinator."""
    tls: ClientTLS | None = None
    """TLS settings; None: plaintext."""
    token: TokenSource | None = None
    """The bearer token, or what gives it (a `TokenFile`); None: no token is sent."""

    @classmethod
    def from_environment(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        config_file: str | Path | None = None,
        target: str | None = None,
        tls: bool = False,
        ca: str | Path | None = None,
        certificate: str | Path | None = None,
        key: str | Path | None = None,
        server_name: str | None = None,
        token_file: str | Path | None = None,
    ) -> Connection:
        """The settings from the explicit arguments, else the environment variables (`environ`,
        default `os.environ`), else the config file (`config_file`, else `SAGA_CLIENT_CONFIG`,
        else the default path, which may be missing). ValueError for anything that cannot work.
        """
        env = os.environ if environ is None else environ
        file = _ConfigFile.find(env, config_file)

        def pick(argument: Any, variable: str, key: str) -> tuple[Any, str]:
            if argument is not None:
                return argument, ""
            value = env.get(variable) or None
            if value is not None:
                return value, variable
            return file.get(key), file.origin(key)

        address, _ = pick(target, TARGET, "target")
        paths = {
            "ca": pick(ca, TLS_CA, "tls.ca"),
            "certificate": pick(certificate, TLS_CERT, "tls.certificate"),
            "key": pick(key, TLS_KEY, "tls.key"),
        }
        name, name_origin = pick(server_name, TLS_SERVER_NAME, "tls.server_name")
        wanted = tls or _flag(env, TLS) or file.get("tls") is True
        client_tls = None
        if wanted or name is not None or any(value is not None for value, _ in paths.values()):
            client_tls = _client_tls(paths, name, name_origin)
        return cls(
            str(address or DEFAULT_TARGET),
            client_tls,
            _token(env, file, token_file),
        )

    def __repr__(self) -> str:  # never the token
        token = "None" if self.token is None else "<hidden>"
        return f"Connection(target={self.target!r}, tls={self.tls!r}, token={token})"


def _flag(env: Mapping[str, str], name: str) -> bool:
    value = env.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}: expected true or false, got {value!r}")


def _client_tls(
    paths: Mapping[str, tuple[Any, str]], server_name: str | None, name_origin: str
) -> ClientTLS:
    (certificate, certificate_origin), (key, key_origin) = paths["certificate"], paths["key"]
    if key is not None and certificate is None:
        raise ValueError(
            f"a client key{_from(key_origin)} needs its certificate: give that too (saga "
            f"--cert, {TLS_CERT}, or tls.certificate in the config file)"
        )
    if certificate is not None and key is None:
        raise ValueError(
            f"a client certificate{_from(certificate_origin)} needs its key: give that too "
            f"(saga --key, {TLS_KEY}, or tls.key in the config file)"
        )
    pems: dict[str, bytes] = {}
    for field, (path, origin) in paths.items():
        if path is None:
            continue
        file = Path(path).expanduser()
        try:
            pems[field] = file.read_bytes()
        except OSError as error:
            raise ValueError(
                f"tls {field}{_from(origin)}: cannot read {file}: {error.strerror}"
            ) from None
    try:
        return ClientTLS(**pems, server_name=server_name)
    except ValueError as error:
        field = str(error).split(" ", 1)[0].rstrip(":")
        path, origin = paths.get(field, (None, name_origin))
        shown = f": {Path(path).expanduser()}" if path is not None else ""
        raise ValueError(f"tls {error}{shown}{_from(origin)}") from None


def _token(
    env: Mapping[str, str], file: _ConfigFile, token_file: str | Path | None
) -> TokenSource | None:
    if token_file is not None:
        return TokenFile(token_file)
    token, path = env.get(TOKEN) or None, env.get(TOKEN_FILE) or None
    if token is not None and path is not None:
        raise ValueError(f"set {TOKEN} or {TOKEN_FILE}, not both")
    if token is not None:
        return check_token(token, TOKEN)
    if path is not None:
        return TokenFile(path, origin=TOKEN_FILE)
    configured = file.get("token_file")
    if configured is not None:
        return TokenFile(configured, origin=file.origin("token_file"))
    return None


def _from(origin: str) -> str:
    return f" (from {origin})" if origin else ""


@dataclass(frozen=True)
class _ConfigFile:
    """The client config file's settings, checked, with paths made absolute."""

    path: Path | None
    values: Mapping[str, Any]

    @classmethod
    def find(cls, env: Mapping[str, str], explicit: str | Path | None) -> _ConfigFile:
        if explicit is not None:
            return cls.read(Path(explicit).expanduser(), required=True)
        named = env.get(CONFIG) or None
        if named is not None:
            return cls.read(Path(named).expanduser(), required=True)
        base = env.get("XDG_CONFIG_HOME") or None
        if base is None:
            home = env.get("HOME") or None
            base = str((Path(home) if home else Path.home()) / ".config")
        return cls.read(Path(base) / "saga" / "client.yaml", required=False)

    @classmethod
    def read(cls, path: Path, *, required: bool) -> _ConfigFile:
        import yaml  # only when there is a file to read

        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            if required:
                raise ValueError(f"client config {path}: no such file") from None
            return cls(None, {})
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"client config {path}: cannot read it: {error}") from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"client config {path}: not YAML: {error}") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ValueError(f"client config {path}: expected a mapping of {', '.join(_FILE_KEYS)}")
        if "token" in raw:
            raise ValueError(
                f"client config {path}: token: keep the token out of this file; put it in a file "
                "of its own, readable by you only, and name that with token_file"
            )
        unknown = sorted(set(map(str, raw)) - set(_FILE_KEYS))
        if unknown:
            raise ValueError(
                f"client config {path}: unknown key(s) {', '.join(unknown)}; expected "
                f"{', '.join(_FILE_KEYS)}"
            )
        values: dict[str, Any] = {}
        target = raw.get("target")
        if target is not None:
            if not isinstance(target, str) or not target:
                raise ValueError(f"client config {path}: target: host:port")
            values["target"] = target
        if "token_file" in raw:
            values["token_file"] = cls._path(path, "token_file", raw["token_file"])
        tls = raw.get("tls")
        if isinstance(tls, bool):
            values["tls"] = tls
        elif isinstance(tls, dict):
            unknown = sorted(set(map(str, tls)) - set(_TLS_KEYS))
            if unknown:
                raise ValueError(
                    f"client config {path}: tls: unknown key(s) {', '.join(unknown)}; expected "
                    f"{', '.join(_TLS_KEYS)}"
                )
            for field in ("ca", "certificate", "key"):
                if tls.get(field) is not None:
                    values[f"tls.{field}"] = cls._path(path, f"tls.{field}", tls[field])
            name = tls.get("server_name")
            if name is not None:
                if not isinstance(name, str):
                    raise ValueError(f"client config {path}: tls.server_name: a host name")
                values["tls.server_name"] = name
            values["tls"] = True
        elif tls is not None:
            raise ValueError(
                f"client config {path}: tls: true, or a mapping of {', '.join(_TLS_KEYS)}"
            )
        return cls(path, values)

    @staticmethod
    def _path(config: Path, key: str, value: object) -> Path:
        if not isinstance(value, str) or not value:
            raise ValueError(f"client config {config}: {key}: a file path")
        path = Path(value).expanduser()
        return path if path.is_absolute() else config.parent / path

    def get(self, key: str) -> Any:
        return self.values.get(key)

    def origin(self, key: str) -> str:
        return f"{self.path}: {key}" if self.path is not None else ""
