// The client against a fake CoordinatorService on loopback: requests sent, answers converted,
// rich errors parsed, pagination (of sagas and of a saga's log, either way), watch and wait.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import grpc from '@grpc/grpc-js';
import { SagaClient, SagaEventType, SagaRpcError, SagaState, SdkError, StepState, WaitTimeout, statusError } from '../src/index.js';
import { loadContract } from '../src/contract.js';
import { settledSagaFromResponse } from '../src/model.js';
import { sagaProto, startFakeCoordinator } from './fake_coordinator.js';

async function setup(t, options = {}) {
  const { fake, target } = await startFakeCoordinator(t);
  const client = new SagaClient(target, options);
  t.after(() => client.close());
  return { fake, client };
}

test('create sends the saga id and JSON input, and is idempotent on the saga id', async (t) => {
  const { fake, client } = await setup(t);
  const first = await client.create('onboard', { company: 'ACME' }, { sagaId: 'acme-1' });
  assert.equal(first.created, true);
  assert.equal(first.saga.sagaId, 'acme-1');
  assert.equal(first.saga.state, 'RUNNING');
  assert.deepEqual(first.saga.inputJson(), { company: 'ACME' });
  const { request } = fake.requests[0];
  assert.equal(request.saga_id, 'acme-1');
  assert.equal(request.input.toString(), '{"company":"ACME"}');
  const again = await client.create('onboard', { company: 'ACME' }, { sagaId: 'acme-1' });
  assert.equal(again.created, false);
});

test('a conflicting create throws ALREADY_EXISTS with the ErrorInfo reason', async (t) => {
  const { client } = await setup(t);
  await client.create('onboard', { company: 'ACME' }, { sagaId: 'acme-1' });
  const error = await client.create('onboard', { company: 'Other' }, { sagaId: 'acme-1' }).catch((e) => e);
  assert.ok(error instanceof SagaRpcError);
  assert.ok(error instanceof SdkError);
  assert.equal(error.code, grpc.status.ALREADY_EXISTS);
  assert.equal(error.codeName, 'ALREADY_EXISTS');
  assert.equal(error.reason, 'SAGA_ALREADY_EXISTS');
  assert.equal(error.domain, 'saga-coordinator');
  assert.deepEqual(error.errorMetadata, { saga_id: 'acme-1' });
  assert.match(error.message, /ALREADY_EXISTS: .* \[SAGA_ALREADY_EXISTS\]/);
});

test('an invalid request throws INVALID_ARGUMENT with the BadRequest field violations', async (t) => {
  const { client } = await setup(t);
  const error = await client.create('onboard', null, { sagaId: '-bad id' }).catch((e) => e);
  assert.equal(error.code, grpc.status.INVALID_ARGUMENT);
  assert.deepEqual(error.fieldViolations, [{ field: 'saga_id', description: 'letters, digits, ._-' }]);
});

test('get converts the saga, and an unknown saga throws NOT_FOUND', async (t) => {
  const { fake, client } = await setup(t);
  fake.sagas.set(
    'a',
    sagaProto('a', {
      state: 'SAGA_STATE_COMPENSATED',
      version: 7,
      failure: { step: 'issue-card', operation: 'execute', code: 'FAILED_PRECONDITION', reason: 'CARD_LIMIT_EXCEEDED', message: 'no' },
      steps: [
        { name: 'create-user', participant: 'identity', kind: 'STEP_KIND_UNSPECIFIED', state: 'STEP_STATE_COMPENSATED', execute_attempts: 1, output: Buffer.from('{"user":1}') },
        { name: 'issue-card', participant: 'cards', kind: 'STEP_KIND_PIVOT', state: 'STEP_STATE_REJECTED', execute_attempts: 2 },
      ],
    }),
  );
  const saga = await client.get('a');
  assert.equal(saga.state, 'COMPENSATED');
  assert.equal(saga.settled, true);
  assert.equal(saga.version, 7);
  assert.equal(saga.failure.reason, 'CARD_LIMIT_EXCEEDED');
  assert.deepEqual(saga.createTime, new Date(1_700_000_000_500));
  assert.equal(saga.endTime, null);
  assert.equal(saga.step('create-user').kind, 'COMPENSATABLE');
  assert.deepEqual(saga.step('create-user').outputJson(), { user: 1 });
  assert.equal(saga.step('issue-card').output, null);
  assert.equal(saga.step('issue-card').kind, 'PIVOT');
  assert.equal(saga.step('issue-card').executeAttempts, 2);
  assert.throws(() => saga.step('nope'), RangeError);
  assert.equal(fake.requests[0].request.name, 'sagas/a');

  const error = await client.get('missing').catch((e) => e);
  assert.equal(error.code, grpc.status.NOT_FOUND);
  assert.equal(error.reason, 'SAGA_NOT_FOUND');
  await assert.rejects(client.get('sagas/a'), TypeError);
});

