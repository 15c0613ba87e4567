// Types of the public API of @saga-coordinator/sdk (the code is plain JavaScript in src/).

import type * as grpc from '@grpc/grpc-js';
import type { PackageDefinition, ServiceDefinition } from '@grpc/proto-loader';
import type BetterSqlite3 from 'better-sqlite3';

// --- payloads ----------------------------------------------------------------------------------

/** Encode a payload: bytes as they are, null/undefined as empty, anything else as UTF-8 JSON. */
export function encodePayload(value: unknown): Buffer;
/** Decode a UTF-8 JSON payload; empty is null. Throws on a payload that is not UTF-8 JSON. */
export function decodeJson(payload: Uint8Array | null | undefined): unknown;

// --- errors ------------------------------------------------------------------------------------

/** One invalid field of a request, from a google.rpc.BadRequest. */
export interface FieldViolation {
  readonly field: string;
  readonly description: string;
}

/** Root of every error the SDK throws. */
export class SdkError extends Error {}

/** A non-OK gRPC status, with the google.rpc.Status details parsed. */
export class SagaRpcError extends SdkError {
  constructor(
    code: grpc.status,
    details: string,
    options?: {
      reason?: string;
      domain?: string;
      errorMetadata?: Record<string, string>;
      fieldViolations?: FieldViolation[];
      retryDelayMs?: number | null;
      metadata?: grpc.Metadata | null;
      cause?: unknown;
    },
  );
  /** Numeric gRPC status code. */
  readonly code: grpc.status;
  /** Its name, e.g. "NOT_FOUND". */
  readonly codeName: string;
  /** The status message. */
  readonly details: string;
  /** ErrorInfo.reason, "" when none was sent. */
  readonly reason: string;
  /** ErrorInfo.domain, "" when none was sent. */
  readonly domain: string;
  /** ErrorInfo.metadata. */
  readonly errorMetadata: Readonly<Record<string, string>>;
  /** BadRequest.field_violations. */
  readonly fieldViolations: readonly FieldViolation[];
  /** RetryInfo.retry_delay in milliseconds, or null. */
  readonly retryDelayMs: number | null;
  /** The call's trailing metadata. */
  readonly metadata: grpc.Metadata | null;
}

/** Translate a failed grpc-js call into a SagaRpcError. */
export function errorFromGrpc(error: unknown): SagaRpcError;

/** wait() gave up before the saga settled. */
export class WaitTimeout extends SdkError {
  constructor(sagaId: string, timeoutMs: number);
  readonly sagaId: string;
  readonly timeoutMs: number;
}

/**
 * A business "no", thrown by a participant's handler: nothing was applied. Answered as
 * FAILED_PRECONDITION with an ErrorInfo carrying `reason` (UPPER_SNAKE).
 */
export class Rejected extends SdkError {
  constructor(reason: string, message?: string);
  readonly reason: string;
}

/** The barrier refused an Execute whose Compensate had already been answered. */
export class ExecuteAfterCompensate extends Rejected {
  static readonly REASON: 'EXECUTE_AFTER_COMPENSATE';
  constructor(message?: string);
}

/**
 * Not now, try again in `retryAfterMs`: answered as UNAVAILABLE with a google.rpc.RetryInfo and
 * an ErrorInfo carrying `reason` (default RETRY_LATER). The coordinator retries the same
 * request_id no sooner than that (capped); the barrier stores nothing.
 */
export class RetryLater extends SdkError {
  static readonly DEFAULT_REASON: 'RETRY_LATER';
  constructor(message: string, options: { retryAfterMs: number; reason?: string });
  readonly reason: string;
  readonly retryAfterMs: number;
}

/**
 * This request can never be done here: answered as INVALID_ARGUMENT with an ErrorInfo carrying
 * `reason` (default PERMANENT_FAILURE). The step fails without a retry and the saga compensates.
 * With a barrier, an Execute's permanent failure is stored and answered again to duplicates.
 */
export class PermanentFailure extends SdkError {
  static readonly DEFAULT_REASON: 'PERMANENT_FAILURE';
  constructor(message: string, options?: { reason?: string });
  readonly reason: string;
}

// --- resources ---------------------------------------------------------------------------------

export type SagaState =
  | 'UNSPECIFIED'
  | 'RUNNING'
  | 'COMPENSATING'
  | 'SUCCEEDED'
  | 'COMPENSATED'
  | 'NEEDS_ATTENTION';
