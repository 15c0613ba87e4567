// The prune() tests every barrier passes, registered for one barrier by pruneContract(): the rows
// of calls first seen longer ago than the window go and the rest stay, an unsafe window is
// refused, `ended` is asked which sagas may go (at most 500 saga ids at a time, all before
// anything is deleted), and every duplicate within the window is still absorbed. The barrier's
// own test file says how a barrier is made and how its rows are aged, seeded, counted and read.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { BarrierKey, MINIMUM_RETENTION_MS, OutcomeKind } from '../src/index.js';

export const DAY_MS = 24 * 60 * 60 * 1000;

export const sagaKey = (sagaId, requestId = `exec-${sagaId}`) =>
  new BarrierKey({ sagaId, step: 'charge', operation: 'execute', requestId });

/** Five calls of four sagas: one old, one old and retried lately, one just inside 7 days, one new. */
async function fourSagas(callSeen) {
  await callSeen('old', 8);
  await callSeen('mixed', 40, 'exec-first');
  await callSeen('mixed', 1, 'exec-retried');
  await callSeen('edge', 6.9);
  await callSeen('new', 0);
}

/** 600 sagas to prune with ended: asked in chunks of 500 and 100, all before anything is deleted. */
async function askedInChunks({ barrier, seedOldSagas, count, sagaIds }, allAskedFirst) {
  await seedOldSagas();
  const failingLate = barrier.prune({
    olderThanMs: 7 * DAY_MS,
    ended: (sagaIds) => {
      if (sagaIds.includes('saga-0599')) throw new Error('coordinator unreachable');
      return sagaIds;
    },
  });
  await assert.rejects(failingLate, /coordinator unreachable/);
  assert.equal(await count(), 600, allAskedFirst);
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
  const left = await sagaIds();
  assert.equal(left.length, 300);
  assert.ok(left.includes('saga-0599'));
  assert.ok(left.every((id) => Number(id.slice(5)) % 2 === 1));
}

/**
 * Register the prune tests of one barrier. `makePrunable(t)` returns (or resolves to) a fresh
 * barrier, closed when the test ends, and its helpers, all async:
 * - `callSeen(sagaId, days, requestId = 'exec-' + sagaId)` records that call, first seen `days` ago;
 * - `remaining()` is every row left, as 'saga_id/request_id', sorted;
 * - `seedOldSagas()` writes a done row for each of saga-0000 to saga-0599, first seen 9 days ago;
 * - `count()` is the number of rows, and `sagaIds()` the saga id of each.
 *
 * Options: `skip`, given to every test; `moreRefusals(barrier)` and `afterEnded(prunable)`, the
 * barrier's own checks at the end of the refusal test and of the ended test; and
 * `chunksInEndedTest`, to check the chunks of 500 in the ended test, on a second barrier, rather
 * than in a test of their own.
 *
 * @param {(t: import('node:test').TestContext) => object | Promise<object>} makePrunable
 * @param {{skip?: boolean | string, moreRefusals?: Function, afterEnded?: Function,
 *          chunksInEndedTest?: boolean}} [options]
 */
export function pruneContract(makePrunable, options = {}) {
  const { skip, moreRefusals, afterEnded, chunksInEndedTest = false } = options;

  test('prune deletes the rows first seen before the window and keeps every newer row', { skip }, async (t) => {
    const { barrier, callSeen, remaining } = await makePrunable(t);
    await fourSagas(callSeen);
    assert.equal(await barrier.prune({ olderThanMs: 30 * DAY_MS }), 1);
    assert.deepEqual(await remaining(), ['edge/exec-edge', 'mixed/exec-retried', 'new/exec-new', 'old/exec-old']);
    assert.equal(await barrier.prune({ olderThanMs: MINIMUM_RETENTION_MS }), 1);
    assert.deepEqual(await remaining(), ['edge/exec-edge', 'mixed/exec-retried', 'new/exec-new']);
    assert.equal(await barrier.prune({ olderThanMs: MINIMUM_RETENTION_MS }), 0, 'nothing left to prune');
  });

  test('a dry run counts the rows it would delete and deletes nothing', { skip }, async (t) => {
    const { barrier, callSeen, remaining } = await makePrunable(t);
    await fourSagas(callSeen);
    const before = await remaining();
    assert.equal(await barrier.prune({ olderThanMs: 7 * DAY_MS, dryRun: true }), 2);
    assert.equal(await barrier.prune({ olderThanMs: 7 * DAY_MS, dryRun: true, ended: () => ['old'] }), 1);
    assert.deepEqual(await remaining(), before);
  });

  test('a window shorter than the minimum, or not a window at all, is refused and deletes nothing', { skip }, async (t) => {
    const { barrier, callSeen, remaining } = await makePrunable(t);
    await fourSagas(callSeen);
    const before = await remaining();
    await assert.rejects(barrier.prune({ olderThanMs: 6 * DAY_MS }), (error) => {
      assert.ok(error instanceof RangeError);
      assert.match(error.message, /6 days is shorter than the minimum of 7 days/);
      assert.match(error.message, /a duplicate arriving after the prune would apply again/);
      return true;
    });
    for (const olderThanMs of [0, -DAY_MS, Number.NaN, Number.POSITIVE_INFINITY]) {
      await assert.rejects(barrier.prune({ olderThanMs }), /positive finite number/);
    }
    await assert.rejects(barrier.prune({ olderThanMs: '30d' }), TypeError);
    await assert.rejects(barrier.prune(), TypeError);
    await moreRefusals?.(barrier);
    assert.deepEqual(await remaining(), before);
  });

  const endedTest = chunksInEndedTest
    ? 'with ended, only the old rows of the sagas it names go, asked 500 at a time'
    : 'with ended, only the old rows of the sagas it names go';
  test(endedTest, { skip }, async (t) => {
    const prunable = await makePrunable(t);
    const { barrier, callSeen, remaining } = prunable;
    await callSeen('done', 10, 'exec-old');
    await callSeen('done', 2, 'exec-late-retry');
    await callSeen('running', 10);
    await callSeen('recent', 1);
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
    assert.deepEqual(await remaining(), ['done/exec-late-retry', 'recent/exec-recent', 'running/exec-running']);
    await afterEnded?.(prunable);
    if (chunksInEndedTest) {
      await askedInChunks(await makePrunable(t), 'every chunk is asked before anything is deleted');
    }
  });

  if (!chunksInEndedTest) {
    test('ended is asked at most 500 saga ids at a time, all before anything is deleted', { skip }, async (t) => {
      await askedInChunks(await makePrunable(t), 'all asked first');
    });
  }

  test('after a prune, a duplicate of a call within the window is still absorbed', { skip }, async (t) => {
    const { barrier, callSeen } = await makePrunable(t);
    await callSeen('recent', 6);
    await callSeen('old', 8);
    assert.equal(await barrier.prune({ olderThanMs: 7 * DAY_MS }), 1);
    let prepared = 0;
    const prepare = () => {
      prepared += 1;
      return () => Buffer.from('charged again'); // synchronous: every barrier takes such an effect
    };
    const duplicate = await barrier.run(sagaKey('recent'), prepare);
    assert.equal(duplicate.kind, OutcomeKind.REPLAYED);
    assert.equal(duplicate.output.toString(), 'charged recent');
    assert.equal(prepared, 0, 'the handler is not run again');
    // Beyond the window the row is gone, and a duplicate would apply again: why the minimum.
    assert.equal((await barrier.run(sagaKey('old'), prepare)).kind, OutcomeKind.APPLIED);
    assert.equal(prepared, 1);
  });
}
