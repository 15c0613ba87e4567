// The PostgreSQL barrier's guarantees, on a real PostgreSQL server named by
// SAGA_TEST_POSTGRES_URL (tests/integration/test_node_postgres_barrier.py starts one and runs
// this file): once-only effects, replayed answers, null compensations, no hanging Execute,
// concurrent duplicates, the handler's writes in the barrier's transaction, and pruning old
// rows. Without the variable every test is skipped, visibly.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import grpc from '@grpc/grpc-js';
import pg from 'pg';
import {
  BarrierKey,
  ExecuteAfterCompensate,
  OutcomeKind,
  Participant,
  PermanentFailure,
  Rejected,
  RetryLater,
} from '../src/index.js';
import { PostgresBarrier } from '../src/postgres.js';
import { ParticipantTestKit } from '../src/testing.js';
import { call, compensateRequest, executeRequest, serve, silentLogger } from './helpers.js';
import { DAY_MS, pruneContract, sagaKey } from './prune_contract.js';

const URL = process.env.SAGA_TEST_POSTGRES_URL ?? '';
const skip = URL
  ? false
  : 'SAGA_TEST_POSTGRES_URL is not set (tests/integration/test_node_postgres_barrier.py sets it)';

const EXECUTE = BarrierKey.forExecute(executeRequest());
const COMPENSATE = BarrierKey.forCompensate(compensateRequest());

let tables = 0;

/** A barrier on its own table, with an `entries` table of its own next to it. */
async function ledger(t, options = {}) {
  tables += 1;
  const suffix = `${process.pid}_${tables}`;
  const barrier = new PostgresBarrier(URL, { table: `barrier_${suffix}`, ...options });
  const entries = `entries_${suffix}`;
  const admin = new pg.Pool({ connectionString: URL, max: 2 });
  t.after(async () => {
    await barrier.close();
    await admin.end();
  });
  await admin.query(`CREATE TABLE ${entries} (saga_id TEXT NOT NULL, amount INTEGER NOT NULL)`);
  const credit =
    (amount, output = { credited: amount }) =>
    async (client) => {
      await client.query(`INSERT INTO ${entries} VALUES ($1, $2)`, ['s-1', amount]);
      return Buffer.from(JSON.stringify(output));
    };
  return {
    barrier,
    admin,
    entries,
    credit,
    amounts: async () =>
      (await admin.query(`SELECT amount FROM ${entries} ORDER BY ctid`)).rows.map((r) => r.amount),
    rows: async () =>
      (
        await admin.query(
          `SELECT operation, request_id, state, reason FROM ${barrier.table} ORDER BY created_at, operation`,
        )
      ).rows,
  };
}

test('a repeated Execute applies its effect once and answers the first output again', { skip }, async (t) => {
  const { barrier, credit, amounts } = await ledger(t);
  const first = await barrier.runEffect(EXECUTE, credit(10));
  const again = await barrier.runEffect(EXECUTE, credit(99));
  assert.equal(first.kind, OutcomeKind.APPLIED);
  assert.equal(again.kind, OutcomeKind.REPLAYED);
  assert.deepEqual(again.output, first.output);
  assert.deepEqual(await amounts(), [10]);
});

test('a Compensate after its Execute runs its effect once', { skip }, async (t) => {
  const { barrier, credit, amounts } = await ledger(t);
  await barrier.runEffect(EXECUTE, credit(10));
  assert.equal((await barrier.runEffect(COMPENSATE, credit(-10))).kind, OutcomeKind.APPLIED);
  assert.equal((await barrier.runEffect(COMPENSATE, credit(-10))).kind, OutcomeKind.REPLAYED);
  assert.deepEqual(await amounts(), [10, -10]);
});