export const SagaState: { readonly [K in SagaState]: K };
/** The states at which WatchSaga ends and wait() returns. */
export const SETTLED_STATES: ReadonlySet<SagaState>;

export type StepState =
  | 'UNSPECIFIED'
  | 'PENDING'
  | 'RUNNING'
  | 'SUCCEEDED'
  | 'REJECTED'
  | 'FAILED'
  | 'COMPENSATING'
  | 'COMPENSATED'
  | 'SKIPPED';
export const StepState: { readonly [K in StepState]: K };

export type StepKind = 'COMPENSATABLE' | 'PIVOT' | 'RETRIABLE';
export const StepKind: { readonly [K in StepKind]: K };

export type SagaEventType =
  | 'UNSPECIFIED'
  | 'CREATED'
  | 'STEP_SUCCEEDED'
  | 'STEP_REJECTED'
  | 'STEP_ATTEMPT_FAILED'
  | 'STEP_FAILED'
  | 'COMPENSATION_SUCCEEDED'
  | 'COMPENSATION_ATTEMPT_FAILED'
  | 'COMPENSATION_FAILED'
  | 'CANCEL_REQUESTED'
  | 'RETRY_REQUESTED'
  | 'RESUMED'
  | 'STEP_MARKED_COMPENSATED'
  | 'STEP_COMPLETED'
  | 'DEADLINE_EXCEEDED';
export const SagaEventType: { readonly [K in SagaEventType]: K };

/** Why a call, a step or a saga did not go as planned. */
export interface Failure {
  readonly step: string;
  /** "execute", "compensate" or "cancel". */
  readonly operation: string;
  /** gRPC status code name of the participant's answer. */
  readonly code: string;
  readonly reason: string;
  readonly message: string;
}

/** The record of one step of one saga. */
export class StepRun {
  readonly name: string;
  readonly participant: string;
  readonly kind: StepKind;
  readonly state: StepState;
  readonly executeAttempts: number;
  readonly compensateAttempts: number;
  /** Output of Execute when it answered OK, else null. */
  readonly output: Buffer | null;
  readonly failure: Failure | null;
  readonly startTime: Date | null;
  readonly endTime: Date | null;
  readonly nextAttemptTime: Date | null;
  /** The output decoded as UTF-8 JSON (null when there is none). */
  outputJson<T = unknown>(): T | null;
}

/** One run of a saga definition. */
export class Saga {
  /** Resource name, "sagas/{saga_id}". */
  readonly name: string;
  readonly sagaId: string;
  readonly definition: string;
  readonly definitionVersion: number;
  readonly state: SagaState;
  readonly input: Buffer;
  readonly steps: readonly StepRun[];
  readonly failure: Failure | null;
  readonly cancelReason: string;
  readonly createTime: Date | null;
  readonly updateTime: Date | null;
  readonly endTime: Date | null;
  /** Number of events recorded for the saga. */
  readonly version: number;
  /** The id of the saga's trace (32 hex digits), empty when the coordinator traces nothing. */
  readonly traceId: string;
  /** True when SUCCEEDED, COMPENSATED or NEEDS_ATTENTION. */
  readonly settled: boolean;
  /** The input decoded as UTF-8 JSON (null when empty). */
  inputJson<T = unknown>(): T | null;
  /** The step named `name`; throws RangeError when there is none. */
  step(name: string): StepRun;
}

/** One entry of a saga's event log. */
export interface SagaEvent {
  readonly sequence: number;
  readonly type: SagaEventType;
  readonly step: string;
  readonly attempt: number;
  readonly time: Date | null;
  readonly failure: Failure | null;
  /** "execute" or "compensate" when the event concerns a call, else "". */
  readonly operation: string;
  /** The action or compensation the event concerns, e.g. "OpenAccount" or "CloseAccount". */
  readonly action: string;
  /** The named event the step's success stands for (the definition's `emits`), e.g.
   * "UserCreated"; "" on other events and on steps that name none. */
  readonly emits: string;
  /** Who asked, for cancellations and operator actions. */
  readonly actor: string;
  /** The reason given, for cancellations and operator actions. */
  readonly reason: string;
}

