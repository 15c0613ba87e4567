// The barrier's guarantees, on real SQLite files: once-only effects, replayed answers, null
// compensations, no hanging Execute, rollback on failure, concurrent duplicates through gRPC.

import assert from 'node:assert/strict';
import path from 'node:path';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import Database from 'better-sqlite3';
import grpc from '@grpc/grpc-js';
import {
  BarrierKey,
  ExecuteAfterCompensate,
  OutcomeKind,
  Participant,
  PermanentFailure,
  Rejected,
  RetryLater,
  SqliteBarrier,
} from '../src/index.js';
import {
  call,
  compensateRequest,
  executeRequest,
  serve,
  silentLogger,
  tempDir,
} from './helpers.js';

const EXECUTE = BarrierKey.forExecute(executeRequest());
const COMPENSATE = BarrierKey.forCompensate(compensateRequest());

function ledger(t) {
  const barrier = new SqliteBarrier(path.join(tempDir(t), 'ledger.db'));
  t.after(() => barrier.close());
  barrier.db.exec('CREATE TABLE entries (saga_id TEXT, amount INTEGER)');
  return barrier;
}

const entries = (barrier) => barrier.db.prepare('SELECT saga_id, amount FROM entries').all();
const rows = (barrier) =>
  barrier.db.prepare('SELECT operation, request_id, state, reason FROM saga_barrier ORDER BY rowid').all();

function credit(amount, output = { credited: amount }) {
  return (db) => {
    db.prepare('INSERT INTO entries VALUES (?, ?)').run('s-1', amount);
    return Buffer.from(JSON.stringify(output));
  };
}

test('a repeated Execute applies its effect once and answers the first output again', (t) => {
  const barrier = ledger(t);
  const first = barrier.runSync(EXECUTE, credit(10));
  const again = barrier.runSync(EXECUTE, credit(99));
  assert.equal(first.kind, OutcomeKind.APPLIED);
  assert.equal(again.kind, OutcomeKind.REPLAYED);
  assert.deepEqual(again.output, first.output);
  assert.deepEqual(entries(barrier), [{ saga_id: 's-1', amount: 10 }]);
});

test('a Compensate after its Execute runs its effect once', (t) => {
  const barrier = ledger(t);
  barrier.runSync(EXECUTE, credit(10));
  const undo = barrier.runSync(COMPENSATE, credit(-10));
  const again = barrier.runSync(COMPENSATE, credit(-10));
  assert.equal(undo.kind, OutcomeKind.APPLIED);
  assert.equal(again.kind, OutcomeKind.REPLAYED);
  assert.deepEqual(entries(barrier).map((e) => e.amount), [10, -10]);
});

test('a Compensate before its Execute is a null compensation and the late Execute is refused', (t) => {
  const barrier = ledger(t);
  const undo = barrier.runSync(COMPENSATE, credit(-10));
  assert.equal(undo.kind, OutcomeKind.NULL_COMPENSATION);
  assert.equal(undo.output.length, 0);
  assert.throws(() => barrier.runSync(EXECUTE, credit(10)), ExecuteAfterCompensate);
  assert.throws(
    () => barrier.runSync(EXECUTE, credit(10)),
    (e) => e.reason === 'EXECUTE_AFTER_COMPENSATE',
  );
  assert.equal(barrier.runSync(COMPENSATE, credit(-10)).kind, OutcomeKind.REPLAYED);
  assert.deepEqual(entries(barrier), [], 'no effect at all: nothing hangs');
  assert.deepEqual(rows(barrier), [
    { operation: 'compensate', request_id: 'comp-1', state: 'done', reason: '' },
    { operation: 'execute', request_id: 'exec-1', state: 'blocked', reason: '' },
  ]);
});

