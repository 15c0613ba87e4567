// The participant helper: serves saga.v1.ParticipantService from registered action handlers.
//
//   const participant = new Participant('accounts', { barrier: new SqliteBarrier('accounts.db') });
//   participant.action('OpenAccount', async (ctx) => (db) => {
//     db.prepare('INSERT INTO accounts (id, owner) VALUES (?, ?)').run(ctx.sagaId, ctx.input.owner);
//     return { account_id: ctx.sagaId };
//   });
//   participant.compensation('CloseAccount', async (ctx) => (db) => { ... });
//   await participant.serve('0.0.0.0:50062', {
//     tls: {
//       certChain: fs.readFileSync('accounts.pem'),
//       privateKey: fs.readFileSync('accounts.key'),
//       clientCa: fs.readFileSync('coordinator-ca.pem'), // optional: require callers' certificates
//     },
//   });
//
// A handler gets a context (saga, step, request_id, decoded input...) and returns the output,
// or, to write to the barrier's database, a function `(db) => output` that the barrier runs
// inside its transaction (synchronous on SQLite, see barrier.js for why the split; it may be
// async on PostgreSQL, see postgres.js). With a barrier the handler is only called when the
// call must be applied: duplicates, null compensations and late Executes are answered by the
// barrier.
//
// How answers map to the contract (DESIGN.md's table "How a participant's answer is read"):
//   the handler returns                  -> OK, with its value as the output (JSON, or bytes)
//   it throws Rejected(reason)           -> FAILED_PRECONDITION + ErrorInfo(reason, domain):
//                                           a business "no", not retried, the saga compensates
//   it throws RetryLater(msg, {retryAfterMs}) -> UNAVAILABLE + RetryInfo + ErrorInfo: transient,
//                                           retried no sooner than retryAfterMs
//   it throws PermanentFailure(msg)      -> INVALID_ARGUMENT + ErrorInfo: the step fails, no retry
//   no handler for the action            -> UNIMPLEMENTED (the step fails, no retry)
//   the payload is not JSON              -> INVALID_ARGUMENT + BadRequest (the step fails)
//   any other exception                  -> INTERNAL, logged (transient: the coordinator retries)
//
// Serving is plaintext by default, for development on loopback. `tls` serves TLS; with its
// `clientCa` a caller without a certificate signed by that CA is refused in the handshake, so
// no handler runs for it (mTLS: only the coordinator gets through).

import grpc from '@grpc/grpc-js';
import { loadContract } from './contract.js';
import { BarrierKey } from './barrier.js';
import { PermanentFailure, Rejected, RetryLater } from './errors.js';
import { HealthService, SERVING } from './health.js';
import { decodeJson, encodePayload } from './payload.js';
import { CERTIFICATE, PRIVATE_KEY, pem } from './pem.js';
import { CODE_NAMES, statusError } from './rich_status.js';
import { inParticipantSpan, recordOutcome } from './telemetry.js';

export const SERVICE_NAME = 'saga.v1.ParticipantService';

/** A payload that a JSON handler cannot decode. */
class BadPayload extends Error {
  constructor(field, cause) {
    super(`${field} is not UTF-8 JSON: ${cause.message}`);
    this.field = field;
  }
}

function decodeField(payload, field) {
  try {
    return decodeJson(payload);
  } catch (error) {
    throw new BadPayload(field, error);
  }
}

// Earlier steps may belong to participants that send raw bytes; this step did not choose their
// format, so an output that is not JSON is passed on as a Buffer rather than refused.
function decodeLeniently(payload) {
  try {
    return decodeJson(payload);
  } catch {
    return payload;
  }
}

function isThenable(value) {
  return value !== null && typeof value === 'object' && typeof value.then === 'function';
}

function metadataObject(metadata) {
  const out = {};
  for (const [key, value] of Object.entries(metadata?.getMap?.() ?? {})) {
    if (typeof value === 'string') out[key] = value;
  }
  return Object.freeze(out);
}

/**
 * What a participant serves TLS with, in PEM.
 *
 * @typedef {{certChain: Buffer | string, privateKey: Buffer | string,
 *   clientCa?: Buffer | string | null}} ServerTls
 */

function isLoopback(address) {
  const host = address.slice(0, address.lastIndexOf(':')).replace(/^\[|\]$/g, '');
  return (
    address.startsWith('unix:') ||
    host === 'localhost' ||
    host === '::1' ||
    /^127\.\d+\.\d+\.\d+$/.test(host)
  );
}

function stripSagaName(saga) {
  return saga.startsWith('sagas/') ? saga.slice('sagas/'.length) : saga;
}

class Handler {
  constructor(kind, name, fn, raw) {
    this.kind = kind;
    this.name = name;
    this.fn = fn;
    this.raw = raw;
  }