/** One change of the change feed of every saga, with its position in the feed. */
export interface SagaChange {
  /** Increasing in commit order, never reused: store it once processed, resume after it. */
  readonly position: number;
  readonly sagaId: string;
  readonly definition: string;
  readonly definitionVersion: number;
  /** The saga's state after the change. */
  readonly state: SagaState;
  readonly event: SagaEvent;
  readonly labels: Readonly<Record<string, string>>;
}

/** Where the change feed starts and which changes it delivers. */
export interface ChangeFeedOptions {
  /** After this position (0: the oldest kept). */
  afterPosition?: number;
  /** Only changes committed from now on. */
  fromNow?: boolean;
  definition?: string;
  /** Only changes after which the saga is in one of these states. */
  states?: SagaState[];
  labels?: Record<string, string>;
  /** Keep following new changes (default true); false ends once caught up. */
  follow?: boolean;
  /** Aborting it ends the iteration at once, even while it waits for the next change. */
  signal?: AbortSignal;
}

/** One message of a watch: the saga after a change, and the change (null on the first). */
export interface SagaUpdate {
  readonly saga: Saga;
  readonly event: SagaEvent | null;
}

// --- client ------------------------------------------------------------------------------------

export const DEFAULT_TIMEOUT_MS: number;
/** "sagas/{saga_id}" from a plain saga id. */
export function sagaName(sagaId: string): string;
/** Pause before re-watching after the attempt-th broken stream: 50 ms doubling up to 2 s. */
export function rewatchDelayMs(attempt: number): number;

/** What a client dials TLS with, in PEM (Buffers or strings); every field is optional. */
export interface ClientTls {
  /** CA certificates the coordinator's certificate must be signed by; omitted: the system's. */
  ca?: Buffer | string | null;
  /** This client's certificate (then any intermediates'), for a coordinator requiring mTLS. */
  certChain?: Buffer | string | null;
  /** The certificate's private key, unencrypted; goes with `certChain`. */
  privateKey?: Buffer | string | null;
  /** The name the coordinator's certificate carries, when `target` names something else. */
  serverName?: string | null;
}

/** A bearer token, or a function asked for a fresh one before every call. */
export type TokenSource = string | (() => string | Promise<string>);

export interface SagaClientOptions {
  /** TLS (mTLS with `certChain` and `privateKey`); plaintext when neither this nor `credentials`. */
  tls?: ClientTls;
  /** Any grpc-js channel credentials, instead of `tls`. */
  credentials?: grpc.ChannelCredentials;
  /**
   * Sent as `authorization: Bearer <token>` with every call, streams and their reconnections
   * included. Never shown in errors.
   */
  token?: TokenSource;
  channelOptions?: grpc.ChannelOptions;
  /** Deadline of each unary call; null for none. Default 30 000. */
  timeoutMs?: number | null;
  /** Sent with every call. */
  metadata?: Record<string, string>;
  /** Directory holding saga/v1/*.proto. */
  protosDir?: string;
}

/** The constructor's options that SagaClient.fromEnvironment takes, and the environment to read. */
export interface FromEnvironmentOptions extends Omit<SagaClientOptions, 'tls' | 'credentials' | 'token'> {
  /** Default process.env. */
  env?: Record<string, string | undefined>;
}

/** The coordinator's address when nothing names one: 127.0.0.1:50051. */
export const DEFAULT_TARGET: string;

/**
 * The target, TLS settings and token that SAGA_TARGET, SAGA_TLS_CA, SAGA_TLS_CERT, SAGA_TLS_KEY,
 * SAGA_TLS_SERVER_NAME, SAGA_TLS, SAGA_TOKEN and SAGA_TOKEN_FILE name (files read now; a token
 * file again whenever it changes). Throws a TypeError naming the variable at fault.
 */
export function connectionFromEnvironment(env?: Record<string, string | undefined>): {
  target: string;
  tls: ClientTls | null;
  token: string | (() => string) | null;
};

export interface CreateResult {
  readonly saga: Saga;
  /** False when the saga existed already with the same request. */
  readonly created: boolean;
}

export interface ListFilters {
  /** Only sagas in one of these states ("RUNNING" or "SAGA_STATE_RUNNING"); empty: all. */
  states?: Iterable<SagaState | `SAGA_STATE_${SagaState}`>;
  /** Only sagas of this definition. */
  definition?: string;
  /** Sagas fetched per request, 1 to 1000. Default 100. */
  pageSize?: number;
}