test('a Compensate before its Execute is a null compensation and the late Execute is refused', { skip }, async (t) => {
  const { barrier, credit, amounts, rows } = await ledger(t);
  const undo = await barrier.runEffect(COMPENSATE, credit(-10));
  assert.equal(undo.kind, OutcomeKind.NULL_COMPENSATION);
  assert.equal(undo.output.length, 0);
  await assert.rejects(barrier.runEffect(EXECUTE, credit(10)), ExecuteAfterCompensate);
  await assert.rejects(barrier.runEffect(EXECUTE, credit(10)), {
    reason: 'EXECUTE_AFTER_COMPENSATE',
  });
  assert.equal((await barrier.runEffect(COMPENSATE, credit(-10))).kind, OutcomeKind.REPLAYED);
  assert.deepEqual(await amounts(), [], 'no effect at all: nothing hangs');
  assert.deepEqual(await rows(), [
    { operation: 'compensate', request_id: 'comp-1', state: 'done', reason: '' },
    { operation: 'execute', request_id: 'exec-1', state: 'blocked', reason: '' },
  ]);
});

test('a rejection rolls back its writes, is recorded and is replayed', { skip }, async (t) => {
  const { barrier, credit, entries, amounts } = await ledger(t);
  const refuse = async (client) => {
    await client.query(`INSERT INTO ${entries} VALUES ('s-1', 10)`);
    throw new Rejected('NO_FUNDS', 'balance too low');
  };
  await assert.rejects(barrier.runEffect(EXECUTE, refuse), { reason: 'NO_FUNDS' });
  await assert.rejects(barrier.runEffect(EXECUTE, credit(10)), (error) => {
    assert.ok(error instanceof Rejected);
    assert.equal(error.reason, 'NO_FUNDS');
    assert.equal(error.message, 'balance too low');
    return true;
  });
  assert.deepEqual(await amounts(), []);
  assert.equal((await barrier.lookup(EXECUTE)).state, 'rejected');
  // Nothing was applied, so its compensation is a null one.
  assert.equal((await barrier.runEffect(COMPENSATE, credit(-10))).kind, OutcomeKind.NULL_COMPENSATION);
  assert.deepEqual(await amounts(), []);
});

test('a permanent failure rolls back, is stored as failed and is answered again', { skip }, async (t) => {
  const { barrier, credit, entries, amounts } = await ledger(t);
  const unusable = async (client) => {
    await client.query(`INSERT INTO ${entries} VALUES ('s-1', 10)`);
    throw new PermanentFailure('no such currency: XTS', { reason: 'UNKNOWN_CURRENCY' });
  };
  await assert.rejects(barrier.runEffect(EXECUTE, unusable), PermanentFailure);
  await assert.rejects(barrier.runEffect(EXECUTE, credit(10)), (error) => {
    assert.ok(error instanceof PermanentFailure);
    assert.equal(error.reason, 'UNKNOWN_CURRENCY');
    assert.equal(error.message, 'no such currency: XTS');
    return true;
  });
  assert.deepEqual(await amounts(), []);
  assert.equal((await barrier.lookup(EXECUTE)).state, 'failed');
});

test('RetryLater and other errors roll back everything and leave no row: the retry runs afresh', { skip }, async (t) => {
  const { barrier, credit, entries, amounts } = await ledger(t);
  for (const error of [new RetryLater('ledger busy', { retryAfterMs: 100 }), new Error('disk on fire')]) {
    const fail = async (client) => {
      await client.query(`INSERT INTO ${entries} VALUES ('s-1', 10)`);
      throw error;
    };
    await assert.rejects(barrier.runEffect(EXECUTE, fail), (thrown) => thrown === error);
    assert.equal(await barrier.lookup(EXECUTE), null);
    assert.deepEqual(await amounts(), []);
  }
  assert.equal((await barrier.runEffect(EXECUTE, credit(10))).kind, OutcomeKind.APPLIED);
  assert.deepEqual(await amounts(), [10]);
});

test('a rejected Compensate is not remembered: sent again, it runs afresh', { skip }, async (t) => {
  const { barrier, credit, entries, amounts } = await ledger(t);
  await barrier.runEffect(EXECUTE, credit(10));
  const refuse = async (client) => {
    await client.query(`INSERT INTO ${entries} VALUES ('s-1', -5)`);
    throw new Rejected('LEDGER_LOCKED', 'the ledger is locked');
  };
  await assert.rejects(barrier.runEffect(COMPENSATE, refuse), { reason: 'LEDGER_LOCKED' });
  assert.equal(await barrier.lookup(COMPENSATE), null);
  assert.equal((await barrier.runEffect(COMPENSATE, credit(-10))).kind, OutcomeKind.APPLIED);
  assert.deepEqual(await amounts(), [10, -10]);
});

