"""A corrupt database file at start: ``saga serve`` refuses to start, exit code 2, with a clear
message naming the file, and never overwrites or "repairs" it: its bytes are unchanged."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import sqlite3
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from saga.v1 import coordinator_service_pb2 as cpb
from saga.v1 import coordinator_service_pb2_grpc as cpb_grpc

from tests.faults.support import (
    Deployment,
    deploy,
    one_step_definition,
    serve_and_exit,
    wait_settled,
)


def _store_with_sagas(deployment: Deployment) -> None:
    """A real store, written by a coordinator that ran sagas and stopped cleanly."""
    deployment.start_participants()
    deployment.start_coordinator()
    ids = [f"s{i}" for i in range(40)]
    with grpc.insecure_channel(deployment.target) as channel:
        stub = cpb_grpc.CoordinatorServiceStub(channel)
        for saga_id in ids:
            request = cpb.CreateSagaRequest(saga_id=saga_id, definition="quick", input=b"{}")
            stub.CreateSaga(request, timeout=10)
    wait_settled(deployment.database, ids, 30)
    deployment.stop()


def _page_of(database: Path, name: str) -> tuple[int, int]:
    with contextlib.closing(sqlite3.connect(database)) as db:
        page_size = int(db.execute("PRAGMA page_size").fetchone()[0])
        (root,) = db.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = ?", (name,)
        ).fetchone()
    return page_size, int(root)


def _damage_page(name: str) -> Callable[[Path], None]:
    def damage(database: Path) -> None:
        page_size, root = _page_of(database, name)
        data = bytearray(database.read_bytes())
        start = (root - 1) * page_size
        noise = random.Random(7).randbytes(page_size // 2)
        data[start + 8 : start + 8 + len(noise)] = noise
        database.write_bytes(bytes(data))

    return damage


def _truncate(database: Path) -> None:
    data = database.read_bytes()
    database.write_bytes(data[: len(data) // 2 + 123])


def _random_bytes(database: Path) -> None:
    database.write_bytes(random.Random(3).randbytes(64 * 1024))


def _text_file(database: Path) -> None:
    database.write_text("database: this is not a database, it is a note\n" * 50)


def _foreign_database(database: Path) -> None:
    database.unlink()
    with contextlib.closing(sqlite3.connect(database)) as db:
        db.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, amount INTEGER)")
        db.executemany("INSERT INTO invoices (amount) VALUES (?)", [(i,) for i in range(100)])
        db.commit()


def _header_only(database: Path) -> None:
    data = bytearray(database.read_bytes())
    data[16:18] = b"\x00\x03"  # a page size that is not a power of two
    database.write_bytes(bytes(data))


CORRUPTIONS: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    # name: (how to damage a real store, words the message must contain (any of them))
    "random bytes": (_random_bytes, ("not a SQLite database",)),
    "a text file": (_text_file, ("not a SQLite database",)),
    "a truncated store": (_truncate, ("damaged", "integrity", "not a readable", "malformed")),
    "a damaged table page": (
        _damage_page("sagas"),
        ("damaged", "integrity", "not a readable", "malformed"),
    ),
    "a damaged index page": (
        _damage_page("sagas_by_state"),
        ("damaged", "integrity", "not a readable", "malformed"),
    ),
    "a damaged header": (
        _header_only,
        ("damaged", "integrity", "not a readable", "not a SQLite", "malformed"),
    ),
    "another application's database": (_foreign_database, ("another application",)),
}


@pytest.fixture(scope="module")
def pristine_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    deployment = deploy(tmp_path_factory.mktemp("store"), [one_step_definition("quick")])
    _store_with_sagas(deployment)
    assert (
        not Path(f"{deployment.database}-wal").exists()
        or os.path.getsize(f"{deployment.database}-wal") == 0
    )
    return deployment.database


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_database_is_refused_at_start_and_left_untouched(
    tmp_path: Path, pristine_store: Path, corruption: str
) -> None:
    damage, words = CORRUPTIONS[corruption]
    deployment = deploy(tmp_path, [one_step_definition("quick")])
    deployment.database.write_bytes(pristine_store.read_bytes())
    damage(deployment.database)
    before = hashlib.sha256(deployment.database.read_bytes()).hexdigest()
    size = deployment.database.stat().st_size

    done = serve_and_exit(deployment.config)

    output = done.stdout + done.stderr
    assert done.returncode == 2, f"exit code {done.returncode}:\n{output}"
    assert str(deployment.database) in output, output
    assert any(word in output for word in words), output
    assert "Traceback" not in output, output
    assert deployment.database.stat().st_size == size
    assert hashlib.sha256(deployment.database.read_bytes()).hexdigest() == before, (
        "the file was modified"
    )
    wal = Path(f"{deployment.database}-wal")
    assert not wal.exists() or wal.stat().st_size == 0, "frames were written next to it"