export interface EventsOptions {
  /** Events fetched per request, 1 to 1000. Default 100. */
  pageSize?: number;
  /**
   * Newest event first: the end of a long log (why a saga is where it is) without reading it
   * all. Default false: oldest first.
   */
  newestFirst?: boolean;
}

/** A client of the coordinator's CoordinatorService. */
export class SagaClient {
  constructor(target: string, options?: SagaClientOptions);
  /** A client of the coordinator the environment names (see connectionFromEnvironment). */
  static fromEnvironment(options?: FromEnvironmentOptions): SagaClient;
  /**
   * Start a saga; idempotent with `sagaId`. `input`: a Buffer as is, null as empty, else JSON.
   * `definitionVersion` 0 means the newest.
   */
  create(
    definition: string,
    input?: unknown,
    options?: { sagaId?: string; definitionVersion?: number },
  ): Promise<CreateResult>;
  get(sagaId: string): Promise<Saga>;
  cancel(sagaId: string, reason?: string): Promise<Saga>;
  /** Every saga matching the filters, oldest first, page after page. */
  list(filters?: ListFilters): AsyncIterableIterator<Saga>;
  /** The saga's event log, oldest first (newest first with `newestFirst`), page after page. */
  events(sagaId: string, options?: EventsOptions): AsyncIterableIterator<SagaEvent>;
  /** The current saga, then each change, until it settles. Leaving early cancels the stream. */
  watch(sagaId: string): AsyncIterableIterator<SagaUpdate>;
  /**
   * The change feed of every saga, in commit order; reopened after the last position when the
   * stream breaks (UNAVAILABLE, or RESOURCE_EXHAUSTED for a consumer that read too slowly).
   */
  changes(options?: ChangeFeedOptions): AsyncIterableIterator<SagaChange>;
  /**
   * Resolves once SUCCEEDED, COMPENSATED or NEEDS_ATTENTION; WaitTimeout after timeoutMs. Asks
   * the coordinator for the ending only, and watches again after UNAVAILABLE.
   */
  wait(sagaId: string, options?: { timeoutMs?: number | null }): Promise<Saga>;
  close(): void;
}

// --- barrier -----------------------------------------------------------------------------------

export type Operation = 'execute' | 'compensate';
export const Operation: { readonly EXECUTE: 'execute'; readonly COMPENSATE: 'compensate' };

export type OutcomeKind = 'applied' | 'replayed' | 'null_compensation';
export const OutcomeKind: {
  readonly APPLIED: 'applied';
  readonly REPLAYED: 'replayed';
  readonly NULL_COMPENSATION: 'null_compensation';
};

export const DEFAULT_TABLE: 'saga_barrier';

/**
 * The shortest window `prune()` accepts: 7 days, in milliseconds. Longer than the coordinator's
 * retry horizon by default, with days to spare for an operator to resume a parked saga; a
 * shorter window would let a duplicate arriving after the prune apply again.
 */
export const MINIMUM_RETENTION_MS: 604800000;

/**
 * An `ended` for `prune()` that asks the coordinator `client` reaches, one GetSaga per saga: a
 * saga has ended when it is SUCCEEDED or COMPENSATED, or when the coordinator no longer knows it
 * (NOT_FOUND: it prunes only ended sagas; ask the coordinator that calls this participant). Any
 * other error rejects, and `prune()` deletes nothing. A saga parked in NEEDS_ATTENTION keeps its
 * rows, however old, for the Compensate an operator's resume sends later.
 */
export function endedOn(client: SagaClient): (sagaIds: string[]) => Promise<string[]>;

/** What `prune()` deletes. */
export interface PruneOptions {
  /**
   * Delete the rows of calls first seen more than this many milliseconds ago, by the database's
   * clock. At least MINIMUM_RETENTION_MS, and longer than the coordinator can still resend a
   * call (a step's retries, the saga's deadline, an operator resuming a parked saga); a shorter
   * window, or one that is not a positive finite number, is refused (RangeError / TypeError)
   * before the database is touched.
   */
  olderThanMs: number;
  /** Only count the rows that would be deleted. Default false. */
  dryRun?: boolean;
  /**
   * Delete only the old rows of sagas that have ended: called with the saga ids (the
   * `saga_id` column) of old rows, at most 500 at a time and outside any write transaction,
   * it returns those whose sagas have ended. Ids it returns that are not among the old rows'
   * are ignored. Every chunk is asked before anything is deleted: if it throws, nothing is
   * deleted and `prune()` rejects with its error.
   */
  ended?: (sagaIds: string[]) => Iterable<string> | Promise<Iterable<string>>;
}

