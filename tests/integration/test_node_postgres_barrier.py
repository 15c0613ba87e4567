"""The Node.js SDK's PostgreSQL barrier against a real PostgreSQL server: its own test file run
with ``node --test`` (which cannot start a server as the ``postgres`` user itself), and a barrier
row written by Node.js answered by the Python SDK's barrier on the same table."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import psycopg
import pytest

from saga_sdk import BarrierKey, Operation, OutcomeKind, PermanentFailure
from saga_sdk.postgres_barrier import PostgresBarrier

NODE = shutil.which("node")
NODE_SDK = Path(__file__).resolve().parents[2] / "clients" / "node"

pytestmark = pytest.mark.skipif(NODE is None, reason="node (Node.js >= 20.6) is not on PATH")


def run_node(args: list[str], postgres_url: str, timeout: float = 120) -> str:
    assert NODE is not None
    env = {**os.environ, "SAGA_TEST_POSTGRES_URL": postgres_url}
    done = subprocess.run(
        [NODE, *args], cwd=NODE_SDK, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    return done.stdout


def test_the_node_postgres_barrier_tests_pass_on_a_real_server(postgres_url: str) -> None:
    output = run_node(["--test", "test/postgres_barrier.test.js"], postgres_url)
    counts = dict(re.findall(r"^# (pass|fail|skipped|cancelled) (\d+)$", output, re.MULTILINE))
    assert counts["fail"] == "0", output[-6000:]
    assert counts["cancelled"] == "0", output[-6000:]
    assert counts["skipped"] == "0", "SAGA_TEST_POSTGRES_URL was set: nothing may be skipped"
    assert int(counts["pass"]) >= 14, output[-6000:]


WRITE_FROM_NODE = """
import { BarrierKey, PermanentFailure } from './src/index.js';
import { PostgresBarrier } from './src/postgres.js';
const barrier = new PostgresBarrier(process.env.SAGA_TEST_POSTGRES_URL);
const key = (requestId) => new BarrierKey({
  sagaId: 'shared-1', step: 'charge', operation: 'execute', requestId });
await barrier.runEffect(key('exec-ok'), async (client) => {
  await client.query("INSERT INTO charges VALUES ('shared-1', 42)");
  return Buffer.from('{"charged":42}');
});
await barrier.runEffect(key('exec-never'), () => {
  throw new PermanentFailure('no XTS payments here', { reason: 'UNSUPPORTED_CURRENCY' });
}).catch((error) => { if (!(error instanceof PermanentFailure)) throw error; });
await barrier.close();
console.log('written');
"""


def test_rows_written_by_node_are_answered_by_the_python_barrier(postgres_url: str) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        connection.execute("CREATE TABLE charges (saga_id TEXT NOT NULL, amount INTEGER)")
    assert "written" in run_node(["--input-type=module", "-e", WRITE_FROM_NODE], postgres_url)

    def charge_again(connection: object) -> bytes:
        raise AssertionError("a call Node.js already answered must not run again")

    barrier = PostgresBarrier(postgres_url)
    try:
        key = BarrierKey("shared-1", "charge", Operation.EXECUTE, "exec-ok")
        outcome = barrier.run(key, charge_again)
        assert (outcome.kind, outcome.output) == (OutcomeKind.REPLAYED, b'{"charged":42}')
        with pytest.raises(PermanentFailure) as refused:
            barrier.run(
                BarrierKey("shared-1", "charge", Operation.EXECUTE, "exec-never"), charge_again
            )
        assert refused.value.reason == "UNSUPPORTED_CURRENCY"
    finally:
        barrier.close()
    with psycopg.connect(postgres_url) as connection:
        assert connection.execute("SELECT amount FROM charges").fetchall() == [(42,)]
