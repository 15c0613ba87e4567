"""``saga bench`` with PostgreSQL: replicas on one database, beside the coordinator on SQLite."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from coordinator.bench import report as bench_report
from coordinator.bench import run
from coordinator.bench.client import round_robin
from coordinator.bench.postgresql import PostgreSQL, shown, throwaway_server, with_database
from coordinator.cli import main
from tests.support.postgres import PostgresServer

# The real run starts a client and fresh coordinators for each of its four cases: a busy
# machine may need the time.
pytestmark = pytest.mark.timeout(300)


def _options(*argv: str) -> run.Options:
    parser = argparse.ArgumentParser()
    run.add_arguments(parser)
    return run.options_from(parser.parse_args(argv))


def test_without_postgresql_options_the_bench_measures_no_replicas() -> None:
    options = _options()
    assert not options.postgresql
    assert options.replicas == ()
    assert options.database is None


def test_a_postgresql_server_measures_1_2_and_3_replicas_unless_told_otherwise() -> None:
    assert _options("--postgresql").replicas == (1, 2, 3)
    url = "postgresql://bench@127.0.0.1:5432/sagas"
    options = _options("--database", url, "--replicas", "2,4")
    assert options.postgresql
    assert options.database == url
    assert options.replicas == (2, 4)


@pytest.mark.parametrize(
    "argv",
    [
        ("--database", "sqlite:///saga.db"),
        ("--database", "postgresql://a@b/c", "--postgresql"),
        ("--postgresql", "--replicas", "0"),
        ("--postgresql", "--replicas", "two"),
    ],
)
def test_bad_postgresql_options_are_refused_by_the_parser(
    argv: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["bench", *argv])
    assert exited.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_replicas_without_a_postgresql_server_exit_2_and_say_why(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["bench", "--replicas", "2"]) == 2
    assert "--replicas needs --database postgresql://... or --postgresql" in (
        capsys.readouterr().err
    )


def test_a_database_url_is_shown_without_its_password() -> None:
    url = "postgresql://bench:secret@db.example:5432/sagas?sslmode=require"
    assert shown(url) == "postgresql://bench@db.example:5432/sagas?sslmode=require"
    assert with_database(url, "other") == (
        "postgresql://bench:secret@db.example:5432/other?sslmode=require"
    )


def test_sagas_are_spread_over_the_replicas_in_turn() -> None:
    targets = ["a:1", "b:2", "c:3"]
    assert [round_robin(index, targets) for index in range(7)] == [
        "a:1",
        "b:2",
        "c:3",
        "a:1",
        "b:2",
        "c:3",
        "a:1",
    ]


def test_the_throwaway_server_keeps_postgresql_durable_defaults() -> None:
    with throwaway_server(max_connections=40) as server:
        postgresql = PostgreSQL(server.url(), server.pid)
        try:
            facts = postgresql.facts()
            assert facts["fsync"] == "on"
            assert facts["synchronous_commit"] == "on"
            assert facts["full_page_writes"] == "on"
            assert facts["server_version"]
            assert postgresql.counts_wal_syncs
            cpu = postgresql.cpu_seconds()
            assert cpu is not None
            assert cpu > 0
            database = postgresql.create_database()
            with psycopg.connect(database) as connection:
                assert connection.execute("SELECT 1").fetchone() == (1,)
            postgresql.drop_database(database)
        finally:
            postgresql.close()
        workdir = server.workdir
        assert workdir.exists()
    assert not workdir.exists()


@pytest.fixture(scope="module")
def replicas_report(postgres_server: PostgresServer) -> Iterator[dict[str, Any]]:
    """One short bench run with 2 replicas, on a database of the tests' PostgreSQL server."""
    name = postgres_server.create_database()
    url = postgres_server.url(name)
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "coordinator.cli",
                "bench",
                "--sagas",
                "12",
                "--concurrency",
                "3",
                "--variant",
                "compensating",
                "--warmup",
                "4",
                "--database",
                url,
                "--replicas",
                "2",
                "--output",
                "json",
            ],
            capture_output=True,
            timeout=280,
            check=False,
        )
        assert done.returncode == 0, done.stderr.decode()[-3000:]
        document: dict[str, Any] = json.loads(done.stdout)
        with psycopg.connect(url) as connection:
            document["databases left"] = connection.execute(
                "SELECT count(*) FROM pg_database WHERE datname LIKE 'saga_bench_%'"
            ).fetchone()
        yield document
    finally:
        postgres_server.drop_database(name)


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and value > 0