/** Identifies one call: the saga, the step, the operation and its request_id. */
export class BarrierKey {
  constructor(fields: {
    sagaId: string;
    step: string;
    operation: Operation;
    requestId: string;
    /** Required for a Compensate: the request_id of the Execute it undoes. */
    executeRequestId?: string;
  });
  readonly sagaId: string;
  readonly step: string;
  readonly operation: Operation;
  readonly requestId: string;
  readonly executeRequestId: string;
  static forExecute(request: ExecuteRequest): BarrierKey;
  static forCompensate(request: CompensateRequest): BarrierKey;
  executeKey(): BarrierKey;
  params(): [string, string, string, string];
}

/** The barrier's successful answer. A refusal is thrown (Rejected, PermanentFailure). */
export interface Outcome {
  readonly output: Buffer;
  readonly kind: OutcomeKind;
}

/** A synchronous business effect: writes through `db`, returns the output bytes. */
export type BarrierEffect = (db: BetterSqlite3.Database) => Uint8Array | null | undefined;

/**
 * What a Participant needs of a barrier. `Db` is what effects receive (a better-sqlite3
 * Database, a pg PoolClient); `asyncEffects` says whether an effect may return a promise.
 */
export interface Barrier<Db = any> {
  readonly asyncEffects?: boolean;
  run(
    key: BarrierKey,
    prepare: () => ((db: Db) => unknown) | Promise<(db: Db) => unknown>,
  ): Promise<Outcome>;
}

export interface SqliteBarrierOptions {
  /** Table name, a plain SQL identifier. Default "saga_barrier". */
  table?: string;
  /** How long to wait for another connection's write lock. Default 30 000. */
  timeoutMs?: number;
  /** PRAGMA synchronous for a file the barrier opens: OFF, NORMAL, FULL (default), EXTRA. */
  synchronous?: 'OFF' | 'NORMAL' | 'FULL' | 'EXTRA';
}

/**
 * The idempotency barrier in a SQLite database (better-sqlite3), in the same transaction as the
 * business writes. Same table layout as the Python SDK's SqliteBarrier.
 */
export class SqliteBarrier implements Barrier<BetterSqlite3.Database> {
  constructor(database: string | BetterSqlite3.Database, options?: SqliteBarrierOptions);
  /** The handle effects receive; create and read the business tables through it. */
  readonly db: BetterSqlite3.Database;
  readonly table: string;
  /**
   * Apply a call once. `prepare` (async allowed, must change nothing) is called only when the
   * call is new and returns the synchronous effect run in the barrier's transaction.
   */
  run(key: BarrierKey, prepare: () => BarrierEffect | Promise<BarrierEffect>): Promise<Outcome>;
  /** Apply a synchronous effect once, in one transaction with the barrier row. */
  runSync(key: BarrierKey, effect: BarrierEffect): Outcome;
  /** The stored answer of a call, or null. */
  lookup(key: BarrierKey): {
    state: 'done' | 'rejected' | 'blocked' | 'failed';
    output: Buffer | null;
    reason: string;
    message: string;
  } | null;
  /**
   * Delete the rows of calls first seen more than `olderThanMs` ago (only those of ended sagas,
   * with `ended`); resolves to how many were deleted, or with `dryRun` would be. Rejects a
   * window shorter than MINIMUM_RETENTION_MS.
   */
  prune(options: PruneOptions): Promise<number>;
  /** Close the database, when the barrier opened it. */
  close(): void;
}

// --- participant -------------------------------------------------------------------------------

/** An ExecuteRequest as decoded from the wire (the .proto's field names). */
export interface ExecuteRequest {
  saga: string;
  definition: string;
  definition_version: number;
  step: string;
  action: string;
  request_id: string;
  attempt: number;
  input: Buffer;
  previous_outputs: Record<string, Buffer>;
}

/** A CompensateRequest as decoded from the wire. */
export interface CompensateRequest {
  saga: string;
  definition: string;
  definition_version: number;
  step: string;
  action: string;
  request_id: string;
  attempt: number;
  input: Buffer;
  execute_output?: Buffer;
  execute_request_id: string;
}