test('a rejected Compensate is not remembered: sent again, it runs afresh', (t) => {
  const barrier = ledger(t);
  barrier.runSync(EXECUTE, credit(10));
  const refuse = (db) => {
    db.prepare('INSERT INTO entries VALUES (?, ?)').run('s-1', -5);
    throw new Rejected('LEDGER_LOCKED', 'the ledger is locked');
  };
  assert.throws(() => barrier.runSync(COMPENSATE, refuse), { reason: 'LEDGER_LOCKED' });
  assert.equal(barrier.lookup(COMPENSATE), null);
  assert.equal(barrier.runSync(COMPENSATE, credit(-10)).kind, OutcomeKind.APPLIED);
  assert.equal(barrier.runSync(COMPENSATE, credit(-10)).kind, OutcomeKind.REPLAYED);
  assert.deepEqual(entries(barrier).map((e) => e.amount), [10, -10]);
});

test('a rejection rolls back its writes, is recorded and is replayed', (t) => {
  const barrier = ledger(t);
  const refuse = (db) => {
    db.prepare('INSERT INTO entries VALUES (?, ?)').run('s-1', 10);
    throw new Rejected('NO_FUNDS', 'balance too low');
  };
  assert.throws(() => barrier.runSync(EXECUTE, refuse), { reason: 'NO_FUNDS' });
  assert.throws(() => barrier.runSync(EXECUTE, credit(10)), {
    reason: 'NO_FUNDS',
    message: 'balance too low',
  });
  assert.deepEqual(entries(barrier), []);
  assert.equal(barrier.lookup(EXECUTE).state, 'rejected');
  // Nothing was applied, so its compensation is a null one.
  assert.equal(barrier.runSync(COMPENSATE, credit(-10)).kind, OutcomeKind.NULL_COMPENSATION);
  assert.deepEqual(entries(barrier), []);
});

test('a permanent failure rolls back its writes, is stored as failed and is answered again', (t) => {
  const barrier = ledger(t);
  const unusable = (db) => {
    db.prepare('INSERT INTO entries VALUES (?, ?)').run('s-1', 10);
    throw new PermanentFailure('no ledger in XTS', { reason: 'UNKNOWN_CURRENCY' });
  };
  assert.throws(() => barrier.runSync(EXECUTE, unusable), PermanentFailure);
  assert.throws(
    () => barrier.runSync(EXECUTE, credit(10)),
    (e) => e instanceof PermanentFailure && e.reason === 'UNKNOWN_CURRENCY' && e.message === 'no ledger in XTS',
  );
  assert.deepEqual(entries(barrier), []);
  assert.equal(barrier.lookup(EXECUTE).state, 'failed');
  assert.equal(barrier.runSync(COMPENSATE, credit(-10)).kind, OutcomeKind.NULL_COMPENSATION);
});

test('RetryLater rolls back everything and leaves no barrier row: the retry runs afresh', (t) => {
  const barrier = ledger(t);
  const later = (db) => {
    db.prepare('INSERT INTO entries VALUES (?, ?)').run('s-1', 10);
    throw new RetryLater('ledger busy', { retryAfterMs: 100 });
  };
  assert.throws(() => barrier.runSync(EXECUTE, later), RetryLater);
  assert.equal(barrier.lookup(EXECUTE), null);
  assert.equal(barrier.runSync(EXECUTE, credit(10)).kind, OutcomeKind.APPLIED);
  assert.deepEqual(entries(barrier), [{ saga_id: 's-1', amount: 10 }]);
});

test('a table of an older SDK, without the failed state, is upgraded with its rows kept', (t) => {
  const file = path.join(tempDir(t), 'old.db');
  const old = new Database(file);
  old.exec(`CREATE TABLE saga_barrier (
    saga_id TEXT NOT NULL, step TEXT NOT NULL,
    operation TEXT NOT NULL CHECK (operation IN ('execute', 'compensate')),
    request_id TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'done', 'rejected', 'blocked')),
    output BLOB, reason TEXT NOT NULL DEFAULT '', message TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (saga_id, step, operation, request_id)) STRICT`);
  old.prepare(
    "INSERT INTO saga_barrier (saga_id, step, operation, request_id, state, output) VALUES ('s-1', 'step-1', 'execute', 'exec-1', 'done', ?)",
  ).run(Buffer.from('before'));
  old.close();
  const barrier = new SqliteBarrier(file);
  t.after(() => barrier.close());
  const replayed = barrier.runSync(EXECUTE, () => Buffer.from('after'));
  assert.equal(replayed.kind, OutcomeKind.REPLAYED);
  assert.equal(replayed.output.toString(), 'before');
  const other = new BarrierKey({ sagaId: 's-2', step: 'x', operation: 'execute', requestId: 'r' });
  assert.throws(() => barrier.runSync(other, () => {
    throw new PermanentFailure('never');
  }), PermanentFailure);
  assert.equal(barrier.lookup(other).state, 'failed');
  const { sql } = barrier.db.prepare("SELECT sql FROM sqlite_master WHERE name = 'saga_barrier'").get();
  assert.match(sql, /'failed'/);
  assert.match(sql, /STRICT/);
});