test("the handler's writes are in the barrier's transaction: invisible until it commits, undone with it", { skip }, async (t) => {
  const { barrier, admin, entries, amounts } = await ledger(t);
  const seenOutside = async () => ({
    entries: Number((await admin.query(`SELECT count(*) AS n FROM ${entries}`)).rows[0].n),
    barrier: Number((await admin.query(`SELECT count(*) AS n FROM ${barrier.table}`)).rows[0].n),
  });
  let during;
  const write = async (client) => {
    await client.query(`INSERT INTO ${entries} VALUES ('s-1', 10)`);
    during = await seenOutside();
    return Buffer.from('ok');
  };
  await barrier.runEffect(EXECUTE, write);
  assert.deepEqual(during, { entries: 0, barrier: 0 }, 'another connection sees nothing uncommitted');
  assert.deepEqual(await seenOutside(), { entries: 1, barrier: 1 }, 'both committed together');

  // The business write fails after the barrier row was written: neither is left.
  const violate = async (client) => {
    await client.query(`INSERT INTO ${entries} VALUES ('s-1', -10)`);
    await client.query(`INSERT INTO ${entries} VALUES ('s-1', NULL)`); // NOT NULL violation
    return Buffer.from('unreachable');
  };
  await assert.rejects(barrier.runEffect(COMPENSATE, violate), { code: '23502' });
  assert.equal(await barrier.lookup(COMPENSATE), null);
  assert.deepEqual(await amounts(), [10]);
});

test('concurrent duplicates of one Execute apply it once and all get the same answer', { skip }, async (t) => {
  const { barrier, entries, amounts } = await ledger(t, { max: 8 });
  let prepared = 0;
  const prepare = async () => {
    prepared += 1;
    return async (client) => {
      await client.query('SELECT pg_sleep(0.05)'); // hold the row lock while duplicates arrive
      await client.query(`INSERT INTO ${entries} VALUES ('s-1', 10)`);
      return Buffer.from(`applied by call ${prepared}`);
    };
  };
  const outcomes = await Promise.all(Array.from({ length: 8 }, () => barrier.run(EXECUTE, prepare)));
  assert.deepEqual(await amounts(), [10]);
  assert.equal(prepared, 1, 'duplicates wait on the barrier row instead of preparing again');
  assert.equal(outcomes.filter((o) => o.kind === OutcomeKind.APPLIED).length, 1);
  assert.equal(outcomes.filter((o) => o.kind === OutcomeKind.REPLAYED).length, 7);
  assert.equal(new Set(outcomes.map((o) => o.output.toString())).size, 1);
});

test('concurrent duplicates of a Compensate racing its Execute: one effect, no hanging Execute', { skip }, async (t) => {
  const { barrier, credit, amounts } = await ledger(t, { max: 8 });
  const calls = [];
  for (let i = 0; i < 4; i += 1) {
    calls.push(barrier.runEffect(EXECUTE, credit(10)).catch((error) => error));
    calls.push(barrier.runEffect(COMPENSATE, credit(-10)).catch((error) => error));
  }
  const answers = await Promise.all(calls);
  for (const answer of answers) {
    if (answer instanceof Error) assert.ok(answer instanceof ExecuteAfterCompensate, answer.stack);
  }
  const total = (await amounts()).reduce((sum, amount) => sum + amount, 0);
  assert.equal(total, 0, 'either both applied once, or neither');
  const executeState = (await barrier.lookup(EXECUTE)).state;
  if (executeState === 'blocked') {
    assert.ok(answers.some((a) => a instanceof ExecuteAfterCompensate));
  } else {
    assert.equal(executeState, 'done');
    assert.deepEqual(await amounts(), [10, -10]);
  }
});

