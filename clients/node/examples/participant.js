// An Accounts participant: opens an account per saga, closes it when the saga is compensated.
import { Participant, Rejected, SqliteBarrier } from '@saga-coordinator/sdk';

const barrier = new SqliteBarrier(process.env.DATABASE ?? 'accounts.db');
barrier.db.exec(`CREATE TABLE IF NOT EXISTS accounts (
  id TEXT PRIMARY KEY, owner TEXT NOT NULL, open INTEGER NOT NULL)`);

const accounts = new Participant('accounts', { barrier });

accounts.action('OpenAccount', async (ctx) => {
  const owner = ctx.input?.company;
  if (!owner) throw new Rejected('COMPANY_REQUIRED', 'the saga input names no company');
  // Decide here; write in the function returned: the barrier runs it in its transaction.
  return (db) => {
    db.prepare('INSERT INTO accounts (id, owner, open) VALUES (?, ?, 1)').run(ctx.sagaId, owner);
    return { account_id: ctx.sagaId };
  };
});

accounts.compensation('CloseAccount', async (ctx) => (db) => {
  db.prepare('UPDATE accounts SET open = 0 WHERE id = ?').run(ctx.sagaId);
});

await accounts.serve(`127.0.0.1:${process.env.PORT ?? 50062}`);
barrier.close();
