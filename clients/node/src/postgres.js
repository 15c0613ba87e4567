// The idempotency barrier on PostgreSQL, with node-postgres (pg): the same table and rules as the
// Python SDK's PostgresBarrier, so participants of both SDKs can share one database.
//
// Each call takes a client from the pool and opens a transaction on it. The call's barrier row
// is inserted first (INSERT ... ON CONFLICT DO NOTHING): a concurrent duplicate blocks on that
// row's lock until the first call commits or rolls back, then replays the stored answer or runs
// afresh. The handler is then prepared and its effect run with that same client, inside a
// savepoint, so that its writes commit or roll back together with the barrier row:
//
// - a repeated call answers the first answer again (output, rejection, permanent failure);
// - a Compensate whose Execute never took effect applies nothing and answers OK (a null
//   compensation), leaving a BLOCKED marker that refuses a late Execute;
// - a Rejected or PermanentFailure Execute rolls back to the savepoint and is remembered; a
//   Compensate's is rolled back whole and not remembered (sent again, it runs afresh);
// - RetryLater, and any other exception, rolls everything back and leaves no barrier row.
//
// Unlike better-sqlite3, pg is asynchronous, so the effect may be async: `(client) =>
// Promise<output>`. Write the business rows with `client.query(...)` and never commit it.
//
// pg is an optional peer dependency of the package: install it next to it (`npm install pg`).

import {
  BLOCKED,
  BarrierKey,
  DEFAULT_TABLE,
  DONE,
  Operation,
  OutcomeKind,
  PENDING,
  STATES,
  allowsEveryState,
  checkIdentifier,
  refusalState,
  storedRefusal,
} from './barrier.js';
import { checkPruneOptions, chunks, endedAmong } from './retention.js';

export { MINIMUM_RETENTION_MS } from './retention.js';

let pg;
try {
  pg = (await import('pg')).default;
} catch (error) {
  if (error?.code !== 'ERR_MODULE_NOT_FOUND') throw error;
  throw new Error(
    "@saga-coordinator/sdk/postgres needs node-postgres: install it with 'npm install pg'",
    { cause: error },
  );
}

const SAVEPOINT = 'saga_barrier_effect';

const schema = (table) => `
CREATE TABLE IF NOT EXISTS ${table} (
    saga_id    TEXT NOT NULL,
    step       TEXT NOT NULL,
    operation  TEXT NOT NULL CHECK (operation IN ('execute', 'compensate')),
    request_id TEXT NOT NULL,
    state      TEXT NOT NULL CONSTRAINT ${table}_state_check CHECK (state IN (${STATES.map(
      (state) => `'${state}'`,
    ).join(', ')})),
    output     BYTEA,
    reason     TEXT NOT NULL DEFAULT '',
    message    TEXT NOT NULL DEFAULT '',
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (saga_id, step, operation, request_id)
)`;

const STATE_CHECKS = `
SELECT conname, pg_get_constraintdef(oid) AS definition FROM pg_constraint
WHERE conrelid = to_regclass($1) AND contype = 'c' AND pg_get_constraintdef(oid) LIKE '%state%'`;

const isCurrent = (checks) => checks.length === 1 && allowsEveryState(checks[0].definition);

const quote = (identifier) => `"${identifier.replaceAll('"', '""')}"`;

function toBuffer(output) {
  if (Buffer.isBuffer(output)) return output;
  if (output instanceof Uint8Array) return Buffer.from(output);
  if (output === null || output === undefined) return Buffer.alloc(0);
  throw new TypeError(`a barrier effect must return a Buffer, not ${typeof output}`);
}

/**
 * The barrier in a PostgreSQL database, next to the participant's business tables.
 *
 * Give a connection string (`postgresql://user@host:5432/db`; the barrier makes a pg.Pool of at
 * most `max` clients and ends it on close()) or a pg.Pool of your own (it stays yours: the
 * barrier never ends it). The table is created (or upgraded) on first use; `migrate()` does it
 * up front.
 */
export class PostgresBarrier {
  /** Effects may be async: the transaction spans awaits. */
  asyncEffects = true;
  #owns;
  #ready = null;
  #sql;