test('an exception rolls back everything and leaves no barrier row: a retry runs afresh', (t) => {
  const barrier = ledger(t);
  const crash = (db) => {
    db.prepare('INSERT INTO entries VALUES (?, ?)').run('s-1', 10);
    throw new Error('disk on fire');
  };
  assert.throws(() => barrier.runSync(EXECUTE, crash), /disk on fire/);
  assert.deepEqual(entries(barrier), []);
  assert.equal(barrier.lookup(EXECUTE), null);
  assert.equal(barrier.runSync(EXECUTE, credit(10)).kind, OutcomeKind.APPLIED);
  assert.deepEqual(entries(barrier).map((e) => e.amount), [10]);
});

test('an effect that returns a promise is refused and rolled back', (t) => {
  const barrier = ledger(t);
  const asyncEffect = async (db) => {
    db.prepare('INSERT INTO entries VALUES (?, ?)').run('s-1', 10);
    return Buffer.alloc(0);
  };
  assert.throws(() => barrier.runSync(EXECUTE, asyncEffect), /must be synchronous/);
  assert.deepEqual(entries(barrier), []);
  assert.equal(barrier.lookup(EXECUTE), null);
});

test('run() prepares only new calls, and a rejection while preparing is recorded', async (t) => {
  const barrier = ledger(t);
  let prepared = 0;
  const prepare = async () => {
    prepared += 1;
    await sleep(5);
    return credit(10);
  };
  assert.equal((await barrier.run(EXECUTE, prepare)).kind, OutcomeKind.APPLIED);
  assert.equal((await barrier.run(EXECUTE, prepare)).kind, OutcomeKind.REPLAYED);
  assert.equal(prepared, 1);

  const other = BarrierKey.forExecute(executeRequest({ request_id: 'exec-2', step: 'step-2' }));
  const refuse = async () => {
    throw new Rejected('LIMIT', 'no');
  };
  await assert.rejects(barrier.run(other, refuse), { reason: 'LIMIT' });
  await assert.rejects(barrier.run(other, prepare), { reason: 'LIMIT' });
  assert.equal(prepared, 1);
});

test('a null compensation does not prepare the handler at all', async (t) => {
  const barrier = ledger(t);
  let prepared = 0;
  const outcome = await barrier.run(COMPENSATE, () => {
    prepared += 1;
    return credit(-1);
  });
  assert.equal(outcome.kind, OutcomeKind.NULL_COMPENSATION);
  assert.equal(prepared, 0);
});

test('an Execute that commits while its Compensate prepares still gets compensated', async (t) => {
  const barrier = ledger(t);
  // The Compensate sees the Execute DONE, prepares; a duplicate Execute meanwhile replays.
  barrier.runSync(EXECUTE, credit(10));
  const undo = barrier.run(COMPENSATE, async () => {
    await sleep(10);
    return credit(-10);
  });
  const replay = barrier.run(EXECUTE, () => credit(99));
  assert.equal((await replay).kind, OutcomeKind.REPLAYED);
  assert.equal((await undo).kind, OutcomeKind.APPLIED);
  assert.deepEqual(entries(barrier).map((e) => e.amount), [10, -10]);
});

