// The client of the coordinator's CoordinatorService: create, get, list, cancel, watch, wait.
//
//   const client = new SagaClient('localhost:50051');
//   const { saga } = await client.create('onboard-client', { name: 'ACME' }, { sagaId: 'acme-1' });
//   const done = await client.wait(saga.sagaId, { timeoutMs: 60_000 });
//
// A secured coordinator: `new SagaClient(target, { tls: { ca, certChain, privateKey }, token })`,
// or `SagaClient.fromEnvironment()` (SAGA_TARGET, SAGA_TLS_*, SAGA_TOKEN(_FILE); see
// connection.js).
//
// Every failed call throws a SagaRpcError carrying the status code and the rich
// google.rpc.Status details (ErrorInfo reason, BadRequest field violations).

import { setTimeout as sleep } from 'node:timers/promises';
import grpc from '@grpc/grpc-js';
import { bearer, clientCredentials, connectionFromEnvironment } from './connection.js';
import { loadContract } from './contract.js';
import { WaitTimeout, errorFromGrpc } from './errors.js';
import {
  SagaState,
  changeFromProto,
  eventFromProto,
  sagaFromProto,
  settledSagaFromResponse,
  updateFromProto,
} from './model.js';
import { encodePayload } from './payload.js';
import { injectTraceContext } from './telemetry.js';

/** Deadline of each unary call, in milliseconds, unless the client is given another. */
export const DEFAULT_TIMEOUT_MS = 30_000;

const SAGA_NAME_PREFIX = 'sagas/';

/** The resource name of a saga, "sagas/{saga_id}", from its plain id. */
export function sagaName(sagaId) {
  if (typeof sagaId !== 'string' || sagaId === '') {
    throw new TypeError('saga id must be a non-empty string');
  }
  if (sagaId.includes('/')) {
    throw new TypeError(`pass the plain saga id, not a resource name: ${JSON.stringify(sagaId)}`);
  }
  return SAGA_NAME_PREFIX + sagaId;
}

/**
 * Milliseconds to pause before re-watching after the `attempt`-th broken stream (from 1):
 * 50, 100, 200 ... up to 2000, so that a coordinator restart is noticed quickly without
 * hammering one that stays down.
 */
export function rewatchDelayMs(attempt) {
  return Math.min(2000, 50 * 2 ** Math.max(0, attempt - 1));
}

function checkPageSize(pageSize) {
  if (!Number.isInteger(pageSize) || pageSize < 1 || pageSize > 1000) {
    throw new TypeError('pageSize must be from 1 to 1000');
  }
}

function stateFilter(state) {
  const name = String(state).replace(/^SAGA_STATE_/, '');
  if (!Object.hasOwn(SagaState, name) || name === SagaState.UNSPECIFIED) {
    throw new TypeError(`not a saga state to filter on: ${JSON.stringify(state)}`);
  }
  return `SAGA_STATE_${name}`;
}

// A stream's errors are read through its async iterator; this listener keeps a late error (the
// CANCELLED that follows cancel()) from being an unhandled 'error' event.
function ignoreLateErrors() {}

/**
 * A client of the coordinator's CoordinatorService.
 *
 * `tls` dials TLS (`ca` to trust the coordinator by, `certChain` and `privateKey` for mTLS,
 * `serverName` when its certificate names another host than `target`); `credentials` takes any
 * grpc-js channel credentials instead; with neither the channel is plaintext. `token` is sent as
 * `authorization: Bearer <token>` with every call, streams and their reconnections included: a
 * string, or a function returning one (or a Promise of one), asked before each call.
 * `timeoutMs` is the deadline of each unary call (null: none); `metadata` (an object of string
 * values) is sent with every call, and the active OpenTelemetry trace context is added to it.
 */
export class SagaClient {
  #client;
  #timeoutMs;
  #metadata;
  #authorization;

  /**
   * @param {string} target "host:port"
   * @param {{credentials?: grpc.ChannelCredentials, tls?: import('./connection.js').ClientTls,
   *          token?: string | (() => string | Promise<string>), channelOptions?: object,
   *          timeoutMs?: number | null, metadata?: Record<string, string>,
   *          protosDir?: string}} [options]
   */
  constructor(
    target,
    {
      credentials,
      tls,
      token,
      channelOptions = {},
      timeoutMs = DEFAULT_TIMEOUT_MS,
      metadata = {},
      protosDir,
    } = {},
  ) {
    if (tls != null && credentials != null) throw new TypeError('pass tls or credentials, not both');
    const hasAuthorization = Object.keys(metadata).some((key) => key.toLowerCase() === 'authorization');
    if (token != null && hasAuthorization) {
      throw new TypeError('pass token or an authorization entry in metadata, not both');
    }
    this.#authorization = token == null ? null : bearer(token);
    let options = channelOptions;
    if (tls != null) {
      const secured = clientCredentials(tls);
      credentials = secured.credentials;
      options = { ...channelOptions, ...secured.channelOptions };
    }
    const { CoordinatorClient } = loadContract(protosDir);
    this.#client = new CoordinatorClient(target, credentials ?? grpc.credentials.createInsecure(), options);
    this.#timeoutMs = timeoutMs;
    this.#metadata = { ...metadata };
  }