test('list iterates over every page with the same filters', async (t) => {
  const { fake, client } = await setup(t);
  for (let i = 0; i < 7; i += 1) fake.sagas.set(`s${i}`, sagaProto(`s${i}`));
  fake.sagas.set('done', sagaProto('done', { state: 'SAGA_STATE_SUCCEEDED' }));
  const seen = [];
  for await (const saga of client.list({ states: ['RUNNING'], definition: 'onboard', pageSize: 3 })) {
    seen.push(saga.sagaId);
  }
  assert.deepEqual(seen, ['s0', 's1', 's2', 's3', 's4', 's5', 's6']);
  const pages = fake.requests.map((r) => r.request);
  assert.deepEqual(pages.map((p) => p.page_token), ['', 'offset-3', 'offset-6']);
  for (const page of pages) {
    assert.deepEqual(page.states, ['SAGA_STATE_RUNNING']);
    assert.equal(page.definition, 'onboard');
    assert.equal(page.page_size, 3);
  }
  assert.throws(() => client.list({ pageSize: 0 }), TypeError);
  assert.throws(() => client.list({ states: ['BOGUS'] }), TypeError);
});

test('cancel sends the reason; a saga that has ended throws FAILED_PRECONDITION', async (t) => {
  const { fake, client } = await setup(t);
  fake.sagas.set('a', sagaProto('a'));
  fake.sagas.set('b', sagaProto('b', { state: 'SAGA_STATE_SUCCEEDED' }));
  const saga = await client.cancel('a', 'customer changed their mind');
  assert.equal(saga.state, 'COMPENSATING');
  assert.equal(saga.cancelReason, 'customer changed their mind');
  const error = await client.cancel('b').catch((e) => e);
  assert.equal(error.code, grpc.status.FAILED_PRECONDITION);
  assert.equal(error.reason, 'SAGA_ENDED');
});

test('every call carries the client metadata and honours its deadline', async (t) => {
  const { fake, client } = await setup(t, { metadata: { authorization: 'Bearer t0k3n' }, timeoutMs: 200 });
  fake.sagas.set('a', sagaProto('a'));
  await client.get('a');
  assert.deepEqual(fake.requests[0].metadata.get('authorization'), ['Bearer t0k3n']);
});

const event = (sequence, type, step = '') => ({ sequence, type: `SAGA_EVENT_TYPE_${type}`, step, attempt: 1 });

test('events with newestFirst reads the whole log newest first, page after page', async (t) => {
  const { fake, client } = await setup(t);
  fake.logs.set('a', [
    event(1, 'CREATED'),
    event(2, 'STEP_SUCCEEDED', 'create-user'),
    event(3, 'STEP_SUCCEEDED', 'open-account'),
    event(4, 'STEP_ATTEMPT_FAILED', 'issue-card'),
    event(5, 'STEP_REJECTED', 'issue-card'),
    event(6, 'COMPENSATION_SUCCEEDED', 'open-account'),
    event(7, 'COMPENSATION_SUCCEEDED', 'create-user'),
  ]);
  const read = async (options) => {
    const seen = [];
    for await (const e of client.events('a', options)) seen.push([e.sequence, e.type, e.step]);
    return seen;
  };
  const oldestFirst = await read({ pageSize: 2 });
  assert.deepEqual(oldestFirst.map(([sequence]) => sequence), [1, 2, 3, 4, 5, 6, 7]);
  const newestFirst = await read({ pageSize: 2, newestFirst: true });
  assert.deepEqual(newestFirst, [...oldestFirst].reverse());
  assert.deepEqual(newestFirst[0], [7, 'COMPENSATION_SUCCEEDED', 'create-user']);

  const pages = fake.requests.filter((r) => r.method === 'ListSagaEvents').map((r) => r.request);
  assert.deepEqual(
    pages.map((p) => [p.name, p.page_size, p.page_token, p.newest_first]),
    [
      ['sagas/a', 2, '', false],
      ['sagas/a', 2, 'oldest-2', false],
      ['sagas/a', 2, 'oldest-4', false],
      ['sagas/a', 2, 'oldest-6', false],
      ['sagas/a', 2, '', true],
      ['sagas/a', 2, 'newest-2', true],
      ['sagas/a', 2, 'newest-4', true],
      ['sagas/a', 2, 'newest-6', true],
    ],
  );
});

