"""``open_store`` picks the adapter by URL and explains the URLs it accepts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from coordinator.store import open_store, redacted_url, sqlite_path
from coordinator.store.errors import InvalidStoreUrl
from coordinator.store.memory import MemoryStore
from coordinator.store.sqlite import SqliteStore


async def test_memory_url_opens_the_in_memory_store() -> None:
    store = await open_store("memory:")

    assert isinstance(store, MemoryStore)
    await store.close()


async def test_sqlite_url_with_three_slashes_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = await open_store("sqlite:///sagas.db", synchronous="NORMAL")
    try:
        assert isinstance(store, SqliteStore)
        assert store.path == Path("sagas.db")
        assert store.path.resolve() == tmp_path / "sagas.db"
    finally:
        await store.close()


async def test_sqlite_url_with_four_slashes_is_absolute(tmp_path: Path) -> None:
    store = await open_store(f"sqlite:///{tmp_path}/sagas.db")
    try:
        assert isinstance(store, SqliteStore)
        assert store.path == tmp_path / "sagas.db"
        assert store.path.is_absolute()
    finally:
        await store.close()


def test_sqlite_urls_map_to_paths() -> None:
    assert sqlite_path("sqlite:///data/sagas.db") == Path("data/sagas.db")
    assert sqlite_path("sqlite:////var/lib/saga/sagas.db") == Path("/var/lib/saga/sagas.db")


@pytest.mark.parametrize("url", ["postgresql:/sagas", "sagas.db", "", "memory", "mysql://x"])
async def test_an_unsupported_url_is_refused_naming_the_accepted_ones(url: str) -> None:
    with pytest.raises(InvalidStoreUrl, match=r"'memory:'.*'sqlite:///") as refused:
        await open_store(url)

    assert isinstance(refused.value, ValueError)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("sqlite://sagas.db", "sqlite:///relative"),
        ("sqlite:///", "names no file"),
        ("sqlite:///data/", "names no file"),
        ("sqlite:///:memory:", "use 'memory:'"),
        ("sqlite:///sagas.db?mode=ro", "not in the URL"),
    ],
)
async def test_an_invalid_sqlite_url_is_refused_saying_why(url: str, why: str) -> None:
    with pytest.raises(InvalidStoreUrl, match=re.escape(why)):
        await open_store(url)


async def test_the_memory_store_takes_no_options() -> None:
    with pytest.raises(TypeError, match="no options"):
        await open_store("memory:", synchronous="FULL")


def test_a_password_in_a_store_url_is_never_shown() -> None:
    assert (
        redacted_url("postgresql://saga:s3cr%40t@db.internal:5432/sagas")
        == "postgresql://saga:***@db.internal:5432/sagas"
    )
    assert redacted_url("postgresql://saga@db/sagas") == "postgresql://saga@db/sagas"
    assert redacted_url("sqlite:///data/sagas.db") == "sqlite:///data/sagas.db"


async def test_an_unsupported_url_is_refused_without_its_password() -> None:
    with pytest.raises(InvalidStoreUrl) as refused:
        await open_store("mysql://saga:hunter2@db/sagas")

    assert "hunter2" not in refused.value.message
    assert "mysql://saga:***@db/sagas" in refused.value.message
