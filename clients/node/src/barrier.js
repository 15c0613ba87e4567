// The idempotency barrier on SQLite: applies each Execute and Compensate once, in the business
// transaction.
//
// A participant receives every call at least once, and a Compensate may arrive before (or
// instead of) its Execute. For each call the barrier records the call's request_id in a table
// of the participant's own SQLite database, in the SAME transaction as the business writes, so
// that both commit or roll back together:
//
// - a repeated call (same request_id) does not apply the effect again; it answers what the
//   first call answered: its output, or its rejection;
// - a Compensate whose Execute never took effect applies nothing and answers OK (a null
//   compensation); it leaves a marker under the Execute's request_id, so that an Execute
//   arriving later is refused (ExecuteAfterCompensate) and applies nothing (no hanging resource);
// - a Rejected or PermanentFailure Execute rolls its own writes back and its answer is
//   remembered; a Rejected or PermanentFailure Compensate rolls everything back and is not
//   remembered (sent again, it runs afresh);
// - RetryLater, and any other exception, rolls everything back and leaves no barrier row: the
//   retry runs afresh (a stored "retry later" would answer "retry later" forever).
//
// better-sqlite3 is synchronous, so a transaction cannot span an `await`. Work is therefore split
// in two: `prepare`, async, decides (reads, validation, calls that change nothing) and returns
// `effect`, a synchronous function that the barrier runs inside its transaction with the
// database handle, where every business write goes. The effect's return value is the output.
// Within one process every transaction runs to completion on the event loop before another
// starts, and across processes BEGIN IMMEDIATE takes SQLite's write lock first, so concurrent
// duplicates of one call are applied once: the first to commit wins, the others replay it.
//
// The table is the one the Python SDK's SqliteBarrier uses, so either SDK can read it.

import Database from 'better-sqlite3';
import { ExecuteAfterCompensate, PermanentFailure, Rejected } from './errors.js';
import { checkPruneOptions, chunks, endedAmong } from './retention.js';

export const DEFAULT_TABLE = 'saga_barrier';

/** Which call of the contract a barrier row records. */
export const Operation = Object.freeze({ EXECUTE: 'execute', COMPENSATE: 'compensate' });

/** How the barrier answered a call. */
export const OutcomeKind = Object.freeze({
  /** The effect ran and committed now. */
  APPLIED: 'applied',
  /** A repeated call: the first answer, returned again without running the effect. */
  REPLAYED: 'replayed',
  /** A Compensate whose Execute never took effect: nothing to undo, nothing ran. */
  NULL_COMPENSATION: 'null_compensation',
});

// Row states, as the Python SDK writes them. PENDING is only ever seen inside the transaction
// that wrote it.
export const PENDING = 'pending';
export const DONE = 'done';
export const REJECTED = 'rejected';
/** The marker a null compensation leaves under its Execute's request_id. */
export const BLOCKED = 'blocked';
/** An Execute answered with PermanentFailure. */
export const FAILED = 'failed';
export const STATES = Object.freeze([PENDING, DONE, REJECTED, BLOCKED, FAILED]);
const STATE_LIST = STATES.map((state) => `'${state}'`).join(', ');

const IDENTIFIER = /^[A-Za-z_][A-Za-z0-9_]{0,62}$/;
const SYNCHRONOUS = new Set(['OFF', 'NORMAL', 'FULL', 'EXTRA']);

/** The table's name when it is a plain SQL identifier (it is put into SQL text); else throws. */
export function checkIdentifier(table) {
  if (typeof table !== 'string' || !IDENTIFIER.test(table)) {
    throw new TypeError(`not a plain SQL identifier: ${JSON.stringify(table)}`);
  }
  return table;
}

/** True when a table's CREATE statement (or CHECK constraint text) allows every row state. */
export function allowsEveryState(definition) {
  return STATES.every((state) => definition.includes(`'${state}'`));
}

/** A refusal the barrier remembers for an Execute, and the row state that records it. */
export function refusalState(error) {
  if (error instanceof PermanentFailure) return FAILED;
  if (error instanceof Rejected) return REJECTED;
  return null;
}

/** The error a stored refusal (or a BLOCKED marker) answers again; null for other rows. */
export function storedRefusal(operation, row) {
  if (row.state === REJECTED) return new Rejected(row.reason, row.message);
  if (row.state === FAILED) return new PermanentFailure(row.message, { reason: row.reason });
  if (row.state === BLOCKED && operation === Operation.EXECUTE) return new ExecuteAfterCompensate();
  return null;
}

