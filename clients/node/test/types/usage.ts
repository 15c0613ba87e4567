// Compiled by `npm run check-types` (tsc --noEmit): the public types fit real usage.

import {
  BarrierKey,
  MINIMUM_RETENTION_MS,
  Participant,
  PermanentFailure,
  Rejected,
  RetryLater,
  SagaClient,
  SagaRpcError,
  SqliteBarrier,
  WaitTimeout,
  type ExecuteContext,
  type Saga,
  type SagaUpdate,
} from '@saga-coordinator/sdk';
import { setupTracing } from '@saga-coordinator/sdk/tracing';
import { MINIMUM_RETENTION_MS as MINIMUM_ON_POSTGRES, PostgresBarrier } from '@saga-coordinator/sdk/postgres';
import { ParticipantTestKit, type Answer } from '@saga-coordinator/sdk/testing';
import pg from 'pg';

interface CardInput {
  company: string;
  card_limit?: number;
}

async function participant(): Promise<number> {
  const tracing = await setupTracing({ serviceName: 'cards' });
  const barrier = new SqliteBarrier('cards.db', { synchronous: 'FULL' });
  barrier.db.exec('CREATE TABLE IF NOT EXISTS cards (id TEXT)');
  const cards = new Participant('cards', { barrier });
  cards
    .action('IssueCard', async (ctx: ExecuteContext<CardInput>) => {
      if ((ctx.input.card_limit ?? 0) > 100_000) throw new Rejected('CARD_LIMIT_EXCEEDED');
      return (db) => {
        db.prepare('INSERT INTO cards VALUES (?)').run(ctx.requestId);
        return { card_id: ctx.requestId };
      };
    })
    .action('Raw', (ctx) => Buffer.concat([ctx.input]), { raw: true })
    .compensation('CancelCard', (ctx) => (db) => {
      db.prepare('DELETE FROM cards WHERE id = ?').run(ctx.executeRequestId);
    });
  const port = await cards.start('127.0.0.1:0');
  await cards.stop({ graceMs: 1000 });
  const outcome = barrier.runSync(
    new BarrierKey({ sagaId: 's', step: 'x', operation: 'execute', requestId: 'r' }),
    () => Buffer.from('ok'),
  );
  outcome.kind satisfies 'applied' | 'replayed' | 'null_compensation';
  const wouldGo: number = await barrier.prune({ olderThanMs: 30 * 24 * 3600 * 1000, dryRun: true });
  if (wouldGo >= 0) await barrier.prune({ olderThanMs: MINIMUM_RETENTION_MS, ended: (ids) => ids });
  await tracing.shutdown();
  return port;
}

function securedClients(ca: Buffer, certChain: Buffer, privateKey: string): SagaClient[] {
  const rotating = async (): Promise<string> => 'a-fresh-token';
  return [
    new SagaClient('coordinator.internal:50051', {
      tls: { ca, certChain, privateKey, serverName: 'coordinator.internal' },
      token: rotating,
    }),
    new SagaClient('127.0.0.1:50051', { tls: {}, token: 'a-token', timeoutMs: null }),
    SagaClient.fromEnvironment({ env: { SAGA_TARGET: '127.0.0.1:50051' }, timeoutMs: 5000 }),
  ];
}

async function client(): Promise<Saga> {
  const c = new SagaClient('127.0.0.1:50051', { timeoutMs: 5000, metadata: { 'x-request': 'x' } });
  const { saga, created } = await c.create('onboard', { company: 'ACME' }, { sagaId: 'acme-1' });
  const ok: boolean = created && saga.settled;
  for await (const s of c.list({ states: ['RUNNING', 'SAGA_STATE_COMPENSATING'], pageSize: 10 })) {
    s.steps.map((step) => step.outputJson<{ id: string }>()?.id);
  }
  for await (const e of c.events('acme-1', { pageSize: 10, newestFirst: true })) {
    if (e.type === 'STEP_REJECTED') break;
  }
  for await (const update of c.watch('acme-1')) {
    const u: SagaUpdate = update;
    const named: string = u.event?.emits ?? u.event?.action ?? '';
    if (u.event?.type === 'STEP_REJECTED' || named === 'CardIssued') break;
  }
  for await (const change of c.changes({ afterPosition: 41, states: ['NEEDS_ATTENTION'], follow: false })) {
    const position: number = change.position;
    const parked: boolean = change.state === 'NEEDS_ATTENTION' && change.labels['tenant'] === 'acme';
    if (parked || position > 100 || change.event.emits === 'UserCreated') break;
  }
  try {
    return await c.wait('acme-1', { timeoutMs: ok ? 1000 : 2000 });
  } catch (error) {
    if (error instanceof WaitTimeout) return c.get(error.sagaId);
    if (error instanceof SagaRpcError && error.reason === 'SAGA_NOT_FOUND') throw error;
    throw error;
  } finally {
    c.close();
  }
}

async function ledgerOnPostgres(): Promise<Answer> {
  const pool = new pg.Pool({ connectionString: 'postgresql://ledger@127.0.0.1/ledger' });
  const barrier = new PostgresBarrier(pool, { table: 'saga_barrier' });
  const ledger = new Participant('ledger', { barrier });
  ledger
    .action('Credit', async (ctx: ExecuteContext<{ amount: number; currency: string }>) => {
      if (ctx.input.currency !== 'EUR') {
        throw new PermanentFailure(`no ${ctx.input.currency} ledger`, { reason: 'UNKNOWN_CURRENCY' });
      }
      if (ctx.attempt === 1) throw new RetryLater('warming up', { retryAfterMs: 1500 });
      return async (client) => {
        const { rows } = await client.query<{ id: number }>(
          'INSERT INTO entries (amount) VALUES ($1) RETURNING id',
          [ctx.input.amount],
        );
        return { entry: rows[0]?.id };
      };
    })
    .compensation('Debit', (ctx) => async (client) => {
      await client.query('DELETE FROM entries WHERE saga_id = $1', [ctx.sagaId]);
    });
  const stored = await barrier.lookup(
    new BarrierKey({ sagaId: 's', step: 'x', operation: 'execute', requestId: 'r' }),
  );
  stored?.state satisfies 'done' | 'rejected' | 'blocked' | 'failed' | undefined;
  const kit = new ParticipantTestKit(ledger);
  const report = await kit.checkStep({
    action: 'Credit',
    compensation: 'Debit',
    input: { amount: 5, currency: 'EUR' },
    observe: async (sagaId) => (await pool.query('SELECT amount FROM entries WHERE saga_id = $1', [sagaId])).rows,
  });
  const retried: number | null = report.first.retryDelayMs;
  const pruned: number = await barrier.prune({
    olderThanMs: 4 * MINIMUM_ON_POSTGRES,
    ended: async (sagaIds) => new Set(sagaIds.filter((id) => id.startsWith('done-'))),
  });
  await barrier.close();
  if (pruned < 0) throw new Error('unreachable');
  return retried === null ? kit.step({ action: 'Credit' }).execute() : report.late;
}

export { client, ledgerOnPostgres, participant, securedClients };