  encode(value) {
    if (this.kind === 'compensation') return Buffer.alloc(0);
    if (!this.raw) return encodePayload(value);
    if (value === null || value === undefined) return Buffer.alloc(0);
    if (value instanceof Uint8Array) return Buffer.from(value);
    throw new TypeError(`raw ${this.kind} '${this.name}' must return a Buffer, not ${typeof value}`);
  }

  // The effect the barrier runs in its transaction: the handler's function applied to the db,
  // or its plain value. A barrier whose transaction can span an await (asyncEffects) lets the
  // function be async; SQLite's cannot.
  effect(result, asyncEffects) {
    return (db) => {
      const value = typeof result === 'function' ? result(db) : result;
      if (isThenable(value)) {
        if (asyncEffects) return value.then((resolved) => this.encode(resolved));
        throw new TypeError(
          `the function returned by ${this.kind} '${this.name}' returned a promise: with a ` +
            'barrier it runs inside a SQLite transaction and must be synchronous',
        );
      }
      return this.encode(value);
    };
  }
}

/**
 * A domain service's side of the saga contract, built from handlers.
 *
 * `name` identifies the participant in logs and is the `domain` of its ErrorInfos. `barrier`
 * (e.g. `new SqliteBarrier(path)`) makes every handler idempotent and hang-free by running its
 * effect in the barrier's transaction; without one, handlers must dedupe on ctx.requestId.
 */
export class Participant {
  #actions = new Map();
  #compensations = new Map();
  #server = null;
  #health = null;
  #contract;
  #logger;

  /**
   * @param {string} name
   * @param {{barrier?: object | null, protosDir?: string, logger?: {info: Function, error: Function}}} [options]
   */
  constructor(name, { barrier = null, protosDir, logger = console } = {}) {
    if (!name) throw new TypeError('a participant needs a name');
    this.name = name;
    this.barrier = barrier;
    this.#contract = loadContract(protosDir);
    this.#logger = logger;
  }

  /**
   * Register the handler of the Execute action `name`. With `raw: true` the handler gets the
   * input and previous outputs as Buffers and returns a Buffer; otherwise they are decoded from
   * JSON and the output is encoded as JSON. Returns the participant, for chaining.
   */
  action(name, handler, { raw = false } = {}) {
    this.#register(this.#actions, 'action', name, handler, raw);
    return this;
  }

  /** Register the handler of the compensation action `name`; its return value is ignored. */
  compensation(name, handler, { raw = false } = {}) {
    this.#register(this.#compensations, 'compensation', name, handler, raw);
    return this;
  }