  /**
   * A client of the coordinator the environment names: SAGA_TARGET, SAGA_TLS_CA, SAGA_TLS_CERT,
   * SAGA_TLS_KEY, SAGA_TLS_SERVER_NAME, SAGA_TLS, SAGA_TOKEN or SAGA_TOKEN_FILE (see
   * connection.js); the other options as the constructor's. Throws a TypeError naming the
   * variable at fault (an unreadable file, a key without its certificate, a malformed token).
   *
   * @param {{env?: Record<string, string | undefined>, channelOptions?: object,
   *          timeoutMs?: number | null, metadata?: Record<string, string>,
   *          protosDir?: string}} [options]
   */
  static fromEnvironment({ env = process.env, ...options } = {}) {
    const { target, tls, token } = connectionFromEnvironment(env);
    return new SagaClient(target, { ...options, tls: tls ?? undefined, token: token ?? undefined });
  }

  /**
   * Start a saga of `definition` and return it once it is stored durably, with `created` false
   * when it existed already. `input` is sent as is when it is a Buffer, empty when null, and as
   * UTF-8 JSON otherwise. With a `sagaId` the call is idempotent: the same request again returns
   * the existing saga; a different request with the same id throws ALREADY_EXISTS.
   * `definitionVersion` 0 means the newest.
   */
  async create(definition, input = null, { sagaId = '', definitionVersion = 0 } = {}) {
    if (!definition) throw new TypeError('definition must not be empty');
    if (!Number.isInteger(definitionVersion) || definitionVersion < 0) {
      throw new TypeError('definitionVersion must be an integer >= 0');
    }
    const response = await this.#unary('CreateSaga', {
      saga_id: sagaId ?? '',
      definition,
      definition_version: definitionVersion,
      input: encodePayload(input),
    });
    return Object.freeze({ saga: sagaFromProto(response.saga), created: response.created });
  }

  /** The saga with this id; NOT_FOUND when there is none. */
  async get(sagaId) {
    const response = await this.#unary('GetSaga', { name: sagaName(sagaId) });
    return sagaFromProto(response.saga);
  }

  /** Cancel a running saga (it compensates); FAILED_PRECONDITION when it cannot be. */
  async cancel(sagaId, reason = '') {
    const response = await this.#unary('CancelSaga', { name: sagaName(sagaId), reason });
    return sagaFromProto(response.saga);
  }

  /**
   * Iterate over every saga matching the filters, oldest first, page after page.
   *
   * @param {{states?: string[], definition?: string, pageSize?: number}} [filters]
   * @returns {AsyncIterableIterator<import('./model.js').Saga>}
   */
  list({ states = [], definition = '', pageSize = 100 } = {}) {
    checkPageSize(pageSize);
    const query = { states: [...states].map(stateFilter), definition: definition ?? '', page_size: pageSize };
    return this.#pages('ListSagas', query, (response) => response.sagas.map(sagaFromProto));
  }

  /**
   * Iterate over a saga's event log, oldest first, page after page: what happened, to which
   * step and attempt, when, and the failure each failed attempt answered. With `newestFirst`
   * the log comes newest event first: why a saga is where it is, without reading it all.
   *
   * @param {string} sagaId
   * @param {{pageSize?: number, newestFirst?: boolean}} [options]
   * @returns {AsyncIterableIterator<import('./model.js').SagaEvent>}
   */
  events(sagaId, { pageSize = 100, newestFirst = false } = {}) {
    checkPageSize(pageSize);
    if (typeof newestFirst !== 'boolean') {
      throw new TypeError(`newestFirst must be a boolean, got ${typeof newestFirst}`);
    }
    const query = { name: sagaName(sagaId), page_size: pageSize, newest_first: newestFirst };
    return this.#pages('ListSagaEvents', query, (response) => response.events.map(eventFromProto));
  }

  /**
   * Every item of a paged listing: `method` is called with `query` and each page's token in
   * turn, and `itemsOf` turns a response into its items.
   */
  #pages(method, query, itemsOf) {
    const unary = (request) => this.#unary(method, request);
    return (async function* pages() {
      let token = '';
      do {
        const response = await unary({ ...query, page_token: token });
        yield* itemsOf(response);
        token = response.next_page_token;
      } while (token);
    })();
  }

  /**
   * Iterate over a saga's states: first the current one, then each change, in order, as
   * {saga, event} (event null on the first). The iteration ends when the saga settles
   * (SUCCEEDED, COMPENSATED or NEEDS_ATTENTION). A broken stream throws; use wait() for a watch
   * that survives coordinator restarts. Leaving the loop early cancels the stream.
   */
  watch(sagaId) {
    const request = { name: sagaName(sagaId) };
    const open = async () => this.#client.WatchSaga(request, await this.#callMetadata());
    return (async function* stream() {
      const call = await open();
      call.on('error', ignoreLateErrors);
      try {
        for await (const response of call) yield updateFromProto(response);
      } catch (error) {
        throw errorFromGrpc(error);
      } finally {
        call.cancel();
      }
    })();
  }

  /**
   * Iterate over the change feed: every change of every saga, in commit order, each with its
   * `position`. Starts after `afterPosition` (0: the oldest kept; `fromNow`: only new changes)
   * and follows new changes unless `follow` is false. Store each change's position once
   * processed and resume after it: nothing is missed, and a change seen twice after a
   * reconnect has the same position. A stream broken with UNAVAILABLE (a restart) or
   * RESOURCE_EXHAUSTED (this consumer was too slow) is reopened from the last position.
   * `states` are SagaState names (any case); aborting `signal` ends the iteration at once, even
   * while it waits for the next change.
   */
  changes({
    afterPosition = 0,
    fromNow = false,
    definition = '',
    states = [],
    labels = {},
    follow = true,
    signal = undefined,
  } = {}) {
    const request = {
      after_position: afterPosition,
      from_now: fromNow,
      definition,
      states: states.map((state) => `SAGA_STATE_${stateName(state)}`),
      labels,
      no_follow: !follow,
    };
    const client = this.#client;
    const metadata = () => this.#callMetadata();
    return (async function* stream() {
      for (let broken = 1; !signal?.aborted; broken += 1) {
        const call = client.WatchChanges(request, await metadata());
        call.on('error', ignoreLateErrors);
        const abort = () => call.cancel();
        signal?.addEventListener('abort', abort, { once: true });
        try {
          for await (const response of call) {
            for (const change of response.changes) yield changeFromProto(change);
            request.after_position = Number(response.position);
            request.from_now = false;
            broken = 0;
          }
          return;
        } catch (error) {
          if (signal?.aborted) return;
          const resumable = [grpc.status.UNAVAILABLE, grpc.status.RESOURCE_EXHAUSTED];
          if (!resumable.includes(error?.code)) throw errorFromGrpc(error);
        } finally {
          signal?.removeEventListener('abort', abort);
          call.cancel();
        }
        await sleep(rewatchDelayMs(Math.max(broken, 1)), undefined, { signal }).catch(() => {});
      }
    })();
  }

  /**
   * Wait until the saga is SUCCEEDED, COMPENSATED or NEEDS_ATTENTION, and return it. Throws
   * WaitTimeout after `timeoutMs` (null: wait for as long as it takes). The watch asks for the
   * ending only (one message, once the saga settles); when the stream breaks with UNAVAILABLE
   * (e.g. the coordinator restarts) the saga is watched again after a short, growing pause.
   */
  async wait(sagaId, { timeoutMs = null } = {}) {
    const request = { name: sagaName(sagaId), ending_only: true };
    const deadline = timeoutMs === null || timeoutMs === undefined ? null : Date.now() + timeoutMs;
    for (let broken = 1; ; broken += 1) {
      if (deadline !== null && deadline - Date.now() <= 0) throw new WaitTimeout(sagaId, timeoutMs);
      const call = this.#client.WatchSaga(
        request,
        await this.#callMetadata(),
        deadline === null ? {} : { deadline },
      );
      call.on('error', ignoreLateErrors);
      try {
        for await (const response of call) {
          const saga = settledSagaFromResponse(response);
          if (saga !== null) return saga;
        }
      } catch (error) {
        if (error?.code === grpc.status.DEADLINE_EXCEEDED && deadline !== null) {
          throw new WaitTimeout(sagaId, timeoutMs);
        }
        if (error?.code !== grpc.status.UNAVAILABLE) throw errorFromGrpc(error);
      } finally {
        call.cancel();
      }
      // The stream broke, or ended before the saga settled: watch again.
      const pause = rewatchDelayMs(broken);
      await sleep(deadline === null ? pause : Math.max(0, Math.min(pause, deadline - Date.now())));
    }
  }

  /** Close the channel. */
  close() {
    this.#client.close();
  }

  async #callMetadata() {
    const metadata = new grpc.Metadata();
    for (const [key, value] of Object.entries(this.#metadata)) metadata.set(key, value);
    if (this.#authorization !== null) metadata.set('authorization', await this.#authorization());
    return injectTraceContext(metadata);
  }

  async #unary(method, request) {
    const metadata = await this.#callMetadata();
    return new Promise((resolve, reject) => {
      const options = this.#timeoutMs === null ? {} : { deadline: Date.now() + this.#timeoutMs };
      this.#client[method](request, metadata, options, (error, response) =>
        error ? reject(errorFromGrpc(error)) : resolve(response),
      );
    });
  }
}

/** A SagaState name, given in any case; anything else throws a TypeError naming the states. */
function stateName(state) {
  const name = String(state).toUpperCase();
  if (name === 'UNSPECIFIED' || SagaState[name] !== name) {
    const known = Object.keys(SagaState).filter((s) => s !== 'UNSPECIFIED');
    throw new TypeError(`unknown saga state ${JSON.stringify(state)}: use one of ${known.join(', ')}`);
  }
  return name;
}