test('events refuses a newestFirst that is not a boolean before any call', async (t) => {
  const { fake, client } = await setup(t);
  assert.throws(() => client.events('a', { newestFirst: 'yes' }), {
    name: 'TypeError',
    message: 'newestFirst must be a boolean, got string',
  });
  for (const newestFirst of [1, null, 'false']) assert.throws(() => client.events('a', { newestFirst }), TypeError);
  assert.throws(() => client.events('a', { pageSize: 0 }), TypeError);
  for await (const _ of client.events('a', { newestFirst: undefined })); // eslint-disable-line no-unused-vars
  assert.deepEqual(
    fake.requests.map((r) => [r.method, r.request.newest_first]),
    [['ListSagaEvents', false]],
  );
});

test('watch yields the current saga first, then each change, and ends when it settles', async (t) => {
  const { fake, client } = await setup(t);
  fake.watchScript = (call) => {
    call.write({ saga: sagaProto('a', { version: 1 }) });
    call.write({ saga: sagaProto('a', { version: 2 }), event: event(2, 'STEP_SUCCEEDED', 'create-user') });
    call.write({ saga: sagaProto('a', { version: 3, state: 'SAGA_STATE_SUCCEEDED' }), event: event(3, 'STEP_SUCCEEDED', 'open-account') });
    call.end();
  };
  const updates = [];
  for await (const update of client.watch('a')) updates.push(update);
  assert.equal(updates.length, 3);
  assert.equal(updates[0].event, null);
  assert.equal(updates[1].event.type, 'STEP_SUCCEEDED');
  assert.equal(updates[1].event.step, 'create-user');
  assert.equal(updates[2].saga.state, 'SUCCEEDED');
  assert.equal(fake.requests[0].request.name, 'sagas/a');
});

test('a watched event names the action sent and the event a step\'s success stands for', async (t) => {
  const { fake, client } = await setup(t);
  const story = (sequence, type, step, action, emits = '') => ({ ...event(sequence, type, step), action, emits });
  fake.watchScript = (call) => {
    call.write({ saga: sagaProto('globex', { version: 1 }) });
    call.write({ saga: sagaProto('globex', { version: 2 }), event: story(2, 'STEP_SUCCEEDED', 'create-user', 'CreateUser', 'UserCreated') });
    call.write({ saga: sagaProto('globex', { version: 3 }), event: story(3, 'STEP_REJECTED', 'issue-card', 'IssueCard') });
    call.write({
      saga: sagaProto('globex', { version: 4, state: 'SAGA_STATE_COMPENSATED' }),
      event: story(4, 'COMPENSATION_SUCCEEDED', 'create-user', 'DeactivateUser'),
    });
    call.end();
  };
  const told = [];
  for await (const { event } of client.watch('globex')) if (event) told.push([event.type, event.action, event.emits]);
  assert.deepEqual(told, [
    ['STEP_SUCCEEDED', 'CreateUser', 'UserCreated'],
    ['STEP_REJECTED', 'IssueCard', ''],
    ['COMPENSATION_SUCCEEDED', 'DeactivateUser', ''],
  ]);
});

test('leaving a watch early cancels the stream', async (t) => {
  const { fake, client } = await setup(t);
  fake.watchScript = (call) => {
    call.write({ saga: sagaProto('a') }); // and never ends
  };
  for await (const update of client.watch('a')) {
    assert.equal(update.saga.sagaId, 'a');
    break;
  }
  for (let i = 0; i < 50 && !fake.watches[0].cancelled; i += 1) await sleep(10);
  assert.equal(fake.watches[0].cancelled, true);
});

test('a broken watch throws a SagaRpcError with the status details', async (t) => {
  const { fake, client } = await setup(t);
  fake.watchScript = (call) =>
    call.emit('error', 
      statusError(grpc.status.NOT_FOUND, 'no saga sagas/x', { errorInfo: { reason: 'SAGA_NOT_FOUND' } }),
    );
  const error = await (async () => {
    for await (const _ of client.watch('x')); // eslint-disable-line no-unused-vars
  })().catch((e) => e);
  assert.ok(error instanceof SagaRpcError);
  assert.equal(error.code, grpc.status.NOT_FOUND);
  assert.equal(error.reason, 'SAGA_NOT_FOUND');
});