test('the table has the Python SDK layout, and one of an older SDK is upgraded in place', { skip }, async (t) => {
  const { barrier, admin, credit } = await ledger(t);
  await barrier.migrate();
  const columns = (
    await admin.query(
      'SELECT column_name, data_type, is_nullable FROM information_schema.columns ' +
        'WHERE table_name = $1 ORDER BY ordinal_position',
      [barrier.table],
    )
  ).rows;
  assert.deepEqual(
    columns.map((c) => [c.column_name, c.data_type, c.is_nullable]),
    [
      ['saga_id', 'text', 'NO'],
      ['step', 'text', 'NO'],
      ['operation', 'text', 'NO'],
      ['request_id', 'text', 'NO'],
      ['state', 'text', 'NO'],
      ['output', 'bytea', 'YES'],
      ['reason', 'text', 'NO'],
      ['message', 'text', 'NO'],
      ['created_at', 'timestamp with time zone', 'NO'],
    ],
  );

  // A table written before the 'failed' state existed keeps its rows and learns the state.
  const old = `${barrier.table}_old`;
  await admin.query(`CREATE TABLE ${old} (
    saga_id TEXT NOT NULL, step TEXT NOT NULL,
    operation TEXT NOT NULL CHECK (operation IN ('execute', 'compensate')),
    request_id TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'done', 'rejected', 'blocked')),
    output BYTEA, reason TEXT NOT NULL DEFAULT '', message TEXT NOT NULL DEFAULT '',
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (saga_id, step, operation, request_id))`);
  await admin.query(
    `INSERT INTO ${old} (saga_id, step, operation, request_id, state, output) ` +
      "VALUES ('s-1', 'step-1', 'execute', 'exec-1', 'done', 'before')",
  );
  const upgraded = new PostgresBarrier(URL, { table: old });
  t.after(() => upgraded.close());
  const replayed = await upgraded.runEffect(EXECUTE, credit(10));
  assert.equal(replayed.kind, OutcomeKind.REPLAYED);
  assert.equal(replayed.output.toString(), 'before');
  const other = new BarrierKey({ sagaId: 's-2', step: 'x', operation: 'execute', requestId: 'r' });
  await assert.rejects(
    upgraded.runEffect(other, () => {
      throw new PermanentFailure('never');
    }),
    PermanentFailure,
  );
  assert.equal((await upgraded.lookup(other)).state, 'failed');
});

test('a pool of your own is used and left open', { skip }, async (t) => {
  const pool = new pg.Pool({ connectionString: URL, max: 2 });
  t.after(() => pool.end());
  tables += 1;
  const barrier = new PostgresBarrier(pool, { table: `barrier_${process.pid}_${tables}` });
  const outcome = await barrier.runEffect(EXECUTE, async (client) => {
    const { rows } = await client.query('SELECT 41 + 1 AS answer');
    return Buffer.from(String(rows[0].answer));
  });
  assert.equal(outcome.output.toString(), '42');
  await barrier.close();
  assert.equal((await pool.query('SELECT 1 AS one')).rows[0].one, 1, 'still open');
  assert.throws(() => new PostgresBarrier(URL, { table: 'bad name' }), TypeError);
  assert.throws(() => new PostgresBarrier({}), TypeError);
});

test('a participant on PostgreSQL: async effects, concurrent duplicates over gRPC, refusals mapped', { skip }, async (t) => {
  const { barrier, entries, amounts } = await ledger(t, { max: 8 });
  let calls = 0;
  const participant = new Participant('ledger', { barrier, logger: silentLogger })
    .action('Credit', async (ctx) => {
      calls += 1;
      if (ctx.input.currency !== 'EUR') {
        throw new PermanentFailure(`no ${ctx.input.currency} ledger`, { reason: 'UNKNOWN_CURRENCY' });
      }
      return async (client) => {
        await client.query('SELECT pg_sleep(0.05)');
        await client.query(`INSERT INTO ${entries} VALUES ($1, $2)`, [ctx.sagaId, ctx.input.amount]);
        return { credited: ctx.input.amount };
      };
    })
    .compensation('Debit', async (ctx) => async (client) => {
      await client.query(`INSERT INTO ${entries} VALUES ($1, $2)`, [ctx.sagaId, -ctx.executeOutput.credited]);
    });
  const { client } = await serve(t, participant);
  const credit = executeRequest({
    action: 'Credit',
    input: Buffer.from(JSON.stringify({ amount: 25, currency: 'EUR' })),
  });
  const answers = await Promise.all(Array.from({ length: 6 }, () => call(client, 'Execute', credit)));
  for (const { error, response } of answers) {
    assert.equal(error, undefined);
    assert.deepEqual(JSON.parse(response.output.toString()), { credited: 25 });
  }
  assert.equal(calls, 1);
  const undo = compensateRequest({
    action: 'Debit',
    execute_output: answers[0].response.output,
  });
  assert.deepEqual((await call(client, 'Compensate', undo)).response, {});
  assert.deepEqual(await amounts(), [25, -25]);

  const unusable = executeRequest({
    action: 'Credit',
    request_id: 'exec-xts',
    input: Buffer.from(JSON.stringify({ amount: 1, currency: 'XTS' })),
  });
  for (let i = 0; i < 2; i += 1) {
    const { error } = await call(client, 'Execute', unusable);
    assert.equal(error.code, grpc.status.INVALID_ARGUMENT);
    assert.equal(error.reason, 'UNKNOWN_CURRENCY');
  }
  assert.equal(calls, 2, 'the stored permanent failure answers the duplicate');
});