test('two connections on one file (as two processes) apply concurrent duplicates once', async (t) => {
  const file = path.join(tempDir(t), 'shared.db');
  const a = new SqliteBarrier(file);
  a.db.exec('CREATE TABLE entries (saga_id TEXT, amount INTEGER)');
  const b = new SqliteBarrier(file);
  t.after(() => {
    a.close();
    b.close();
  });
  const slow = (amount) => async () => {
    await sleep(10);
    return credit(amount);
  };
  const outcomes = await Promise.all([a.run(EXECUTE, slow(1)), b.run(EXECUTE, slow(2))]);
  assert.deepEqual(outcomes.map((o) => o.kind).sort(), ['applied', 'replayed']);
  assert.deepEqual(outcomes[0].output, outcomes[1].output);
  assert.equal(entries(a).length, 1);
});

test('the barrier table has the Python SDK layout and the database is in WAL mode', (t) => {
  const barrier = ledger(t);
  const columns = barrier.db.prepare('PRAGMA table_info(saga_barrier)').all().map((c) => c.name);
  assert.deepEqual(columns, [
    'saga_id',
    'step',
    'operation',
    'request_id',
    'state',
    'output',
    'reason',
    'message',
    'created_at',
  ]);
  assert.equal(barrier.db.pragma('journal_mode', { simple: true }), 'wal');
  assert.equal(barrier.db.pragma('synchronous', { simple: true }), 2, 'FULL');
});

test('the barrier accepts an open database and a custom table name', (t) => {
  const db = new Database(':memory:');
  t.after(() => db.close());
  const barrier = new SqliteBarrier(db, { table: 'my_barrier' });
  barrier.runSync(EXECUTE, () => Buffer.from('x'));
  assert.equal(db.prepare('SELECT count(*) AS n FROM my_barrier').get().n, 1);
  barrier.close();
  assert.ok(db.open, 'a database passed in stays open');
  assert.throws(() => new SqliteBarrier(db, { table: 'x; DROP TABLE y' }), TypeError);
});

test('keys need a request_id, and a Compensate key its execute_request_id', () => {
  assert.throws(() => BarrierKey.forExecute(executeRequest({ request_id: '' })), TypeError);
  assert.throws(() => BarrierKey.forCompensate(compensateRequest({ execute_request_id: '' })), TypeError);
  assert.equal(EXECUTE.sagaId, 's-1');
});

// --- through a real gRPC server ----------------------------------------------------------------

async function ledgerParticipant(t) {
  const barrier = ledger(t);
  const p = new Participant('ledger', { barrier, logger: silentLogger });
  const calls = { credit: 0, debit: 0, refuse: 0, crash: 0 };
  p.action('Credit', async (ctx) => {
    calls.credit += 1;
    await sleep(Math.random() * 20); // interleave the concurrent duplicates
    const id = `entry-${calls.credit}`; // differs per run: a second effect would show
    return (db) => {
      db.prepare('INSERT INTO entries VALUES (?, ?)').run(ctx.sagaId, ctx.input.amount);
      return { entry: id };
    };
  });
  p.compensation('Debit', async (ctx) => {
    calls.debit += 1;
    await sleep(Math.random() * 20);
    return (db) => {
      db.prepare('INSERT INTO entries VALUES (?, ?)').run(ctx.sagaId, -ctx.input.amount);
    };
  });
  p.action('Refuse', async () => {
    calls.refuse += 1;
    throw new Rejected('OVER_LIMIT', 'amount over limit');
  });
  p.action('Crash', async (ctx) => (db) => {
    calls.crash += 1;
    db.prepare('INSERT INTO entries VALUES (?, ?)').run(ctx.sagaId, 1);
    if (calls.crash === 1) throw new Error('first attempt crashes');
    return { ok: true };
  });
  const { client } = await serve(t, p);
  return { barrier, client, calls };
}

const amount = (n) => Buffer.from(JSON.stringify({ amount: n }));

