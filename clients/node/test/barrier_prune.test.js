// Barrier retention on a real SQLite file: prune() deletes the rows of calls first seen longer
// ago than the window and keeps the rest, refuses an unsafe window, asks `ended` which sagas may
// go, and leaves every duplicate within the window absorbed. Rows are aged by moving their
// created_at back.

import assert from 'node:assert/strict';
import path from 'node:path';
import { describe, it, test } from 'node:test';
import {
  BarrierKey,
  MINIMUM_RETENTION_MS,
  OutcomeKind,
  SqliteBarrier,
  endedOn,
} from '../src/index.js';
import { tempDir } from './helpers.js';

const DAY_MS = 24 * 60 * 60 * 1000;

const key = (sagaId, requestId = `exec-${sagaId}`) =>
  new BarrierKey({ sagaId, step: 'charge', operation: 'execute', requestId });

function barrierOf(t) {
  const barrier = new SqliteBarrier(path.join(tempDir(t), 'ledger.db'));
  t.after(() => barrier.close());
  return barrier;
}

/** Record the call `requestId` of saga `sagaId`, first seen `days` ago. */
function callSeen(barrier, sagaId, days, requestId = `exec-${sagaId}`) {
  barrier.runSync(key(sagaId, requestId), () => Buffer.from(`charged ${sagaId}`));
  barrier.db
    .prepare(
      "UPDATE saga_barrier SET created_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?) " +
        'WHERE saga_id = ? AND request_id = ?',
    )
    .run(`-${days * 86400} seconds`, sagaId, requestId);
}

const remaining = (barrier) =>
  barrier.db
    .prepare('SELECT saga_id, request_id FROM saga_barrier ORDER BY saga_id, request_id')
    .all()
    .map((row) => `${row.saga_id}/${row.request_id}`);

function fourSagas(barrier) {
  callSeen(barrier, 'old', 8);
  callSeen(barrier, 'mixed', 40, 'exec-first');
  callSeen(barrier, 'mixed', 1, 'exec-retried');
  callSeen(barrier, 'edge', 6.9);
  callSeen(barrier, 'new', 0);
}

test('prune deletes the rows first seen before the window and keeps every newer row', async (t) => {
  const barrier = barrierOf(t);
  fourSagas(barrier);
  assert.equal(await barrier.prune({ olderThanMs: 30 * DAY_MS }), 1);
  assert.deepEqual(remaining(barrier), ['edge/exec-edge', 'mixed/exec-retried', 'new/exec-new', 'old/exec-old']);
  assert.equal(await barrier.prune({ olderThanMs: MINIMUM_RETENTION_MS }), 1);
  assert.deepEqual(remaining(barrier), ['edge/exec-edge', 'mixed/exec-retried', 'new/exec-new']);
  assert.equal(await barrier.prune({ olderThanMs: MINIMUM_RETENTION_MS }), 0, 'nothing left to prune');
});

test('a dry run counts the rows it would delete and deletes nothing', async (t) => {
  const barrier = barrierOf(t);
  fourSagas(barrier);
  const before = remaining(barrier);
  assert.equal(await barrier.prune({ olderThanMs: 7 * DAY_MS, dryRun: true }), 2);
  assert.equal(await barrier.prune({ olderThanMs: 7 * DAY_MS, dryRun: true, ended: () => ['old'] }), 1);
  assert.deepEqual(remaining(barrier), before);
});

test('a window shorter than the minimum, or not a window at all, is refused and deletes nothing', async (t) => {
  const barrier = barrierOf(t);
  fourSagas(barrier);
  const before = remaining(barrier);
  await assert.rejects(barrier.prune({ olderThanMs: 6 * DAY_MS }), (error) => {
    assert.ok(error instanceof RangeError);
    assert.match(error.message, /6 days is shorter than the minimum of 7 days/);
    assert.match(error.message, /a duplicate arriving after the prune would apply again/);
    return true;
  });
  await assert.rejects(barrier.prune({ olderThanMs: MINIMUM_RETENTION_MS - 1 }), RangeError);
  for (const olderThanMs of [0, -DAY_MS, Number.NaN, Number.POSITIVE_INFINITY]) {
    await assert.rejects(barrier.prune({ olderThanMs }), /positive finite number/);
  }
  await assert.rejects(barrier.prune({ olderThanMs: '30d' }), TypeError);
  await assert.rejects(barrier.prune({}), TypeError);
  await assert.rejects(barrier.prune(), TypeError);
  await assert.rejects(barrier.prune({ olderThanMs: 30 * DAY_MS, dryRun: 'yes' }), TypeError);
  await assert.rejects(barrier.prune({ olderThanMs: 30 * DAY_MS, ended: ['old'] }), TypeError);
  assert.deepEqual(remaining(barrier), before);
});