test('the test kit finds the PostgreSQL barrier safe for retries, duplicates and early compensation', { skip }, async (t) => {
  const { barrier, admin, entries } = await ledger(t, { max: 8 });
  const participant = new Participant('ledger', { barrier, logger: silentLogger })
    .action('Credit', async (ctx) => async (client) => {
      await client.query(`INSERT INTO ${entries} VALUES ($1, $2)`, [ctx.sagaId, ctx.input.amount]);
      return { credited: ctx.input.amount };
    })
    .compensation('Debit', async (ctx) => async (client) => {
      await client.query(`INSERT INTO ${entries} VALUES ($1, $2)`, [ctx.sagaId, -ctx.executeOutput.credited]);
    });
  const kit = new ParticipantTestKit(participant);
  const report = await kit.checkStep({
    action: 'Credit',
    compensation: 'Debit',
    input: { amount: 7 },
    observe: async (sagaId) =>
      (await admin.query(`SELECT amount FROM ${entries} WHERE saga_id = $1 ORDER BY ctid`, [sagaId])).rows,
  });
  assert.deepEqual(report.first.json(), { credited: 7 });
  assert.equal(report.late.reason, 'EXECUTE_AFTER_COMPENSATE');
});

// --- pruning ------------------------------------------------------------------------------------

/** A barrier table for prune_contract.js: record calls first seen some days ago, read what is left. */
async function prunable(t) {
  const { barrier, admin } = await ledger(t);
  return {
    barrier,
    callSeen: async (sagaId, days, requestId = `exec-${sagaId}`) => {
      await barrier.runEffect(sagaKey(sagaId, requestId), () => Buffer.from(`charged ${sagaId}`));
      await admin.query(
        `UPDATE ${barrier.table} SET created_at = now() - make_interval(secs => $1) ` +
          'WHERE saga_id = $2 AND request_id = $3',
        [days * 86400, sagaId, requestId],
      );
    },
    remaining: async () =>
      (
        await admin.query(`SELECT saga_id, request_id FROM ${barrier.table} ORDER BY saga_id, request_id`)
      ).rows.map((row) => `${row.saga_id}/${row.request_id}`),
    seedOldSagas: async () => {
      await barrier.migrate(); // the table is made on first use
      await admin.query(
        `INSERT INTO ${barrier.table} (saga_id, step, operation, request_id, state, created_at) ` +
          "SELECT 'saga-' || lpad(i::text, 4, '0'), 'charge', 'execute', 'exec', 'done', " +
          "now() - interval '9 days' FROM generate_series(0, 599) AS i",
      );
    },
    count: async () => Number((await admin.query(`SELECT count(*) AS n FROM ${barrier.table}`)).rows[0].n),
    sagaIds: async () => (await admin.query(`SELECT saga_id FROM ${barrier.table}`)).rows.map((row) => row.saga_id),
  };
}

pruneContract(prunable, {
  skip,
  chunksInEndedTest: true,
  async moreRefusals(barrier) {
    await assert.rejects(barrier.prune({ olderThanMs: 30 * DAY_MS, ended: 'old' }), TypeError);
  },
});