test('many concurrent Execute calls with one request_id: one effect, identical answers', async (t) => {
  const { barrier, client, calls } = await ledgerParticipant(t);
  const request = executeRequest({ action: 'Credit', input: amount(5) });
  const answers = await Promise.all(Array.from({ length: 40 }, () => call(client, 'Execute', request)));
  for (const { error } of answers) assert.equal(error, undefined);
  const outputs = new Set(answers.map(({ response }) => response.output.toString()));
  assert.equal(outputs.size, 1, `identical answers, got ${[...outputs]}`);
  assert.deepEqual(entries(barrier), [{ saga_id: 's-1', amount: 5 }]);
  assert.ok(calls.credit >= 1);
});

test('many concurrent Compensate calls with one request_id: one effect', async (t) => {
  const { barrier, client } = await ledgerParticipant(t);
  await call(client, 'Execute', executeRequest({ action: 'Credit', input: amount(5) }));
  const request = compensateRequest({ action: 'Debit', input: amount(5) });
  const answers = await Promise.all(Array.from({ length: 20 }, () => call(client, 'Compensate', request)));
  for (const { error } of answers) assert.equal(error, undefined);
  assert.deepEqual(entries(barrier).map((e) => e.amount), [5, -5]);
});

test('a rejection is replayed over gRPC without calling the handler again', async (t) => {
  const { client, calls } = await ledgerParticipant(t);
  const request = executeRequest({ action: 'Refuse' });
  for (let i = 0; i < 3; i += 1) {
    const { error } = await call(client, 'Execute', request);
    assert.equal(error.code, grpc.status.FAILED_PRECONDITION);
    assert.equal(error.reason, 'OVER_LIMIT');
    assert.equal(error.details, 'amount over limit');
  }
  assert.equal(calls.refuse, 1);
});

test('an exception answers INTERNAL, rolls back, and the retry applies once', async (t) => {
  const { barrier, client } = await ledgerParticipant(t);
  const request = executeRequest({ action: 'Crash' });
  const first = await call(client, 'Execute', request);
  assert.equal(first.error.code, grpc.status.INTERNAL);
  assert.deepEqual(entries(barrier), []);
  const retry = await call(client, 'Execute', request);
  assert.deepEqual(JSON.parse(retry.response.output.toString()), { ok: true });
  assert.equal(entries(barrier).length, 1);
});

test('Compensate before Execute over gRPC: OK with no effect, then the Execute is refused', async (t) => {
  const { barrier, client, calls } = await ledgerParticipant(t);
  const undo = await call(client, 'Compensate', compensateRequest({ action: 'Debit', input: amount(5) }));
  assert.deepEqual(undo.response, {});
  const late = await call(client, 'Execute', executeRequest({ action: 'Credit', input: amount(5) }));
  assert.equal(late.error.code, grpc.status.FAILED_PRECONDITION);
  assert.equal(late.error.reason, 'EXECUTE_AFTER_COMPENSATE');
  assert.deepEqual(entries(barrier), []);
  assert.deepEqual([calls.credit, calls.debit], [0, 0]);
});

test('a Compensate without execute_request_id is refused with the barrier', async (t) => {
  const { client } = await ledgerParticipant(t);
  const { error } = await call(
    client,
    'Compensate',
    compensateRequest({ action: 'Debit', execute_request_id: '' }),
  );
  assert.equal(error.code, grpc.status.INVALID_ARGUMENT);
  assert.deepEqual(error.fieldViolations.map((v) => v.field), ['execute_request_id']);
});

test('a handler whose function returns a promise answers INTERNAL and leaves nothing', async (t) => {
  const barrier = ledger(t);
  const p = new Participant('ledger', { barrier, logger: silentLogger });
  p.action('Do', () => async (db) => {
    db.prepare('INSERT INTO entries VALUES (?, ?)').run('s-1', 1);
  });
  const { client } = await serve(t, p);
  const { error } = await call(client, 'Execute', executeRequest());
  assert.equal(error.code, grpc.status.INTERNAL);
  assert.match(error.details, /must be synchronous/);
  assert.equal(barrier.lookup(EXECUTE), null);
  assert.deepEqual(entries(barrier), []);
});