const COLUMNS = 'saga_id, step, operation, request_id, state, output, reason, message, created_at';

const schema = (table) => `
CREATE TABLE IF NOT EXISTS ${table} (
    saga_id    TEXT NOT NULL,
    step       TEXT NOT NULL,
    operation  TEXT NOT NULL CHECK (operation IN ('execute', 'compensate')),
    request_id TEXT NOT NULL,
    state      TEXT NOT NULL CHECK (state IN (${STATE_LIST})),
    output     BLOB,
    reason     TEXT NOT NULL DEFAULT '',
    message    TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (saga_id, step, operation, request_id)
) STRICT`;

// Create the table when missing, and upgrade one written before a row state existed (SQLite
// cannot alter a CHECK constraint: the rows are copied into a table built anew), as the Python
// SDK does.
function ensureSchema(db, table) {
  const current = () =>
    db.prepare("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?").get(table);
  const found = current();
  if (found && allowsEveryState(found.sql)) return;
  const upgrade = db.transaction(() => {
    db.exec(schema(table));
    if (allowsEveryState(current().sql)) return;
    db.exec(`ALTER TABLE ${table} RENAME TO ${table}_upgrading`);
    db.exec(schema(table));
    db.exec(`INSERT INTO ${table} (${COLUMNS}) SELECT ${COLUMNS} FROM ${table}_upgrading`);
    db.exec(`DROP TABLE ${table}_upgrading`);
  });
  if (db.inTransaction) upgrade();
  else upgrade.immediate();
}

function stripSagaName(saga) {
  return saga.startsWith('sagas/') ? saga.slice('sagas/'.length) : saga;
}

/** Identifies one call: the saga, the step, the operation and its request_id. */
export class BarrierKey {
  /**
   * @param {{sagaId: string, step: string, operation: 'execute' | 'compensate',
   *          requestId: string, executeRequestId?: string}} fields
   */
  constructor({ sagaId, step, operation, requestId, executeRequestId = '' }) {
    if (!requestId) throw new TypeError('request_id must not be empty');
    if (operation !== Operation.EXECUTE && operation !== Operation.COMPENSATE) {
      throw new TypeError(`unknown operation: ${JSON.stringify(operation)}`);
    }
    if (operation === Operation.COMPENSATE && !executeRequestId) {
      throw new TypeError("a Compensate's key needs the execute_request_id it undoes");
    }
    this.sagaId = sagaId;
    this.step = step;
    this.operation = operation;
    this.requestId = requestId;
    this.executeRequestId = executeRequestId;
    Object.freeze(this);
  }

  /** The key of an ExecuteRequest (as decoded by the contract: snake_case fields). */
  static forExecute(request) {
    return new BarrierKey({
      sagaId: stripSagaName(request.saga),
      step: request.step,
      operation: Operation.EXECUTE,
      requestId: request.request_id,
    });
  }

  /** The key of a CompensateRequest. */
  static forCompensate(request) {
    return new BarrierKey({
      sagaId: stripSagaName(request.saga),
      step: request.step,
      operation: Operation.COMPENSATE,
      requestId: request.request_id,
      executeRequestId: request.execute_request_id,
    });
  }

  /** For a Compensate: the key of the Execute it undoes. */
  executeKey() {
    return new BarrierKey({
      sagaId: this.sagaId,
      step: this.step,
      operation: Operation.EXECUTE,
      requestId: this.executeRequestId,
    });
  }

  /** The parameters that pick this key's row. */
  params() {
    return [this.sagaId, this.step, this.operation, this.requestId];
  }
}

// Thrown inside a transaction to roll it back when the call is new and its effect has not been
// prepared yet.
const NEEDS_EFFECT = Symbol('needs effect');

function toBuffer(output) {
  if (Buffer.isBuffer(output)) return output;
  if (output instanceof Uint8Array) return Buffer.from(output);
  if (output === null || output === undefined) return Buffer.alloc(0);
  throw new TypeError(`a barrier effect must return a Buffer, not ${typeof output}`);
}

/**
 * The barrier in a SQLite database, next to the participant's business tables.
 *
 * Give a file path (the barrier opens it, in WAL mode, with `synchronous` FULL by default so an
 * answered call is on disk) or an open better-sqlite3 Database (configured by its owner). The
 * barrier's table is created when missing. `db` is the handle the effects receive: create the
 * business tables and read them through it too.
 */
export class SqliteBarrier {
  #owns;
  #attempt;
  #sql;

