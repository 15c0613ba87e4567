// Types of @saga-coordinator/sdk/postgres: the idempotency barrier on PostgreSQL (node-postgres).
// TypeScript users install pg's types next to pg: npm install pg @types/pg

import type { Pool, PoolClient } from 'pg';
import type { Barrier, BarrierKey, Outcome, PruneOptions } from './index.js';

export { MINIMUM_RETENTION_MS } from './index.js';

/** A business effect on PostgreSQL: writes with `client` (never commits it), returns the output. */
export type PostgresEffect = (
  client: PoolClient,
) => Uint8Array | null | undefined | Promise<Uint8Array | null | undefined>;

export interface PostgresBarrierOptions {
  /** Table name, a plain SQL identifier. Default "saga_barrier". */
  table?: string;
  /** Most clients of the pool the barrier makes from a connection string. Default 10. */
  max?: number;
}

/**
 * The idempotency barrier in a PostgreSQL database, in the same transaction as the business
 * writes. Same table as the Python SDK's PostgresBarrier.
 */
export class PostgresBarrier implements Barrier<PoolClient> {
  /** A connection string (the barrier makes and ends its pool) or a pg.Pool of your own. */
  constructor(database: string | Pool, options?: PostgresBarrierOptions);
  /** Effects may be async: the transaction spans awaits. */
  readonly asyncEffects: true;
  readonly pool: Pool;
  readonly table: string;
  /** Create the table when missing, or upgrade one that predates a row state. */
  migrate(): Promise<void>;
  /**
   * Apply a call once. `prepare` runs only for a new call, inside the barrier's transaction, and
   * returns the effect, run with the transaction's client.
   */
  run(key: BarrierKey, prepare: () => PostgresEffect | Promise<PostgresEffect>): Promise<Outcome>;
  /** Apply `effect` once for `key`, in one transaction with the barrier row. */
  runEffect(key: BarrierKey, effect: PostgresEffect): Promise<Outcome>;
  /** The stored answer of a call, or null. */
  lookup(key: BarrierKey): Promise<{
    state: 'done' | 'rejected' | 'blocked' | 'failed';
    output: Buffer | null;
    reason: string;
    message: string;
  } | null>;
  /**
   * Delete the rows of calls first seen more than `olderThanMs` ago, by the server's clock
   * (only those of ended sagas, with `ended`); resolves to how many were deleted, or with
   * `dryRun` would be. Rejects a window shorter than MINIMUM_RETENTION_MS.
   */
  prune(options: PruneOptions): Promise<number>;
  /** End the pool, when the barrier made it. */
  close(): Promise<void>;
}
