"""A throw-away PostgreSQL server for tests: a fresh cluster in a temporary directory.

``initdb`` and ``postgres`` refuse to run as root, so under root both run as the ``postgres``
user (the directory is handed to it). The server is the child process itself (no ``pg_ctl``
daemon in between): it is stopped, or killed, by its own pid, and can be started again on the
same port with the same data, as a database server that restarts would be.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import psycopg

_READY_TIMEOUT = 30.0
_STOP_TIMEOUT = 15.0


def postgres_bindir() -> Path | None:
    """Where PostgreSQL's server programs are (the newest installed), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=_major_version)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("postgres")
    return None if on_path is None else Path(on_path).parent


def _major_version(path: str) -> int:
    version = Path(path).parent.parent.name
    return int(version) if version.isdigit() else 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PostgresServer:
    """One PostgreSQL cluster on ``127.0.0.1:port``, trusting every local connection."""

    def __init__(self, bindir: Path, workdir: Path, *, max_connections: int = 300) -> None:
        """Prepare a cluster in ``workdir``; ``start`` creates and runs it."""
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
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The server's (postmaster's) process id while it runs."""
        return self._process.pid if self.running and self._process else None

    def start(self) -> None:
        """Create the cluster on first use, then run the server until it accepts connections.

        A port taken by someone else between choosing it and binding it is retried with
        another; a restart keeps its port.
        """
        if self.running:
            return
        if not self.data.exists():
            self._init()
        if self.port:
            if self._run():
                return
        else:
            for _ in range(3):
                self.port = _free_port()
                if self._run():
                    return
        raise RuntimeError(f"PostgreSQL did not start; its log:\n{self._log_tail()}")

    def stop(self, *, immediate: bool = False) -> None:
        """Stop the server: a fast shutdown (SIGINT), or an immediate one (SIGQUIT) that skips
        the checkpoint, as a crash would; killed if it does not stop in time."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGQUIT if immediate else signal.SIGINT)
            try:
                process.wait(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._process = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def create_database(self, name: str | None = None) -> str:
        """A new, empty database; returns its name."""
        name = name or f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"'.encode())
        return name

    def drop_database(self, name: str) -> None:
        """Drop a database, closing the connections still open to it."""
        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())

    def remove(self) -> None:
        """Stop the server and delete its directory."""
        self.stop(immediate=True)
        shutil.rmtree(self.workdir, ignore_errors=True)

    # --- internals -----------------------------------------------------------------------------

    def _init(self) -> None:
        if self._user is not None:
            shutil.chown(self.workdir, self._user, self._user)
        subprocess.run(
            [
                *self._as_user_prefix(),
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            timeout=120,
            cwd=self.workdir,
            env=self._environment(),
        )

    def _run(self) -> bool:
        """Start the server on ``self.port``; True once it accepts connections, False if it
        exited first (its port was taken, say)."""
        self._log_file = self.log.open("ab")
        self._process = subprocess.Popen(
            [
                *self._as_user_prefix(),
                str(self.bindir / "postgres"),
                "-D",
                str(self.data),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-k",
                str(self.workdir),
                # No flush to disk: every commit is cheap, and a killed server still recovers
                # every commit from the WAL in the OS's cache (only a machine crash could lose
                # them). synchronous_commit stays on: a commit is in the WAL when acknowledged.
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
                "-c",
                f"max_connections={self.max_connections}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env=self._environment(),
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
        self.stop(immediate=True)
        raise RuntimeError(f"PostgreSQL did not accept connections; its log:\n{self._log_tail()}")

    def _as_user_prefix(self) -> list[str]:
        """``setpriv``, which switches to the user and then executes the program: the server
        is still the child itself. Popen's own ``user`` and ``group`` would make Python fork
        rather than vfork, and a forked child of a process whose gRPC threads are busy (a test
        restarting the server under load) may crash before it executes anything."""
        if self._user is None:
            return []
        record = pwd.getpwnam(self._user)
        return [
            "setpriv",
            f"--reuid={record.pw_uid}",
            f"--regid={record.pw_gid}",
            "--clear-groups",
            "--",
        ]

    def _environment(self) -> dict[str, str] | None:
        if self._user is None:
            return None
        record = pwd.getpwnam(self._user)
        return {**os.environ, "HOME": record.pw_dir, "USER": self._user}

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-4000:]
        return "(no log)"


@contextlib.contextmanager
def postgres_server(*, max_connections: int = 300) -> Iterator[PostgresServer]:
    """A running throw-away server, stopped and removed at the end."""
    bindir = postgres_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL's server programs (initdb, postgres) were not found")
    server = PostgresServer(
        bindir, Path(tempfile.mkdtemp(prefix="saga-pg-")), max_connections=max_connections
    )
    try:
        server.start()
        yield server
    finally:
        server.remove()
