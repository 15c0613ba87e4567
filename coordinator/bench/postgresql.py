"""PostgreSQL for ``saga bench``: a throwaway server, a fresh database per case, its counters.

The server the bench starts (``--postgresql``) keeps PostgreSQL's durable defaults, ``fsync``,
``synchronous_commit`` and ``full_page_writes`` on: a saga a replica has acknowledged is on
disk, as with the SQLite coordinator at ``synchronous=FULL``. ``initdb`` and ``postgres`` refuse
to run as root; under root both run as the ``postgres`` user, which is handed the directory.
psycopg (the ``postgresql`` extra) is imported only when PostgreSQL is asked for.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

from coordinator.bench.measure import server_cpu_seconds
from coordinator.bench.processes import BenchError, free_port

SCHEMES = ("postgresql://", "postgres://")
SETTINGS = ("fsync", "synchronous_commit", "full_page_writes", "wal_sync_method")
"""The server settings that decide what a commit costs, read back for the report."""

_READY_TIMEOUT = 60.0
_STOP_TIMEOUT = 30.0


def _require_psycopg() -> None:
    if importlib.util.find_spec("psycopg") is None:
        raise BenchError("PostgreSQL needs psycopg: install saga-coordinator[postgresql]")


def shown(url: str) -> str:
    """A URL to print: without its password."""
    parts = urlsplit(url)
    user, at, host = parts.netloc.rpartition("@")
    netloc = f"{user.partition(':')[0]}{at}{host}"
    return urlunsplit(parts._replace(netloc=netloc))


def with_database(url: str, name: str) -> str:
    """``url`` naming another database of the same server."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def server_programs() -> Path | None:
    """Where PostgreSQL's server programs are (the newest installed), or None."""

    def major(path: str) -> int:
        version = Path(path).parent.parent.name
        return int(version) if version.isdigit() else 0

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=major)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("postgres")
    return None if on_path is None else Path(on_path).parent


