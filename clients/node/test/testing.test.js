// The test kit: it calls handlers as the coordinator would, and catches a participant whose
// effects are not guarded by the barrier.

import assert from 'node:assert/strict';
import path from 'node:path';
import { test } from 'node:test';
import grpc from '@grpc/grpc-js';
import { Participant, PermanentFailure, Rejected, RetryLater, SqliteBarrier } from '../src/index.js';
import { ParticipantTestKit, meaningOf } from '../src/testing.js';
import { silentLogger, tempDir } from './helpers.js';

/** The README's Accounts participant, on a temp SQLite file. */
function accounts(t) {
  const barrier = new SqliteBarrier(path.join(tempDir(t), 'accounts.db'));
  t.after(() => barrier.close());
  barrier.db.exec('CREATE TABLE accounts (id TEXT PRIMARY KEY, owner TEXT NOT NULL, open INTEGER NOT NULL)');
  const participant = new Participant('accounts', { barrier, logger: silentLogger })
    .action('OpenAccount', async (ctx) => {
      const owner = ctx.input?.company;
      if (!owner) throw new Rejected('COMPANY_REQUIRED', 'the saga input names no company');
      if (owner === 'later') throw new RetryLater('ledger busy', { retryAfterMs: 2000 });
      if (owner === 'never') throw new PermanentFailure('no such company', { reason: 'UNKNOWN_COMPANY' });
      return (db) => {
        db.prepare('INSERT INTO accounts (id, owner, open) VALUES (?, ?, 1)').run(ctx.sagaId, owner);
        return { account_id: ctx.sagaId };
      };
    })
    .compensation('CloseAccount', async (ctx) => (db) => {
      db.prepare('UPDATE accounts SET open = 0 WHERE id = ?').run(ctx.sagaId);
    });
  const observe = (sagaId) =>
    barrier.db.prepare('SELECT owner, open FROM accounts WHERE id = ?').all(sagaId);
  return { participant, observe, barrier };
}

const STEP = { action: 'OpenAccount', compensation: 'CloseAccount', step: 'open-account' };

test('the kit passes a participant whose writes go through the barrier', async (t) => {
  const { participant, observe } = accounts(t);
  const kit = new ParticipantTestKit(participant);
  const report = await kit.checkStep({ ...STEP, input: { company: 'Acme Corp' }, observe });
  assert.equal(report.first.json().account_id.startsWith(kit.sagaPrefix), true);
  assert.equal(report.duplicates.length, 8);
  assert.deepEqual(report.undone.map((a) => a.codeName), ['OK', 'OK']);
  assert.equal(report.late.reason, 'EXECUTE_AFTER_COMPENSATE');
});

test('the kit passes a business no: rejected once, replayed, and nothing to undo', async (t) => {
  const { participant, observe } = accounts(t);
  const kit = new ParticipantTestKit(participant);
  const report = await kit.checkStep({ ...STEP, input: {}, observe });
  assert.equal(report.first.meaning, 'rejected');
  assert.equal(report.retry.reason, 'COMPANY_REQUIRED');
  assert.deepEqual(report.undone, []);
});

test('a step calls the handler as the coordinator would, and answers read as it reads them', async (t) => {
  const { participant, observe } = accounts(t);
  const kit = new ParticipantTestKit(participant);
  const step = kit.step({ ...STEP, input: { company: 'Initech' } });
  assert.equal(step.executeRequestId, `${step.sagaId}/open-account/execute`);
  const opened = await step.execute();
  assert.deepEqual(opened.json(), { account_id: step.sagaId });
  assert.deepEqual(await observe(step.sagaId), [{ owner: 'Initech', open: 1 }]);
  assert.equal((await step.compensate()).ok, true);
  assert.deepEqual(await observe(step.sagaId), [{ owner: 'Initech', open: 0 }]);

  const later = await kit.step({ ...STEP, input: { company: 'later' } }).execute();
  assert.equal(later.codeName, 'UNAVAILABLE');
  assert.equal(later.meaning, 'retry');
  assert.equal(later.retryDelayMs, 2000);
  const never = await kit.step({ ...STEP, input: { company: 'never' } }).execute();
  assert.equal(never.codeName, 'INVALID_ARGUMENT');
  assert.equal(never.meaning, 'failed');
  assert.equal(never.reason, 'UNKNOWN_COMPANY');
  assert.throws(() => never.json(), /INVALID_ARGUMENT/);
  assert.equal(meaningOf(grpc.status.INTERNAL), 'retry');
  assert.equal(meaningOf(grpc.status.UNIMPLEMENTED), 'failed');
});

test('the kit catches an effect written outside the barrier: concurrent duplicates apply it twice', async (t) => {
  const { barrier } = accounts(t);
  const ledger = [];
  // The write happens while deciding, before the barrier's transaction: a duplicate that
  // arrives while the first is still preparing writes again.
  const careless = new Participant('accounts', { barrier, logger: silentLogger })
    .action('OpenAccount', async (ctx) => {
      await new Promise((resolve) => setTimeout(resolve, 5));
      ledger.push(ctx.sagaId);
      return { account_id: ctx.sagaId };
    })
    .compensation('CloseAccount', async () => null);
  const kit = new ParticipantTestKit(careless);
  await assert.rejects(
    kit.checkStep({
      ...STEP,
      input: { company: 'Acme Corp' },
      observe: (sagaId) => ledger.filter((id) => id === sagaId).length,
    }),
    (error) => error instanceof assert.AssertionError && /concurrent duplicates/.test(error.message),
  );
});

test('the kit catches a compensation that runs without its Execute', async (t) => {
  const undone = [];
  const noBarrierCheck = {
    // A barrier that lets every call through: what a participant deduping nothing does.
    run: async (key, prepare) => ({ output: Buffer.from((await prepare())(null) ?? []), kind: 'applied' }),
  };
  const naive = new Participant('accounts', { barrier: noBarrierCheck, logger: silentLogger })
    .action('OpenAccount', () => ({ ok: true }))
    .compensation('CloseAccount', (ctx) => () => {
      undone.push(ctx.sagaId);
    });
  const kit = new ParticipantTestKit(naive);
  await assert.rejects(
    kit.checkStep({
      ...STEP,
      concurrency: 2,
      observe: (sagaId) => undone.filter((id) => id === sagaId).length,
    }),
    (error) => error instanceof assert.AssertionError && /compensation/.test(error.message),
  );
});

test('checkStep needs observe, a compensation and a barrier', async () => {
  const bare = new Participant('accounts', { logger: silentLogger }).action('OpenAccount', () => 1);
  const kit = new ParticipantTestKit(bare);
  await assert.rejects(kit.checkStep({ ...STEP, observe: () => 0 }), /barrier/);
  await assert.rejects(kit.checkStep({ action: 'OpenAccount', observe: () => 0 }), /compensation/);
  await assert.rejects(kit.checkStep({ ...STEP }), /observe/);
  assert.throws(() => new ParticipantTestKit({}), TypeError);
});
