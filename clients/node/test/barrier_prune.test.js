// Barrier retention on a real SQLite file: the prune tests every barrier passes
// (prune_contract.js), with more refusals of bad options and of a bad or failing `ended`, and
// endedOn(). Rows are aged by moving their created_at back.

import assert from 'node:assert/strict';
import path from 'node:path';
import { describe, it } from 'node:test';
import { MINIMUM_RETENTION_MS, SqliteBarrier, endedOn } from '../src/index.js';
import { tempDir } from './helpers.js';
import { DAY_MS, pruneContract, sagaKey } from './prune_contract.js';

/** A barrier on its own SQLite file and the contract's helpers, its synchronous ones made async. */
function prunable(t) {
  const barrier = new SqliteBarrier(path.join(tempDir(t), 'ledger.db'));
  t.after(() => barrier.close());
  return {
    barrier,
    async callSeen(sagaId, days, requestId = `exec-${sagaId}`) {
      barrier.runSync(sagaKey(sagaId, requestId), () => Buffer.from(`charged ${sagaId}`));
      barrier.db
        .prepare(
          "UPDATE saga_barrier SET created_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?) " +
            'WHERE saga_id = ? AND request_id = ?',
        )
        .run(`-${days * 86400} seconds`, sagaId, requestId);
    },
    async remaining() {
      return barrier.db
        .prepare('SELECT saga_id, request_id FROM saga_barrier ORDER BY saga_id, request_id')
        .all()
        .map((row) => `${row.saga_id}/${row.request_id}`);
    },
    async seedOldSagas() {
      barrier.db.exec(`
        WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 599)
        INSERT INTO saga_barrier (saga_id, step, operation, request_id, state, created_at)
        SELECT printf('saga-%04d', i), 'charge', 'execute', 'exec', 'done',
               strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-9 days') FROM n`);
    },
    async count() {
      return barrier.db.prepare('SELECT count(*) FROM saga_barrier').pluck().get();
    },
    async sagaIds() {
      return barrier.db.prepare('SELECT saga_id FROM saga_barrier').pluck().all();
    },
  };
}

pruneContract(prunable, {
  async moreRefusals(barrier) {
    await assert.rejects(barrier.prune({ olderThanMs: MINIMUM_RETENTION_MS - 1 }), RangeError);
    await assert.rejects(barrier.prune({}), TypeError);
    await assert.rejects(barrier.prune({ olderThanMs: 30 * DAY_MS, dryRun: 'yes' }), TypeError);
    await assert.rejects(barrier.prune({ olderThanMs: 30 * DAY_MS, ended: ['old'] }), TypeError);
  },
  async afterEnded({ barrier, remaining }) {
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
    assert.equal((await remaining()).length, 3, 'a failing ended deletes nothing');
  },
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