  /**
   * @param {string | import('pg').Pool} database
   * @param {{table?: string, max?: number}} [options]
   */
  constructor(database, { table = DEFAULT_TABLE, max = 10 } = {}) {
    this.table = checkIdentifier(table);
    if (typeof database === 'string') {
      if (!database) throw new TypeError('the PostgreSQL connection string is empty');
      this.#owns = true;
      this.pool = new pg.Pool({ connectionString: database, max });
      // An idle client whose connection breaks (a server restart) is dropped from the pool,
      // which also emits 'error': without a listener that would end the process.
      this.pool.on('error', () => {});
    } else if (database && typeof database.connect === 'function' && typeof database.query === 'function') {
      this.#owns = false;
      this.pool = database;
    } else {
      throw new TypeError('give a PostgreSQL connection string or a pg.Pool');
    }
    const where = 'saga_id = $1 AND step = $2 AND operation = $3 AND request_id = $4';
    this.#sql = {
      claim:
        `INSERT INTO ${table} (saga_id, step, operation, request_id, state) ` +
        'VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING',
      read: `SELECT state, output, reason, message FROM ${table} WHERE ${where}`,
      record:
        `UPDATE ${table} SET state = $5, output = $6, reason = $7, message = $8 ` +
        `WHERE ${where}`,
    };
  }

  /** Create the barrier's table when missing, or upgrade one that predates a row state. */
  migrate() {
    if (!this.#ready) {
      this.#ready = this.#migrate().catch((error) => {
        this.#ready = null; // the next call tries again
        throw error;
      });
    }
    return this.#ready;
  }

  async #migrate() {
    const client = await this.pool.connect();
    try {
      await client.query('BEGIN');
      try {
        if (!isCurrent((await client.query(STATE_CHECKS, [this.table])).rows)) {
          // Participants starting together: concurrent CREATE TABLE IF NOT EXISTS can fail on
          // PostgreSQL's catalog unique index, so they take turns.
          await client.query('SELECT pg_advisory_xact_lock(hashtext($1))', [this.table]);
          await client.query(schema(this.table));
          const checks = (await client.query(STATE_CHECKS, [this.table])).rows;
          if (!isCurrent(checks)) {
            for (const { conname } of checks) {
              await client.query(`ALTER TABLE ${quote(this.table)} DROP CONSTRAINT ${quote(conname)}`);
            }
            const states = STATES.map((state) => `'${state}'`).join(', ');
            await client.query(
              `ALTER TABLE ${quote(this.table)} ADD CONSTRAINT ${quote(`${this.table}_state_check`)} ` +
                `CHECK (state IN (${states}))`,
            );
          }
        }
        await client.query('COMMIT');
      } catch (error) {
        await client.query('ROLLBACK').catch(() => {});
        throw error;
      }
    } finally {
      client.release();
    }
  }

  /**
   * Apply a call once. `prepare` is called only when the call is new, inside the barrier's
   * transaction (a concurrent duplicate waits for it), and returns the effect: `(client) =>
   * output` (it may be async), run with the transaction's pg client, in a savepoint. A Rejected
   * or PermanentFailure thrown by `prepare` or the effect is thrown, and recorded for an
   * Execute; anything else rolls everything back and is thrown.
   *
   * @param {BarrierKey} key
   * @param {() => Function | Promise<Function>} prepare
   * @returns {Promise<{output: Buffer, kind: string}>}
   */
  async run(key, prepare) {
    if (!(key instanceof BarrierKey)) throw new TypeError('run() needs a BarrierKey');
    await this.migrate();
    const client = await this.pool.connect();
    let open = false;
    let broken;
    try {
      await client.query('BEGIN');
      open = true;
      const outcome = await this.#guarded(client, key, prepare);
      open = false; // #guarded committed or rolled back
      return outcome;
    } catch (error) {
      if (error?.[SETTLED]) {
        delete error[SETTLED];
      } else if (!open) {
        broken = error; // BEGIN itself failed: do not hand this connection out again
      } else {
        await client.query('ROLLBACK').catch((rollbackError) => {
          broken = rollbackError; // the connection is unusable: release() destroys it
        });
      }
      throw error;
    } finally {
      client.release(broken);
    }
  }

  /**
   * Apply `effect` (`(client) => output`, may be async) once for `key`, in one transaction with
   * the barrier row; the same rules as run().
   */
  runEffect(key, effect) {
    return this.run(key, () => effect);
  }

  /** The stored answer of a call, or null: {state, output, reason, message}. */
  async lookup(key) {
    await this.migrate();
    const { rows } = await this.pool.query(this.#sql.read, key.params());
    return rows[0] ?? null;
  }

  /**
   * Delete the rows of calls first seen more than `olderThanMs` ago, by the database's clock,
   * and return how many (with `dryRun`, only count them). A window shorter than
   * MINIMUM_RETENTION_MS is refused before the database is touched: a duplicate arriving after
   * the prune would apply again. With `ended`, only the old rows of sagas it says have ended
   * go: it is given the saga ids of the old rows, at most 500 at a time, outside any
   * transaction and before anything is deleted, and returns (or resolves to) those whose sagas
   * have ended; ids it returns that are not among them are ignored. If `ended` throws, nothing
   * is deleted and the error is thrown.
   *
   * @param {{olderThanMs: number, dryRun?: boolean,
   *          ended?: (sagaIds: string[]) => Iterable<string> | Promise<Iterable<string>>}} options
   * @returns {Promise<number>}
   */
  async prune(options) {
    const { olderThanMs, dryRun, ended } = checkPruneOptions(options);
    await this.migrate();
    const table = this.table;
    // One cutoff for the whole prune, read from the database's clock (as text in UTC, to keep
    // its microseconds): a row that turns old while `ended` is being asked waits for the next
    // prune.
    const { rows } = await this.pool.query(
      "SELECT to_char((now() - make_interval(secs => $1)) AT TIME ZONE 'UTC', " +
        `'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS cutoff`,
      [olderThanMs / 1000],
    );
    const cutoff = rows[0].cutoff;
    const old = 'created_at < $1::timestamptz';
    const remove = async (where, params) =>
      dryRun
        ? Number((await this.pool.query(`SELECT count(*) AS n FROM ${table} WHERE ${where}`, params)).rows[0].n)
        : (await this.pool.query(`DELETE FROM ${table} WHERE ${where}`, params)).rowCount;
    if (ended === null) return remove(old, [cutoff]);
    const candidates = (
      await this.pool.query(`SELECT DISTINCT saga_id FROM ${table} WHERE ${old}`, [cutoff])
    ).rows.map((row) => row.saga_id);
    let count = 0;
    for (const chunk of chunks(await endedAmong(ended, candidates))) {
      count += await remove(`${old} AND saga_id = ANY($2::text[])`, [cutoff, chunk]);
    }
    return count;
  }

  /** End the pool, when the barrier made it. */
  async close() {
    if (this.#owns && !this.pool.ended) await this.pool.end();
  }

  async #guarded(client, key, prepare) {
    const sql = this.#sql;
    const params = key.params();
    if ((await client.query(sql.claim, [...params, PENDING])).rowCount !== 1) {
      // Another call with this request_id committed first: the insert waited for it.
      const row = (await client.query(sql.read, params)).rows[0];
      await client.query('ROLLBACK');
      if (!row) throw new Error(`barrier row of ${key.requestId} vanished`);
      return replay(key, row);
    }
    if (key.operation === Operation.COMPENSATE) {
      const execute = key.executeKey();
      // Claiming the Execute's key both detects an Execute that never arrived and, by leaving
      // the BLOCKED marker, refuses one that arrives later.
      const neverArrived =
        (await client.query(sql.claim, [...execute.params(), BLOCKED])).rowCount === 1;
      if (neverArrived || (await client.query(sql.read, execute.params())).rows[0].state !== DONE) {
        const output = Buffer.alloc(0);
        await client.query(sql.record, [...params, DONE, output, '', '']);
        await client.query('COMMIT');
        return { output, kind: OutcomeKind.NULL_COMPENSATION };
      }
    }
    // A savepoint, so that a refusal undoes the effect's writes but keeps the barrier row.
    await client.query(`SAVEPOINT ${SAVEPOINT}`);
    let output;
    try {
      const effect = await prepare();
      if (typeof effect !== 'function') {
        throw new TypeError('prepare must return the effect, a function of the pg client');
      }
      output = toBuffer(await effect(client));
    } catch (error) {
      const state = refusalState(error);
      // A "no" to undoing is not remembered: nothing was undone, and the same compensation
      // sent again (an operator resuming the saga) runs afresh. run() rolls it all back.
      if (state === null || key.operation === Operation.COMPENSATE) throw error;
      await client.query(`ROLLBACK TO SAVEPOINT ${SAVEPOINT}`);
      await client.query(sql.record, [...params, state, null, error.reason, error.message]);
      await client.query('COMMIT');
      throw settled(error);
    }
    await client.query(`RELEASE SAVEPOINT ${SAVEPOINT}`);
    await client.query(sql.record, [...params, DONE, output, '', '']);
    await client.query('COMMIT');
    return { output, kind: OutcomeKind.APPLIED };
  }
}

// Marks an error thrown after its transaction was committed, so that run() does not roll back.
const SETTLED = Symbol('settled');

function settled(error) {
  error[SETTLED] = true;
  return error;
}

function replay(key, row) {
  if (row.state === DONE) {
    return { output: row.output ?? Buffer.alloc(0), kind: OutcomeKind.REPLAYED };
  }
  const refusal = storedRefusal(key.operation, row);
  if (refusal) throw settled(refusal);
  if (row.state === BLOCKED) return { output: Buffer.alloc(0), kind: OutcomeKind.REPLAYED };
  throw settled(new Error(`barrier row of ${key.requestId} is in unexpected state ${row.state}`));
}