test('with ended, only the old rows of the sagas it names go', async (t) => {
  const barrier = barrierOf(t);
  callSeen(barrier, 'done', 10, 'exec-old');
  callSeen(barrier, 'done', 2, 'exec-late-retry');
  callSeen(barrier, 'running', 10);
  callSeen(barrier, 'recent', 1);
  const asked = [];
  const deleted = await barrier.prune({
    olderThanMs: 7 * DAY_MS,
    ended: async (sagaIds) => {
      asked.push(sagaIds);
      // 'recent' was not asked (no old row) and 'elsewhere' has no row: both are ignored.
      return new Set(['done', 'recent', 'elsewhere']);
    },
  });
  assert.equal(deleted, 1);
  assert.deepEqual(asked, [['done', 'running']]);
  assert.deepEqual(remaining(barrier), ['done/exec-late-retry', 'recent/exec-recent', 'running/exec-running']);

  await assert.rejects(barrier.prune({ olderThanMs: 7 * DAY_MS, ended: () => 'running' }), TypeError);
  await assert.rejects(
    barrier.prune({
      olderThanMs: 7 * DAY_MS,
      ended: async () => {
        throw new Error('coordinator unreachable');
      },
    }),
    /coordinator unreachable/,
  );
  assert.equal(remaining(barrier).length, 3, 'a failing ended deletes nothing');
});

test('ended is asked at most 500 saga ids at a time, all before anything is deleted', async (t) => {
  const barrier = barrierOf(t);
  barrier.db.exec(`
    WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 599)
    INSERT INTO saga_barrier (saga_id, step, operation, request_id, state, created_at)
    SELECT printf('saga-%04d', i), 'charge', 'execute', 'exec', 'done',
           strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-9 days') FROM n`);
  const failingLate = barrier.prune({
    olderThanMs: 7 * DAY_MS,
    ended: (sagaIds) => {
      if (sagaIds.includes('saga-0599')) throw new Error('coordinator unreachable');
      return sagaIds;
    },
  });
  await assert.rejects(failingLate, /coordinator unreachable/);
  assert.equal(barrier.db.prepare('SELECT count(*) FROM saga_barrier').pluck().get(), 600, 'all asked first');
  const sizes = [];
  const deleted = await barrier.prune({
    olderThanMs: 7 * DAY_MS,
    ended: (sagaIds) => {
      sizes.push(sagaIds.length);
      const even = sagaIds.filter((id) => Number(id.slice(5)) % 2 === 0);
      // saga-9999 has no row: an id that was not a candidate is ignored.
      return sizes.length === 1 ? [...even, 'saga-9999'] : even;
    },
  });
  assert.deepEqual(sizes, [500, 100]);
  assert.equal(deleted, 300);
  const left = barrier.db.prepare('SELECT saga_id FROM saga_barrier').pluck().all();
  assert.equal(left.length, 300);
  assert.ok(left.includes('saga-0599'));
  assert.ok(left.every((id) => Number(id.slice(5)) % 2 === 1));
});

test('after a prune, a duplicate of a call within the window is still absorbed', async (t) => {
  const barrier = barrierOf(t);
  callSeen(barrier, 'recent', 6);
  callSeen(barrier, 'old', 8);
  assert.equal(await barrier.prune({ olderThanMs: 7 * DAY_MS }), 1);
  let prepared = 0;
  const prepare = () => {
    prepared += 1;
    return () => Buffer.from('charged again');
  };
  const duplicate = await barrier.run(key('recent'), prepare);
  assert.equal(duplicate.kind, OutcomeKind.REPLAYED);
  assert.equal(duplicate.output.toString(), 'charged recent');
  assert.equal(prepared, 0, 'the handler is not run again');
  // Beyond the window the row is gone, and a duplicate would apply again: why the minimum.
  assert.equal((await barrier.run(key('old'), prepare)).kind, OutcomeKind.APPLIED);
  assert.equal(prepared, 1);
});

describe('endedOn(client)', () => {
  const client = (states) => ({
    async get(sagaId) {
      const state = states[sagaId];
      if (state instanceof Error) throw state;
      if (state === undefined) {
        throw Object.assign(new Error(`NOT_FOUND: no saga ${sagaId}`), { codeName: 'NOT_FOUND' });
      }
      return { state };
    },
  });

  it('says ended for SUCCEEDED, COMPENSATED and sagas the coordinator no longer knows', async () => {
    const ended = endedOn(
      client({ a: 'SUCCEEDED', b: 'COMPENSATED', c: 'NEEDS_ATTENTION', d: 'RUNNING', e: 'COMPENSATING' }),
    );
    assert.deepEqual(await ended(['a', 'b', 'c', 'd', 'e', 'gone']), ['a', 'b', 'gone']);
  });

  it('rejects on any other error, so that prune() deletes nothing', async () => {
    const down = Object.assign(new Error('UNAVAILABLE: connection refused'), { codeName: 'UNAVAILABLE' });
    await assert.rejects(endedOn(client({ a: 'SUCCEEDED', b: down }))(['a', 'b']), /UNAVAILABLE/);
    assert.throws(() => endedOn(null), TypeError);
  });
});