class Server:
    """A PostgreSQL cluster in a temporary directory, on a loopback port, trusting local users."""

    def __init__(self, bindir: Path, workdir: Path, *, max_connections: int) -> None:
        self.bindir = bindir
        self.workdir = workdir
        self.data = workdir / "data"
        self.log = workdir / "postgres.log"
        self.port = 0
        self.max_connections = max_connections
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._user = "postgres" if os.geteuid() == 0 else None

    def url(self, database: str = "postgres") -> str:
        """The URL of one of the server's databases."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while it runs."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def start(self) -> None:
        """Create the cluster, then run the server until it accepts connections."""
        self._init()
        for _ in range(3):  # a port taken between choosing and binding it: another one
            self.port = free_port()
            if self._run():
                return
        raise BenchError(f"PostgreSQL did not start (see {self.log})")

    def stop(self) -> None:
        """A fast shutdown (SIGINT); killed if it does not end in time."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _init(self) -> None:
        if self._user is not None:
            shutil.chown(self.workdir, self._user, self._user)
        # --no-sync skips only initdb's final flush of the new cluster's files; the server
        # itself runs with fsync on.
        done = subprocess.run(
            [
                str(self.bindir / "initdb"),
                *("-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8"),
                *("--locale=C", "--no-sync"),
            ],
            capture_output=True,
            timeout=120,
            cwd=self.workdir,
            check=False,
            **self._as_user(),
        )
        if done.returncode != 0:
            raise BenchError(f"initdb failed: {done.stderr.decode(errors='replace')[-2000:]}")

    def _run(self) -> bool:
        """True once the server accepts connections; False if it exited first (port taken)."""
        _require_psycopg()
        import psycopg

        self._log_file = self.log.open("ab")
        self._process = subprocess.Popen(
            [
                str(self.bindir / "postgres"),
                *("-D", str(self.data), "-h", "127.0.0.1", "-p", str(self.port)),
                *("-k", str(self.workdir), "-c", f"max_connections={self.max_connections}"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            **self._as_user(),
        )
        deadline = time.monotonic() + _READY_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self.stop()
                return False
            try:
                with psycopg.connect(self.url(), connect_timeout=2):
                    return True
            except psycopg.OperationalError:
                time.sleep(0.05)
        self.stop()
        raise BenchError(f"PostgreSQL did not accept connections (see {self.log})")

    def _as_user(self) -> dict[str, Any]:
        if self._user is None:
            return {}
        try:
            record = pwd.getpwnam(self._user)
        except KeyError:
            raise BenchError(
                "PostgreSQL refuses to run as root, and there is no postgres user to run it"
            ) from None
        return {
            "user": record.pw_uid,
            "group": record.pw_gid,
            "extra_groups": [],
            "env": {**os.environ, "HOME": record.pw_dir, "USER": self._user},
        }


@contextlib.contextmanager
def throwaway_server(*, max_connections: int) -> Iterator[Server]:
    """A running server in a new temporary directory, stopped and removed at the end."""
    bindir = server_programs()
    if bindir is None:
        raise BenchError("PostgreSQL's server programs (initdb, postgres) were not found")
    server = Server(
        bindir, Path(tempfile.mkdtemp(prefix="saga-bench-pg-")), max_connections=max_connections
    )
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)


class PostgreSQL:
    """The server the replicas run on, reached through ``url`` (a database to connect to).

    ``pid``: its postmaster's, when the bench started it and can read its CPU time. One
    connection stays open for the bench's own queries, so that no backend of the bench's
    starts or ends while a case is measured. Close it with ``close``.
    """

    def __init__(self, url: str, pid: int | None = None) -> None:
        _require_psycopg()
        import psycopg

        self.url = url
        self.pid = pid
        try:
            self._connection = psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.Error as error:
            raise BenchError(f"cannot reach PostgreSQL at {shown(url)}: {error}") from None
        self._has_stat_wal = bool(
            self._execute("SELECT to_regclass('pg_catalog.pg_stat_wal') IS NOT NULL")[0][0]
        )

    def _execute(self, query: str) -> list[tuple[Any, ...]]:
        import psycopg

        try:
            cursor = self._connection.execute(query.encode())
            return list(cursor.fetchall()) if cursor.description else []
        except psycopg.Error as error:
            raise BenchError(f"PostgreSQL at {shown(self.url)}: {error}") from None

    def close(self) -> None:
        """Close the bench's connection."""
        self._connection.close()

    def facts(self) -> dict[str, str]:
        """The server's version and the settings that decide what a commit costs."""
        names = ", ".join(f"'{name}'" for name in SETTINGS)
        rows = self._execute(
            "SELECT name, setting FROM pg_settings "
            f"WHERE name IN ('server_version', {names}) ORDER BY name"
        )
        return {str(name): str(setting) for name, setting in rows}

    def create_database(self) -> str:
        """A new, empty database; its URL."""
        name = f"saga_bench_{uuid.uuid4().hex[:12]}"
        self._execute(f'CREATE DATABASE "{name}"')
        return with_database(self.url, name)

    def drop_database(self, url: str) -> None:
        """Drop a database ``create_database`` made, closing what is still connected to it."""
        name = urlsplit(url).path.lstrip("/")
        assert name.startswith("saga_bench_")
        self._execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    @property
    def counts_wal_syncs(self) -> bool:
        """Whether the server counts its WAL syncs (``pg_stat_wal``, PostgreSQL 14+)."""
        return self._has_stat_wal

    def wal_syncs(self) -> int | None:
        """WAL flushes to disk of the whole server so far (``pg_stat_wal``, PostgreSQL 14+).

        Backends report their counts at most once a second and on going idle, so a reading
        is exact only once the server has been idle for a little over a second.
        """
        if not self._has_stat_wal:
            return None
        rows = self._execute("SELECT wal_sync FROM pg_stat_wal")
        return int(rows[0][0]) if rows else None

    def cpu_seconds(self) -> float | None:
        """CPU seconds of the server's processes so far; None when its pid is unknown."""
        if self.pid is None:
            return None
        try:
            return server_cpu_seconds(self.pid)
        except OSError:
            return None