interface CallContext<Payload> {
  /** Name of the participant answering. */
  readonly participant: string;
  /** Resource name, "sagas/{saga_id}". */
  readonly saga: string;
  readonly sagaId: string;
  readonly definition: string;
  readonly definitionVersion: number;
  readonly step: string;
  readonly action: string;
  /** Identical on every retry of this call. */
  readonly requestId: string;
  /** From 1. */
  readonly attempt: number;
  /** The saga's input: decoded JSON (null when empty), or a Buffer for a raw handler. */
  readonly input: Payload;
  /** The call's gRPC metadata (string values), e.g. traceparent. */
  readonly metadata: Readonly<Record<string, string>>;
}

/** What an action handler is given about the Execute it answers. */
export interface ExecuteContext<Payload = any> extends CallContext<Payload> {
  /** Outputs of the earlier steps: decoded JSON (a Buffer when not JSON), or Buffers when raw. */
  readonly previousOutputs: Readonly<Record<string, Payload | Buffer>>;
}

/** What a compensation handler is given about the Compensate it answers. */
export interface CompensateContext<Payload = any> extends CallContext<Payload> {
  /** request_id of the Execute being compensated. */
  readonly executeRequestId: string;
  /** This step's Execute output (decoded, or a Buffer when raw); null when there was none. */
  readonly executeOutput: Payload | null;
}

/**
 * The effect a handler may return: run inside the barrier's transaction with its database
 * handle (null without a barrier); its return value is the output. Synchronous on SQLite; on
 * PostgreSQL (`Db` a pg PoolClient) it may be async.
 */
export type Effect<Out = Output, Db = BetterSqlite3.Database> = (db: Db) => Out;

/** A handler's output: JSON-serialisable, or a Buffer for a raw handler; nothing is empty. */
export type Output = string | number | boolean | null | undefined | void | object;

/** What a handler returns: the output, or the Effect that writes and returns it. */
export type HandlerResult<Db = BetterSqlite3.Database> = Effect<Output, Db> | Output;

/**
 * An action handler: returns the output (JSON-serialisable, or a Buffer when raw), or an
 * Effect returning it. Throw Rejected for a business "no", RetryLater to be retried after a
 * delay, PermanentFailure for a request that can never succeed.
 */
export type ActionHandler<Payload = any, Db = BetterSqlite3.Database> = (
  ctx: ExecuteContext<Payload>,
) => HandlerResult<Db> | Promise<HandlerResult<Db>>;

/** A compensation handler: its return value (or its Effect's) is ignored. */
export type CompensationHandler<Payload = any, Db = BetterSqlite3.Database> = (
  ctx: CompensateContext<Payload>,
) => HandlerResult<Db> | Promise<HandlerResult<Db>>;

export interface Logger {
  info(...args: unknown[]): void;
  error(...args: unknown[]): void;
  /** Warnings (serving plaintext on a non-loopback address); `info` when absent. */
  warn?(...args: unknown[]): void;
}

export interface ParticipantOptions<Db = BetterSqlite3.Database> {
  /** Makes every handler idempotent and hang-free; e.g. new SqliteBarrier(path). */
  barrier?: Barrier<Db> | null;
  /** Directory holding saga/v1/*.proto. */
  protosDir?: string;
  /** Where serving notes and handler failures go. Default console. */
  logger?: Logger;
}

/** What a participant serves TLS with, in PEM (Buffers, or strings). */
export interface ServerTls {
  /** The participant's certificate, then any intermediate CAs'. */
  certChain: Buffer | string;
  /** The certificate's private key, unencrypted. */
  privateKey: Buffer | string;
  /**
   * CA certificates that callers' certificates must be signed by: set, a caller without one is
   * refused in the handshake and no handler runs (mTLS). Omitted: callers need no certificate.
   */
  clientCa?: Buffer | string | null;
}

export interface StartOptions {
  /** Serve TLS (mTLS with `clientCa`). Neither this nor `credentials`: plaintext, for loopback. */
  tls?: ServerTls;
  /** Any grpc-js server credentials, instead of `tls`. */
  credentials?: grpc.ServerCredentials;
  serverOptions?: grpc.ServerOptions;
}

export const SERVICE_NAME: 'saga.v1.ParticipantService';