test('wait returns the saga once it settles', async (t) => {
  const { fake, client } = await setup(t);
  fake.watchScript = async (call) => {
    call.write({ saga: sagaProto('a') });
    await sleep(50);
    call.write({ saga: sagaProto('a', { state: 'SAGA_STATE_NEEDS_ATTENTION' }), event: event(2, 'COMPENSATION_FAILED') });
  };
  const saga = await client.wait('a', { timeoutMs: 5000 });
  assert.equal(saga.state, 'NEEDS_ATTENTION');
});

test('wait throws WaitTimeout when the saga does not settle in time', async (t) => {
  const { fake, client } = await setup(t);
  fake.watchScript = (call) => call.write({ saga: sagaProto('a') });
  const started = Date.now();
  const error = await client.wait('a', { timeoutMs: 300 }).catch((e) => e);
  assert.ok(error instanceof WaitTimeout, String(error));
  assert.equal(error.sagaId, 'a');
  assert.ok(Date.now() - started < 2000);
});

test('wait watches again after UNAVAILABLE and after a stream that ends unsettled', async (t) => {
  const { fake, client } = await setup(t);
  fake.watchScript = (call, n) => {
    if (n === 1) return call.emit('error', { code: grpc.status.UNAVAILABLE, details: 'restarting' });
    if (n === 2) {
      call.write({ saga: sagaProto('a') });
      return call.end();
    }
    call.write({ saga: sagaProto('a', { state: 'SAGA_STATE_COMPENSATED' }) });
    return call.end();
  };
  const saga = await client.wait('a', { timeoutMs: 5000 });
  assert.equal(saga.state, 'COMPENSATED');
  assert.equal(fake.watches.length, 3);
});

// Plays the coordinator: every change, or with ending_only the settled saga alone.
function likeTheCoordinator(fake, states) {
  const sent = [];
  fake.watchScript = async (call) => {
    for (const [index, state] of states.entries()) {
      const settled = index === states.length - 1;
      if (call.request.ending_only && !settled) continue;
      const saga = sagaProto('a', { version: index + 1, state: `SAGA_STATE_${state}` });
      call.write(index === 0 ? { saga } : { saga, event: event(index + 1, 'STEP_SUCCEEDED') });
      sent.push(state);
      await sleep(20);
    }
    call.end();
  };
  return sent;
}

const watchRequests = (fake) =>
  fake.requests.filter((r) => r.method === 'WatchSaga').map(({ request }) => [request.name, request.ending_only]);

test('wait asks for the ending only and gets one message; watch still gets every change', async (t) => {
  const { fake, client } = await setup(t);
  const sent = likeTheCoordinator(fake, ['RUNNING', 'COMPENSATING', 'COMPENSATED']);
  const saga = await client.wait('a', { timeoutMs: 5000 });
  assert.equal(saga.state, 'COMPENSATED');
  assert.equal(saga.version, 3);
  assert.deepEqual(sent, ['COMPENSATED']);
  const updates = [];
  for await (const update of client.watch('a')) updates.push(update.saga.state);
  assert.deepEqual(updates, ['RUNNING', 'COMPENSATING', 'COMPENSATED']);
  assert.deepEqual(watchRequests(fake), [
    ['sagas/a', true],
    ['sagas/a', false],
  ]);
});

test('wait asks for the ending only again when it watches again after UNAVAILABLE', async (t) => {
  const { fake, client } = await setup(t);
  fake.watchScript = (call, n) => {
    if (n < 3) return call.emit('error', { code: grpc.status.UNAVAILABLE, details: 'restarting' });
    if (!call.request.ending_only) call.write({ saga: sagaProto('a') });
    call.write({ saga: sagaProto('a', { state: 'SAGA_STATE_SUCCEEDED' }) });
    return call.end();
  };
  const saga = await client.wait('a', { timeoutMs: 5000 });
  assert.equal(saga.state, 'SUCCEEDED');
  assert.deepEqual(watchRequests(fake), [
    ['sagas/a', true],
    ['sagas/a', true],
    ['sagas/a', true],
  ]);
});

