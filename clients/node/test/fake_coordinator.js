// A small in-memory CoordinatorService on loopback, for the client's tests only.

import grpc from '@grpc/grpc-js';
import { loadContract, statusError } from '../src/index.js';

const SETTLED = new Set(['SAGA_STATE_SUCCEEDED', 'SAGA_STATE_COMPENSATED', 'SAGA_STATE_NEEDS_ATTENTION']);

export function sagaProto(id, fields = {}) {
  return {
    name: `sagas/${id}`,
    saga_id: id,
    definition: 'onboard',
    definition_version: 1,
    state: 'SAGA_STATE_RUNNING',
    input: Buffer.alloc(0),
    steps: [],
    version: 1,
    create_time: { seconds: 1_700_000_000, nanos: 500_000_000 },
    ...fields,
  };
}

/**
 * The fake keeps sagas in insertion order, records every request and its metadata, and lets a
 * test script WatchSaga: `watchScript(call)` decides what a watch stream does.
 */
export class FakeCoordinator {
  sagas = new Map();
  requests = [];
  watches = [];
  watchScript = null;
  /** The change feed: SagaChange protos in position order. */
  feed = [];
  /** How many of the next change feed streams break (UNAVAILABLE) after their first message. */
  breakFeeds = 0;
  /** Each saga's event log: saga id to SagaEvent protos in sequence order. */
  logs = new Map();

  handlers() {
    const record = (method, call) => this.requests.push({ method, request: call.request, metadata: call.metadata });
    return {
      CreateSaga: (call, cb) => {
        record('CreateSaga', call);
        const { saga_id: id, definition, input } = call.request;
        if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/.test(id)) {
          return cb(
            statusError(grpc.status.INVALID_ARGUMENT, 'invalid saga_id', {
              errorInfo: { reason: 'INVALID_ARGUMENT', domain: 'saga-coordinator' },
              fieldViolations: [{ field: 'saga_id', description: 'letters, digits, ._-' }],
            }),
          );
        }
        const existing = this.sagas.get(id);
        if (existing) {
          if (existing.definition !== definition || !existing.input.equals(input)) {
            return cb(
              statusError(grpc.status.ALREADY_EXISTS, `saga ${id} exists with another request`, {
                errorInfo: { reason: 'SAGA_ALREADY_EXISTS', domain: 'saga-coordinator', metadata: { saga_id: id } },
              }),
            );
          }
          return cb(null, { saga: existing, created: false });
        }
        const saga = sagaProto(id, { definition, input });
        this.sagas.set(id, saga);
        return cb(null, { saga, created: true });
      },
      GetSaga: (call, cb) => {
        record('GetSaga', call);
        const saga = this.sagas.get(call.request.name.replace('sagas/', ''));
        if (!saga) {
          return cb(
            statusError(grpc.status.NOT_FOUND, `no saga ${call.request.name}`, {
              errorInfo: { reason: 'SAGA_NOT_FOUND', domain: 'saga-coordinator' },
            }),
          );
        }
        return cb(null, { saga });
      },
      ListSagas: (call, cb) => {
        record('ListSagas', call);
        const { page_size: size, page_token: token, states, definition } = call.request;
        const all = [...this.sagas.values()].filter(
          (s) => (states.length === 0 || states.includes(s.state)) && (!definition || s.definition === definition),
        );
        const start = token ? Number(token.replace('offset-', '')) : 0;
        const page = all.slice(start, start + (size || 100));
        const next = start + page.length < all.length ? `offset-${start + page.length}` : '';
        return cb(null, { sagas: page, next_page_token: next });
      },
      ListSagaEvents: (call, cb) => {
        record('ListSagaEvents', call);
        const { name, page_size: size, page_token: token, newest_first: newestFirst } = call.request;
        // As the coordinator's tokens: a token read in one order is refused in the other.
        const order = newestFirst ? 'newest-' : 'oldest-';
        if (token && !token.startsWith(order)) {
          return cb(
            statusError(grpc.status.INVALID_ARGUMENT, 'invalid ListSagaEvents request', {
              errorInfo: { reason: 'INVALID_ARGUMENT', domain: 'saga-coordinator' },
              fieldViolations: [{ field: 'page_token', description: 'keep newest_first the same' }],
            }),
          );
        }
        const log = this.logs.get(name.replace('sagas/', '')) ?? [];
        const all = newestFirst ? [...log].reverse() : log;
        const start = token ? Number(token.slice(order.length)) : 0;
        const page = all.slice(start, start + (size || 100));
        const next = start + page.length < all.length ? `${order}${start + page.length}` : '';
        return cb(null, { events: page, next_page_token: next });
      },
      CancelSaga: (call, cb) => {
        record('CancelSaga', call);
        const saga = this.sagas.get(call.request.name.replace('sagas/', ''));
        if (SETTLED.has(saga.state)) {
          return cb(
            statusError(grpc.status.FAILED_PRECONDITION, 'the saga has ended', {
              errorInfo: { reason: 'SAGA_ENDED', domain: 'saga-coordinator' },
            }),
          );
        }
        saga.state = 'SAGA_STATE_COMPENSATING';
        saga.cancel_reason = call.request.reason;
        return cb(null, { saga });
      },
      WatchChanges: (call) => {
        record('WatchChanges', call);
        const after = Number(call.request.after_position);
        const rest = this.feed.filter((change) => change.position > after);
        for (const [index, change] of rest.entries()) {
          call.write({ changes: [change], position: change.position });
          if (index === 0 && this.breakFeeds > 0) {
            this.breakFeeds -= 1;
            call.emit('error', statusError(grpc.status.UNAVAILABLE, 'the coordinator is restarting'));
            return;
          }
        }
        if (call.request.no_follow) call.end(); // else it stays open, as a followed feed does
      },
      WatchSaga: (call) => {
        record('WatchSaga', call);
        const watch = { call, cancelled: false };
        this.watches.push(watch);
        call.on('cancelled', () => {
          watch.cancelled = true;
        });
        this.watchScript?.(call, this.watches.length);
      },
    };
  }
}

/**
 * Serve a FakeCoordinator on 127.0.0.1:0 (plaintext, or with the given server `credentials`);
 * stopped when the test ends.
 */
export async function startFakeCoordinator(t, { credentials = grpc.ServerCredentials.createInsecure() } = {}) {
  const fake = new FakeCoordinator();
  const server = new grpc.Server();
  server.addService(loadContract().coordinatorService, fake.handlers());
  const port = await new Promise((resolve, reject) =>
    server.bindAsync('127.0.0.1:0', credentials, (e, p) => (e ? reject(e) : resolve(p))),
  );
  t.after(() => server.forceShutdown());
  return { fake, port, target: `127.0.0.1:${port}` };
}