def test_two_replicas_are_measured_and_verified_beside_sqlite(
    replicas_report: dict[str, Any],
) -> None:
    assert replicas_report["verified"] is True
    assert replicas_report["mismatches"] == []
    (case,) = replicas_report["cases"]
    assert case["coordinator"]["verified"] is True
    (replicas,) = case["postgresql"]
    assert replicas["replicas"] == 2
    assert replicas["verified"] is True
    assert replicas["wrong_endings"] == 0
    assert _positive(replicas["sagas_per_second"])
    latency = replicas["latency_ms"]
    assert all(_positive(latency[q]) for q in ("p50", "p95", "p99"))
    assert latency["p50"] <= latency["p95"] <= latency["p99"]


def test_the_cpu_of_every_replica_is_summed_and_compared_with_sqlite(
    replicas_report: dict[str, Any],
) -> None:
    (case,) = replicas_report["cases"]
    (replicas,) = case["postgresql"]
    cpu = replicas["cpu_ms_per_saga"]
    assert set(cpu["each_replica"]) == {"bench-1", "bench-2"}
    assert all(_positive(value) for value in cpu["each_replica"].values())
    assert cpu["coordinator"] == pytest.approx(sum(cpu["each_replica"].values()))
    assert _positive(cpu["client"])
    assert _positive(cpu["participants"])
    # A server the bench did not start: its CPU is not read.
    assert cpu["postgresql"] is None
    ratios = replicas["over_sqlite"]
    assert ratios["sagas_per_second"] == pytest.approx(
        replicas["sagas_per_second"] / case["coordinator"]["sagas_per_second"]
    )
    assert ratios["coordinator_cpu"] == pytest.approx(
        cpu["coordinator"] / case["coordinator"]["cpu_ms_per_saga"]["coordinator"]
    )
    # The tests' server runs without fsync: it syncs no WAL, and the figure says so.
    assert replicas["wal_syncs_per_saga"] == 0


def test_the_report_names_the_server_and_its_settings_as_they_are(
    replicas_report: dict[str, Any],
) -> None:
    postgresql = replicas_report["settings"]["postgresql"]
    assert postgresql["replicas"] == [2]
    assert postgresql["server"].startswith("postgresql://postgres@127.0.0.1:")
    # The tests' server runs without fsync, and the report says so.
    assert postgresql["settings"]["fsync"] == "off"
    assert postgresql["settings"]["synchronous_commit"] == "on"
    assert postgresql["server_cpu_counted"] is False


def test_each_case_database_is_dropped_after_it(replicas_report: dict[str, Any]) -> None:
    assert replicas_report["databases left"] == (0,)


def test_the_table_shows_the_replicas_under_the_sqlite_line(
    replicas_report: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    bench_report.render(replicas_report)
    out = capsys.readouterr().out
    assert "Replicas on one PostgreSQL database, against one coordinator on SQLite" in out
    assert "fsync=off" in out
    rows = [line.split() for line in out.splitlines()]
    sqlite = rows.index(next(row for row in rows if row[:3] == ["3", "compensating", "SQLite"]))
    assert rows[sqlite][4] == "1.00"  # ÷SQLite
    assert rows[sqlite + 1][:2] == ["PG", "×2"]
    assert "verified" in out