test('only a settled saga of a watch message is converted', () => {
  assert.equal(settledSagaFromResponse({ saga: sagaProto('a') }), null);
  assert.equal(settledSagaFromResponse({ saga: sagaProto('a', { state: 'SAGA_STATE_COMPENSATING' }) }), null);
  assert.equal(settledSagaFromResponse({ saga: null }), null);
  const saga = settledSagaFromResponse({ saga: sagaProto('a', { state: 'SAGA_STATE_NEEDS_ATTENTION' }) });
  assert.equal(saga.state, 'NEEDS_ATTENTION');
  assert.equal(saga.settled, true);
});

test('wait does not retry a definite error', async (t) => {
  const { fake, client } = await setup(t);
  fake.watchScript = (call) => call.emit('error', { code: grpc.status.NOT_FOUND, details: 'no saga' });
  const error = await client.wait('a', { timeoutMs: 5000 }).catch((e) => e);
  assert.equal(error.code, grpc.status.NOT_FOUND);
  assert.equal(fake.watches.length, 1);
});

test('an unreachable coordinator throws UNAVAILABLE', async () => {
  const client = new SagaClient('127.0.0.1:1', { timeoutMs: 2000 });
  try {
    const error = await client.get('a').catch((e) => e);
    assert.equal(error.code, grpc.status.UNAVAILABLE);
  } finally {
    client.close();
  }
});

function feedChange(position, sagaId) {
  return {
    position,
    saga_id: sagaId,
    definition: 'onboard',
    definition_version: 1,
    state: 'SAGA_STATE_RUNNING',
    event: { sequence: 1, type: 'SAGA_EVENT_TYPE_CREATED' },
    labels: { tenant: 'acme' },
  };
}

test('changes() reads the feed and reopens it after the last position when it breaks', async (t) => {
  const { fake, target } = await startFakeCoordinator(t);
  fake.feed = [feedChange(3, 's-3'), feedChange(7, 's-7'), feedChange(9, 's-9')];
  fake.breakFeeds = 1;
  const client = new SagaClient(target);
  t.after(() => client.close());

  const changes = [];
  for await (const change of client.changes({ follow: false, definition: 'onboard', states: ['RUNNING'] })) {
    changes.push(change);
  }

  assert.deepEqual(
    changes.map((c) => [c.position, c.sagaId, c.state, c.event.type]),
    [
      [3, 's-3', 'RUNNING', 'CREATED'],
      [7, 's-7', 'RUNNING', 'CREATED'],
      [9, 's-9', 'RUNNING', 'CREATED'],
    ],
  );
  assert.deepEqual(changes[0].labels, { tenant: 'acme' });
  const requests = fake.requests.filter((r) => r.method === 'WatchChanges').map((r) => r.request);
  assert.deepEqual(
    requests.map((r) => [Number(r.after_position), r.definition, r.states, r.no_follow]),
    [
      [0, 'onboard', ['SAGA_STATE_RUNNING'], true],
      [3, 'onboard', ['SAGA_STATE_RUNNING'], true],
    ],
  );
});

test('every state and event type of the contract has its name in the SDK', () => {
  const { definition } = loadContract();
  const names = (enumName, prefix) =>
    definition[enumName].type.value
      .map((v) => v.name.slice(prefix.length))
      .filter((name) => name !== 'UNSPECIFIED');
  for (const [values, enumName, prefix] of [
    [SagaEventType, 'saga.v1.SagaEventType', 'SAGA_EVENT_TYPE_'],
    [SagaState, 'saga.v1.SagaState', 'SAGA_STATE_'],
    [StepState, 'saga.v1.StepState', 'STEP_STATE_'],
  ]) {
    for (const name of names(enumName, prefix)) assert.equal(values[name], name, `${enumName}.${name}`);
  }
});

test('changes() takes states in any case, refuses unknown ones, and ends when aborted', async (t) => {
  const { fake, target } = await startFakeCoordinator(t);
  fake.feed = [feedChange(3, 's-3')];
  const client = new SagaClient(target);
  t.after(() => client.close());
  assert.throws(() => client.changes({ states: ['parked'] }), {
    name: 'TypeError',
    message: /unknown saga state "parked": use one of RUNNING, COMPENSATING/,
  });

  const controller = new AbortController();
  const seen = [];
  for await (const change of client.changes({ states: ['running'], signal: controller.signal })) {
    seen.push(change.position);
    setTimeout(() => controller.abort(), 50); // while the followed feed waits for more
  }

  assert.deepEqual(seen, [3]);
  const [request] = fake.requests.filter((r) => r.method === 'WatchChanges').map((r) => r.request);
  assert.deepEqual(request.states, ['SAGA_STATE_RUNNING']);
});