  #register(table, kind, name, handler, raw) {
    if (!name) throw new TypeError(`an ${kind} needs a name`);
    if (typeof handler !== 'function') throw new TypeError(`${kind} '${name}' needs a function`);
    if (table.has(name)) throw new Error(`${kind} '${name}' is registered twice`);
    table.set(name, new Handler(kind, name, handler, raw));
  }

  // --- serving -------------------------------------------------------------------------------

  /**
   * Server credentials serving TLS with `certChain` and `privateKey` (PEM), and, given
   * `clientCa`, requiring every caller to present a certificate signed by it (mTLS). For a
   * server of your own (see addToServer); start() and serve() take `{tls}` directly.
   *
   * @param {ServerTls} tls
   */
  static serverCredentials(tls) {
    if (tls === null || typeof tls !== 'object') {
      throw new TypeError('tls must be {certChain, privateKey, clientCa?}');
    }
    const { certChain, privateKey, clientCa = null } = tls;
    const pair = {
      cert_chain: pem(certChain, 'certChain', CERTIFICATE),
      private_key: pem(privateKey, 'privateKey', PRIVATE_KEY),
    };
    const roots = clientCa == null ? null : pem(clientCa, 'clientCa', CERTIFICATE);
    return grpc.ServerCredentials.createSsl(roots, [pair], roots !== null);
  }

  /** Mount the ParticipantService and the standard gRPC health service on a grpc-js server. */
  addToServer(server) {
    this.#health = new HealthService({ '': SERVING, [SERVICE_NAME]: SERVING });
    server.addService(this.#contract.participantService, {
      Execute: (call, callback) => this.#unary(call, callback, 'Execute'),
      Compensate: (call, callback) => this.#unary(call, callback, 'Compensate'),
    });
    server.addService(this.#contract.healthService, this.#health.handlers());
  }

  /**
   * Serve on `address` ("host:port"; port 0 picks a free one) and return the bound port.
   * `tls` serves TLS (see serverCredentials); `credentials` takes any grpc-js server
   * credentials instead. Neither: plaintext, meant for loopback (a note is logged otherwise).
   *
   * @param {string} [address]
   * @param {{tls?: ServerTls, credentials?: grpc.ServerCredentials, serverOptions?: object}} [options]
   */
  async start(address = '127.0.0.1:0', { tls, credentials, serverOptions } = {}) {
    if (this.#server) throw new Error(`participant '${this.name}' is already serving`);
    if (tls && credentials) throw new TypeError('pass tls or credentials, not both');
    if (tls) credentials = Participant.serverCredentials(tls);
    if (!credentials && !isLoopback(address)) {
      const warn = this.#logger.warn ?? this.#logger.info;
      warn.call(
        this.#logger,
        `participant ${this.name} serves plaintext on ${address}: anyone who reaches it can ` +
          'call it unencrypted; pass {tls} to serve TLS',
      );
    }
    const server = new grpc.Server(serverOptions);
    this.addToServer(server);
    try {
      const port = await new Promise((resolve, reject) => {
        server.bindAsync(
          address,
          credentials ?? grpc.ServerCredentials.createInsecure(),
          (error, bound) => (error ? reject(error) : resolve(bound)),
        );
      });
      this.#server = server;
      return port;
    } catch (error) {
      server.forceShutdown();
      throw error;
    }
  }

  /**
   * Stop serving: report NOT_SERVING, refuse new calls, let running ones finish for `graceMs`
   * milliseconds, then cancel what is left.
   */
  async stop({ graceMs = 5000 } = {}) {
    const server = this.#server;
    this.#server = null;
    if (!server) return;
    this.#health?.enterGracefulShutdown();
    await new Promise((resolve) => {
      const timer = setTimeout(() => {
        server.forceShutdown();
        resolve();
      }, graceMs);
      server.tryShutdown(() => {
        clearTimeout(timer);
        resolve();
      });
    });
  }

  /**
   * Serve on `address` until SIGTERM or SIGINT, then stop gracefully. Resolves once stopped.
   *
   * @param {string} address
   * @param {{graceMs?: number, onListening?: (port: number) => void}} [options]
   */
  async serve(address, { graceMs = 5000, onListening, ...startOptions } = {}) {
    const port = await this.start(address, startOptions);
    this.#logger.info(`participant ${this.name} serving on port ${port}`);
    onListening?.(port);
    await new Promise((resolve) => {
      const stop = (signal) => {
        process.off('SIGTERM', stop);
        process.off('SIGINT', stop);
        this.#logger.info(`participant ${this.name} stopping on ${signal}`);
        resolve();
      };
      process.on('SIGTERM', stop);
      process.on('SIGINT', stop);
    });
    await this.stop({ graceMs });
  }

  // --- dispatch ------------------------------------------------------------------------------

  /**
   * Answer one call as the served ParticipantService would, without a network: resolves the
   * response (`{output}` for an Execute, `{}` for a Compensate) or rejects with the grpc-js
   * status error (`{code, details, metadata}`, the rich status in its metadata) the server
   * would send. `request` is decoded as the contract loads it (the .proto's field names,
   * Buffers for bytes). The test kit (`@saga-coordinator/sdk/testing`) calls handlers this way.
   *
   * @param {'Execute' | 'Compensate'} operation
   * @param {object} request
   * @param {grpc.Metadata} [metadata]
   */
  handle(operation, request, metadata = new grpc.Metadata()) {
    if (operation === 'Execute') return this.#execute(request, metadata);
    if (operation === 'Compensate') return this.#compensate(request, metadata);
    return Promise.reject(
      new TypeError(`operation is 'Execute' or 'Compensate', not ${JSON.stringify(operation)}`),
    );
  }

  #unary(call, callback, operation) {
    this.handle(operation, call.request, call.metadata).then(
      (response) => callback(null, response),
      (error) => callback(error),
    );
  }

  #execute(request, metadata) {
    return this.#answer('Execute', request, metadata, async () => {
      const handler = this.#actions.get(request.action);
      if (!handler) return this.#unimplemented('action', request.action, this.#actions);
      const raw = handler.raw;
      const previousOutputs = {};
      for (const [step, output] of Object.entries(request.previous_outputs ?? {})) {
        previousOutputs[step] = raw ? output : decodeLeniently(output);
      }
      const ctx = Object.freeze({
        participant: this.name,
        saga: request.saga,
        sagaId: stripSagaName(request.saga),
        definition: request.definition,
        definitionVersion: request.definition_version,
        step: request.step,
        action: request.action,
        requestId: request.request_id,
        attempt: request.attempt,
        input: raw ? request.input : decodeField(request.input, 'input'),
        previousOutputs: Object.freeze(previousOutputs),
        metadata: metadataObject(metadata),
      });
      const outcome = await this.#invoke(handler, ctx, () => BarrierKey.forExecute(request));
      return { response: { output: outcome.output }, outcome: outcome.kind };
    });
  }

  #compensate(request, metadata) {
    return this.#answer('Compensate', request, metadata, async () => {
      const handler = this.#compensations.get(request.action);
      if (!handler) {
        return this.#unimplemented('compensation', request.action, this.#compensations);
      }
      if (this.barrier && !request.execute_request_id) {
        throw statusError(
          grpc.status.INVALID_ARGUMENT,
          'execute_request_id is required to compensate through the barrier',
          {
            errorInfo: { reason: 'INVALID_ARGUMENT', domain: this.name },
            fieldViolations: [{ field: 'execute_request_id', description: 'must not be empty' }],
          },
        );
      }
      const raw = handler.raw;
      const hasOutput = request._execute_output === 'execute_output';
      const output = hasOutput ? request.execute_output : null;
      const ctx = Object.freeze({
        participant: this.name,
        saga: request.saga,
        sagaId: stripSagaName(request.saga),
        definition: request.definition,
        definitionVersion: request.definition_version,
        step: request.step,
        action: request.action,
        requestId: request.request_id,
        executeRequestId: request.execute_request_id,
        attempt: request.attempt,
        input: raw ? request.input : decodeField(request.input, 'input'),
        executeOutput: raw || output === null ? output : decodeField(output, 'execute_output'),
        metadata: metadataObject(metadata),
      });
      const outcome = await this.#invoke(handler, ctx, () => BarrierKey.forCompensate(request));
      return { response: {}, outcome: outcome.kind };
    });
  }

  async #invoke(handler, ctx, makeKey) {
    if (!this.barrier) {
      const result = await handler.fn(ctx);
      let value = typeof result === 'function' ? result(null) : result;
      if (isThenable(value)) value = await value;
      return { output: handler.encode(value), kind: 'applied' };
    }
    const asyncEffects = this.barrier.asyncEffects === true;
    return this.barrier.run(makeKey(), async () =>
      handler.effect(await handler.fn(ctx), asyncEffects),
    );
  }

  // Run one call in its span and turn its outcome into a response or a status error.
  #answer(operation, request, metadata, call) {
    return inParticipantSpan(
      { participant: this.name, operation, request, metadata },
      async (span) => {
        const where = { saga: request.saga, step: request.step, request_id: request.request_id };
        try {
          const { response, outcome } = await call();
          recordOutcome(span, outcome);
          return response;
        } catch (error) {
          if (error instanceof Rejected) {
            recordOutcome(span, 'rejected', { reason: error.reason });
            throw statusError(grpc.status.FAILED_PRECONDITION, error.message, {
              errorInfo: { reason: error.reason, domain: this.name, metadata: where },
            });
          }
          if (error instanceof RetryLater) {
            recordOutcome(span, 'retry_later', { reason: error.reason });
            throw statusError(grpc.status.UNAVAILABLE, error.message, {
              errorInfo: { reason: error.reason, domain: this.name, metadata: where },
              retryDelayMs: error.retryAfterMs,
            });
          }
          if (error instanceof PermanentFailure) {
            recordOutcome(span, 'failed_permanently', { reason: error.reason });
            throw statusError(grpc.status.INVALID_ARGUMENT, error.message, {
              errorInfo: { reason: error.reason, domain: this.name, metadata: where },
            });
          }
          if (error instanceof BadPayload) {
            recordOutcome(span, 'invalid', { reason: 'INVALID_PAYLOAD' });
            throw statusError(grpc.status.INVALID_ARGUMENT, error.message, {
              errorInfo: { reason: 'INVALID_PAYLOAD', domain: this.name, metadata: where },
              fieldViolations: [{ field: error.field, description: 'must be UTF-8 JSON' }],
            });
          }
          if (error && typeof error.code === 'number' && error.metadata instanceof grpc.Metadata) {
            recordOutcome(span, 'refused', { reason: CODE_NAMES[error.code] ?? '' });
            throw error; // a status this module built (unimplemented, invalid argument)
          }
          this.#logger.error(
            `participant ${this.name}: ${operation} '${request.action}' of ${request.saga} ` +
              `step ${request.step} failed:`,
            error,
          );
          recordOutcome(span, 'failed', { reason: 'HANDLER_FAILED', error });
          const name = error?.name ?? typeof error;
          throw statusError(
            grpc.status.INTERNAL,
            `${operation} '${request.action}' failed: ${name}: ${error?.message ?? error}`,
            { errorInfo: { reason: 'HANDLER_FAILED', domain: this.name, metadata: where } },
          );
        }
      },
    );
  }

  #unimplemented(kind, name, table) {
    const known = [...table.keys()].sort().join(', ');
    throw statusError(
      grpc.status.UNIMPLEMENTED,
      `participant '${this.name}' has no ${kind} '${name}' (it has: ${known})`,
      { errorInfo: { reason: 'UNKNOWN_ACTION', domain: this.name, metadata: { [kind]: name } } },
    );
  }
}