  /**
   * @param {string | import('better-sqlite3').Database} database
   * @param {{table?: string, timeoutMs?: number, synchronous?: string}} [options]
   */
  constructor(database, { table = DEFAULT_TABLE, timeoutMs = 30_000, synchronous = 'FULL' } = {}) {
    checkIdentifier(table);
    const mode = String(synchronous).toUpperCase();
    if (!SYNCHRONOUS.has(mode)) {
      throw new TypeError(`unknown synchronous mode: ${JSON.stringify(synchronous)}`);
    }
    this.table = table;
    if (typeof database === 'string') {
      this.#owns = true;
      // timeout: how long BEGIN IMMEDIATE waits for another process' write lock.
      this.db = new Database(database, { timeout: timeoutMs });
      this.db.pragma('journal_mode = WAL');
      this.db.pragma(`synchronous = ${mode}`);
    } else if (database && typeof database.prepare === 'function') {
      this.#owns = false;
      this.db = database;
    } else {
      throw new TypeError('give a database file path or an open better-sqlite3 Database');
    }
    ensureSchema(this.db, table);
    const where = 'saga_id = ? AND step = ? AND operation = ? AND request_id = ?';
    this.#sql = {
      claim: this.db.prepare(
        `INSERT INTO ${table} (saga_id, step, operation, request_id, state) ` +
          'VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING',
      ),
      read: this.db.prepare(`SELECT state, output, reason, message FROM ${table} WHERE ${where}`),
      record: this.db.prepare(
        `UPDATE ${table} SET state = ?, output = ?, reason = ?, message = ? WHERE ${where}`,
      ),
    };
    // A nested transaction is a savepoint: a rejection undoes the effect's writes but keeps the
    // barrier row that records it.
    const applyEffect = this.db.transaction((effect) => {
      const output = effect(this.db);
      if (output && typeof output.then === 'function') {
        throw new TypeError(
          'a barrier effect must be synchronous: a SQLite transaction cannot span an await',
        );
      }
      return toBuffer(output);
    });
    this.#attempt = this.db.transaction((key, effect) => this.#guarded(key, effect, applyEffect));
  }

  /**
   * Apply a call once. `prepare` is called only when the call is new (concurrent duplicates may
   * each prepare; only one effect commits): it may be async, must change nothing, and returns
   * the effect, a synchronous `(db) => Buffer` run in the barrier's transaction. A Rejected or
   * PermanentFailure thrown by `prepare` or by the effect is thrown, and recorded for an
   * Execute (a Compensate's is not remembered); any other error rolls back and is thrown.
   *
   * @param {BarrierKey} key
   * @param {() => ((db: import('better-sqlite3').Database) => Uint8Array) |
   *   Promise<(db: import('better-sqlite3').Database) => Uint8Array>} prepare
   * @returns {Promise<{output: Buffer, kind: string}>}
   */
  async run(key, prepare) {
    const first = this.#tryAttempt(key, null);
    if (first !== NEEDS_EFFECT) return first;
    let effect;
    try {
      effect = await prepare();
      if (typeof effect !== 'function') {
        throw new TypeError('prepare must return the effect, a function of the database');
      }
    } catch (error) {
      if (refusalState(error) === null) throw error;
      effect = () => {
        throw error;
      };
    }
    return this.#tryAttempt(key, effect);
  }

  /**
   * Apply a synchronous effect once for `key`, in one transaction with the barrier row; the
   * same rules as run().
   *
   * @param {BarrierKey} key
   * @param {(db: import('better-sqlite3').Database) => Uint8Array} effect
   * @returns {{output: Buffer, kind: string}}
   */
  runSync(key, effect) {
    return this.#tryAttempt(key, effect);
  }

  /** The stored answer of a call, or null: {state, output, reason, message}. */
  lookup(key) {
    const row = this.#sql.read.get(...key.params());
    return row ? { ...row, output: row.output ?? null } : null;
  }

  /**
   * Delete the rows of calls first seen more than `olderThanMs` ago, by the database's clock,
   * and return how many (with `dryRun`, only count them). A window shorter than
   * MINIMUM_RETENTION_MS is refused before the database is touched: a duplicate arriving after
   * the prune would apply again. With `ended`, only the old rows of sagas it says have ended
   * go: it is given the saga ids of the old rows, at most 500 at a time and before anything is
   * deleted, and returns (or resolves to) those whose sagas have ended; ids it returns that are
   * not among them are ignored. If `ended` throws, nothing is deleted and the error is thrown.
   *
   * @param {{olderThanMs: number, dryRun?: boolean,
   *          ended?: (sagaIds: string[]) => Iterable<string> | Promise<Iterable<string>>}} options
   * @returns {Promise<number>}
   */
  async prune(options) {
    const { olderThanMs, dryRun, ended } = checkPruneOptions(options);
    const table = this.table;
    // One cutoff for the whole prune, read from the database's clock: a row that turns old
    // while `ended` is being asked waits for the next prune.
    const { cutoff } = this.db
      .prepare("SELECT strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?) AS cutoff")
      .get(`-${(olderThanMs / 1000).toFixed(3)} seconds`);
    const old = 'created_at < ?';
    if (ended === null) {
      if (dryRun) return this.db.prepare(`SELECT count(*) AS n FROM ${table} WHERE ${old}`).get(cutoff).n;
      return this.db.prepare(`DELETE FROM ${table} WHERE ${old}`).run(cutoff).changes;
    }
    if (this.db.inTransaction) {
      throw new Error('prune() with ended cannot run inside an open transaction: it awaits ended()');
    }
    const candidates = this.db.prepare(`SELECT DISTINCT saga_id FROM ${table} WHERE ${old}`).pluck().all(cutoff);
    let count = 0;
    for (const chunk of chunks(await endedAmong(ended, candidates))) {
      const where = `${old} AND saga_id IN (${chunk.map(() => '?').join(', ')})`;
      count += dryRun
        ? this.db.prepare(`SELECT count(*) AS n FROM ${table} WHERE ${where}`).get(cutoff, ...chunk).n
        : this.db.prepare(`DELETE FROM ${table} WHERE ${where}`).run(cutoff, ...chunk).changes;
    }
    return count;
  }

  /** Close the database, when the barrier opened it. */
  close() {
    if (this.#owns && this.db.open) this.db.close();
  }

  #tryAttempt(key, effect) {
    let result;
    try {
      // IMMEDIATE takes the write lock now: a deferred transaction that reads and then writes
      // would fail at once with SQLITE_BUSY when another process holds it.
      result = this.#attempt.immediate(key, effect);
    } catch (error) {
      if (error === NEEDS_EFFECT) return NEEDS_EFFECT;
      throw error;
    }
    if (result.rejected) throw result.rejected;
    return result.outcome;
  }

  #claim(key, state) {
    return this.#sql.claim.run(...key.params(), state).changes === 1;
  }

  #record(key, state, output, reason = '', message = '') {
    this.#sql.record.run(state, output, reason, message, ...key.params());
  }

  // The barrier's rules, inside the transaction. Returns {outcome} or {rejected}; throws to
  // roll back.
  #guarded(key, effect, applyEffect) {
    if (!this.#claim(key, PENDING)) {
      // Another call with this request_id committed first.
      return this.#replay(key, this.#sql.read.get(...key.params()));
    }
    if (key.operation === Operation.COMPENSATE) {
      const execute = key.executeKey();
      // Claiming the Execute's key both detects an Execute that never arrived and, by leaving
      // the BLOCKED marker, refuses one that arrives later.
      const neverArrived = this.#claim(execute, BLOCKED);
      if (neverArrived || this.#sql.read.get(...execute.params()).state !== DONE) {
        const output = Buffer.alloc(0);
        this.#record(key, DONE, output);
        return { outcome: { output, kind: OutcomeKind.NULL_COMPENSATION } };
      }
    }
    if (effect === null) throw NEEDS_EFFECT;
    let output;
    try {
      output = applyEffect(effect);
    } catch (error) {
      const state = refusalState(error);
      if (state === null) throw error;
      // A "no" to undoing is not remembered: nothing was undone, and the same compensation
      // sent again (an operator resuming the saga) runs afresh. Throwing rolls it all back.
      if (key.operation === Operation.COMPENSATE) throw error;
      this.#record(key, state, null, error.reason, error.message);
      return { rejected: error };
    }
    this.#record(key, DONE, output);
    return { outcome: { output, kind: OutcomeKind.APPLIED } };
  }

  #replay(key, row) {
    if (!row) throw new Error(`barrier row of ${key.requestId} vanished inside its transaction`);
    if (row.state === DONE) {
      return { outcome: { output: row.output ?? Buffer.alloc(0), kind: OutcomeKind.REPLAYED } };
    }
    const refusal = storedRefusal(key.operation, row);
    if (refusal) return { rejected: refusal };
    if (row.state === BLOCKED) return { outcome: { output: Buffer.alloc(0), kind: OutcomeKind.REPLAYED } };
    throw new Error(`barrier row of ${key.requestId} is in unexpected state ${row.state}`);
  }
}