/**
 * A domain service's side of the saga contract, built from handlers. `Db` is what the barrier
 * hands effects: a better-sqlite3 Database (SqliteBarrier, the default) or a pg PoolClient
 * (PostgresBarrier from '@saga-coordinator/sdk/postgres').
 */
export class Participant<Db = BetterSqlite3.Database> {
  constructor(name: string, options?: ParticipantOptions<Db>);
  /** Server credentials for `tls`, for a server of your own (see addToServer). */
  static serverCredentials(tls: ServerTls): grpc.ServerCredentials;
  readonly name: string;
  readonly barrier: Barrier<Db> | null;
  /** Register the handler of an Execute action; `raw` passes bytes instead of JSON. */
  action(name: string, handler: ActionHandler<any, Db>, options?: { raw?: false }): this;
  action(name: string, handler: ActionHandler<Buffer, Db>, options: { raw: true }): this;
  /** Register the handler of a compensation action. */
  compensation(
    name: string,
    handler: CompensationHandler<any, Db>,
    options?: { raw?: false },
  ): this;
  compensation(name: string, handler: CompensationHandler<Buffer, Db>, options: { raw: true }): this;
  /**
   * Answer one call as the served service would, without a network: resolves the response
   * ({output} for an Execute, {} for a Compensate) or rejects with the grpc-js status error.
   */
  handle(operation: 'Execute', request: ExecuteRequest, metadata?: grpc.Metadata): Promise<{ output: Buffer }>;
  handle(
    operation: 'Compensate',
    request: CompensateRequest,
    metadata?: grpc.Metadata,
  ): Promise<Record<string, never>>;
  /** Mount ParticipantService and grpc.health.v1.Health on a server of your own. */
  addToServer(server: grpc.Server): void;
  /** Serve on "host:port" (port 0 picks one); resolves to the bound port. */
  start(address?: string, options?: StartOptions): Promise<number>;
  /** NOT_SERVING, refuse new calls, let running ones finish for graceMs, then cancel them. */
  stop(options?: { graceMs?: number }): Promise<void>;
  /** start(), then stop() on SIGTERM or SIGINT; resolves once stopped. */
  serve(
    address: string,
    options?: StartOptions & { graceMs?: number; onListening?: (port: number) => void },
  ): Promise<void>;
}

// --- contract and wire helpers -----------------------------------------------------------------

export const LOADER_OPTIONS: Readonly<Record<string, unknown>>;
/** $SAGA_PROTOS_DIR, else the copy of the contract shipped inside the package. */
export function defaultProtosDir(): string;

export interface Contract {
  readonly protosDir: string;
  readonly definition: PackageDefinition;
  readonly participantService: ServiceDefinition;
  readonly coordinatorService: ServiceDefinition;
  readonly healthService: ServiceDefinition;
  readonly ParticipantClient: grpc.ServiceClientConstructor;
  readonly CoordinatorClient: grpc.ServiceClientConstructor;
  readonly HealthClient: grpc.ServiceClientConstructor;
}
/** Load saga.v1 (once per directory) with @grpc/proto-loader. */
export function loadContract(protosDir?: string): Contract;

export const STATUS_DETAILS_KEY: 'grpc-status-details-bin';

export interface RichStatus {
  code: number;
  message: string;
  errorInfo?: { reason: string; domain?: string; metadata?: Record<string, string> } | null;
  fieldViolations?: FieldViolation[];
  retryDelayMs?: number | null;
}
/** Serialize a google.rpc.Status with ErrorInfo, BadRequest and RetryInfo details. */
export function encodeStatus(status: RichStatus): Buffer;
/** Parse a serialized google.rpc.Status; null when the bytes are not one. */
export function decodeStatus(bytes: Uint8Array): Required<RichStatus> | null;
/** A grpc-js error answer carrying the rich status in its trailing metadata. */
export function statusError(
  code: number,
  message: string,
  extra?: Omit<RichStatus, 'code' | 'message'>,
): { code: number; details: string; metadata: grpc.Metadata };

/** The standard gRPC health service, as mounted by Participant. */
export class HealthService {
  constructor(statuses?: Record<string, 'SERVING' | 'NOT_SERVING'>);
  setStatus(service: string, status: 'SERVING' | 'NOT_SERVING'): void;
  enterGracefulShutdown(): void;
  handlers(): grpc.UntypedServiceImplementation;
}
