// The participant's answers over real loopback gRPC: OK, rejection, unknown action, invalid
// input, handler exception, raw mode, health and graceful stop.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import grpc from '@grpc/grpc-js';
import { Participant, PermanentFailure, Rejected, RetryLater, loadContract } from '../src/index.js';
import { call, compensateRequest, executeRequest, serve, silentLogger } from './helpers.js';

function participant() {
  return new Participant('accounts', { logger: silentLogger });
}

test('an action returning a value answers OK with the value as JSON', async (t) => {
  const p = participant();
  let seen;
  p.action('Do', async (ctx) => {
    seen = ctx;
    return { echo: ctx.input.name, earlier: ctx.previousOutputs };
  });
  const { client } = await serve(t, p);
  const { response, error } = await call(
    client,
    'Execute',
    executeRequest({
      input: Buffer.from('{"name":"ACME"}'),
      previous_outputs: { 'create-user': Buffer.from('{"user":7}'), legacy: Buffer.from([0xff, 1]) },
    }),
  );
  assert.equal(error, undefined);
  assert.deepEqual(JSON.parse(response.output.toString()), {
    echo: 'ACME',
    earlier: { 'create-user': { user: 7 }, legacy: { type: 'Buffer', data: [255, 1] } },
  });
  assert.equal(seen.sagaId, 's-1');
  assert.equal(seen.saga, 'sagas/s-1');
  assert.equal(seen.requestId, 'exec-1');
  assert.equal(seen.definitionVersion, 1);
  assert.equal(seen.attempt, 1);
  assert.ok(Buffer.isBuffer(seen.previousOutputs.legacy), 'a non-JSON earlier output stays bytes');
});

test('an empty input reads as null and a null result answers an empty output', async (t) => {
  const p = participant();
  let input = 'unset';
  p.action('Do', (ctx) => {
    input = ctx.input;
    return null;
  });
  const { client } = await serve(t, p);
  const { response } = await call(client, 'Execute', executeRequest({ input: Buffer.alloc(0) }));
  assert.equal(input, null);
  assert.equal(response.output.length, 0);
});

test('a raw action gets and returns bytes', async (t) => {
  const p = participant();
  p.action('Do', async (ctx) => Buffer.concat([ctx.input, ctx.previousOutputs.a]), { raw: true });
  const { client } = await serve(t, p);
  const { response } = await call(
    client,
    'Execute',
    executeRequest({ input: Buffer.from([0, 159]), previous_outputs: { a: Buffer.from([7]) } }),
  );
  assert.deepEqual([...response.output], [0, 159, 7]);
});

test('a Rejected handler answers FAILED_PRECONDITION with ErrorInfo reason and domain', async (t) => {
  const p = participant();
  p.action('Do', async () => {
    throw new Rejected('NO_FUNDS', 'balance is 3, needs 10');
  });
  const { client } = await serve(t, p);
  const { error } = await call(client, 'Execute', executeRequest());
  assert.equal(error.code, grpc.status.FAILED_PRECONDITION);
  assert.equal(error.details, 'balance is 3, needs 10');
  assert.equal(error.reason, 'NO_FUNDS');
  assert.equal(error.domain, 'accounts');
  assert.deepEqual(error.errorMetadata, { saga: 'sagas/s-1', step: 'step-1', request_id: 'exec-1' });
});

test('RetryLater answers UNAVAILABLE with RetryInfo and ErrorInfo, and is not logged as a failure', async (t) => {
  const logged = [];
  const p = new Participant('accounts', { logger: { info() {}, error: (...a) => logged.push(a) } });
  p.action('Do', async () => {
    throw new RetryLater('the ledger is being rebuilt', { retryAfterMs: 1500, reason: 'LEDGER_REBUILDING' });
  });
  p.action('Default', async () => {
    throw new RetryLater('busy', { retryAfterMs: 250.5 });
  });
  const { client } = await serve(t, p);
  const { error } = await call(client, 'Execute', executeRequest());
  assert.equal(error.code, grpc.status.UNAVAILABLE);
  assert.equal(error.details, 'the ledger is being rebuilt');
  assert.equal(error.retryDelayMs, 1500);
  assert.equal(error.reason, 'LEDGER_REBUILDING');
  assert.equal(error.domain, 'accounts');
  const { error: other } = await call(client, 'Execute', executeRequest({ action: 'Default' }));
  assert.equal(other.reason, 'RETRY_LATER');
  assert.equal(other.retryDelayMs, 250.5);
  assert.equal(logged.length, 0);
});

test('PermanentFailure answers INVALID_ARGUMENT with ErrorInfo: a code the coordinator does not retry', async (t) => {
  const p = participant();
  p.action('Do', async () => {
    throw new PermanentFailure('no ledger in XTS', { reason: 'UNKNOWN_CURRENCY' });
  });
  p.compensation('Undo', async () => {
    throw new PermanentFailure('');
  });
  const { client } = await serve(t, p);
  const { error } = await call(client, 'Execute', executeRequest());
  assert.equal(error.code, grpc.status.INVALID_ARGUMENT);
  assert.equal(error.details, 'no ledger in XTS');
  assert.equal(error.reason, 'UNKNOWN_CURRENCY');
  assert.equal(error.domain, 'accounts');
  assert.equal(error.retryDelayMs, null);
  const { error: undo } = await call(client, 'Compensate', compensateRequest());
  assert.equal(undo.code, grpc.status.INVALID_ARGUMENT);
  assert.equal(undo.reason, 'PERMANENT_FAILURE');
});

test('RetryLater needs a positive delay, and both errors an UPPER_SNAKE reason', () => {
  for (const retryAfterMs of [undefined, 0, -5, Number.NaN, Infinity, '30']) {
    assert.throws(() => new RetryLater('later', { retryAfterMs }), TypeError);
  }
  assert.throws(() => new RetryLater('later'), TypeError);
  assert.throws(() => new RetryLater('later', { retryAfterMs: 10, reason: 'busy' }), TypeError);
  assert.throws(() => new PermanentFailure('never', { reason: 'never' }), TypeError);
  assert.equal(new PermanentFailure('').message, 'PERMANENT_FAILURE');
  assert.equal(new RetryLater('', { retryAfterMs: 1 }).message, 'RETRY_LATER');
});

test('Rejected refuses a reason that is not UPPER_SNAKE', () => {
  assert.throws(() => new Rejected('no funds'), TypeError);
  assert.equal(new Rejected('NO_FUNDS').message, 'NO_FUNDS');
});

test('an unknown action answers UNIMPLEMENTED, naming the known ones', async (t) => {
  const p = participant();
  p.action('Do', () => 1).action('Other', () => 2);
  p.compensation('Undo', () => {});
  const { client } = await serve(t, p);
  const { error } = await call(client, 'Execute', executeRequest({ action: 'Nope' }));
  assert.equal(error.code, grpc.status.UNIMPLEMENTED);
  assert.equal(error.reason, 'UNKNOWN_ACTION');
  assert.match(error.details, /no action 'Nope' \(it has: Do, Other\)/);
  const { error: compensation } = await call(client, 'Compensate', compensateRequest({ action: 'Nope' }));
  assert.equal(compensation.code, grpc.status.UNIMPLEMENTED);
});

test('an input that is not JSON answers INVALID_ARGUMENT with a field violation', async (t) => {
  const p = participant();
  let called = false;
  p.action('Do', () => {
    called = true;
  });
  const { client } = await serve(t, p);
  for (const input of [Buffer.from('{oops'), Buffer.from([0xc3, 0x28])]) {
    const { error } = await call(client, 'Execute', executeRequest({ input }));
    assert.equal(error.code, grpc.status.INVALID_ARGUMENT);
    assert.equal(error.reason, 'INVALID_PAYLOAD');
    assert.deepEqual(error.fieldViolations, [{ field: 'input', description: 'must be UTF-8 JSON' }]);
  }
  assert.equal(called, false);
});

test('an unexpected exception answers INTERNAL (transient) and is logged', async (t) => {
  const logged = [];
  const p = new Participant('accounts', { logger: { info() {}, error: (...a) => logged.push(a) } });
  p.action('Do', async () => {
    throw new Error('database is on fire');
  });
  const { client } = await serve(t, p);
  const { error } = await call(client, 'Execute', executeRequest());
  assert.equal(error.code, grpc.status.INTERNAL);
  assert.equal(error.reason, 'HANDLER_FAILED');
  assert.match(error.details, /database is on fire/);
  assert.equal(logged.length, 1);
});

test('a result that is not JSON-serialisable answers INTERNAL', async (t) => {
  const p = participant();
  p.action('Do', () => ({ big: 1n }));
  const { client } = await serve(t, p);
  const { error } = await call(client, 'Execute', executeRequest());
  assert.equal(error.code, grpc.status.INTERNAL);
});

test('a compensation gets the decoded Execute output, or null when there was none', async (t) => {
  const p = participant();
  const seen = [];
  p.compensation('Undo', async (ctx) => {
    seen.push([ctx.executeOutput, ctx.executeRequestId, ctx.requestId]);
    return 'ignored';
  });
  const { client } = await serve(t, p);
  const first = await call(
    client,
    'Compensate',
    compensateRequest({ execute_output: Buffer.from('{"account":"a-1"}') }),
  );
  assert.deepEqual(first.response, {});
  await call(client, 'Compensate', compensateRequest({ request_id: 'comp-2' }));
  assert.deepEqual(seen, [
    [{ account: 'a-1' }, 'exec-1', 'comp-1'],
    [null, 'exec-1', 'comp-2'],
  ]);
});

test('a handler is registered once per name', () => {
  const p = participant();
  p.action('Do', () => 1);
  assert.throws(() => p.action('Do', () => 2), /registered twice/);
  assert.throws(() => p.action('', () => 2), TypeError);
});

test('the health service answers SERVING, and NOT_FOUND for an unknown service', async (t) => {
  const p = participant();
  const { port } = await serve(t, p);
  const { HealthClient } = loadContract();
  const health = new HealthClient(`127.0.0.1:${port}`, grpc.credentials.createInsecure());
  t.after(() => health.close());
  for (const service of ['', 'saga.v1.ParticipantService']) {
    const { response } = await call(health, 'Check', { service });
    assert.equal(response.status, 'SERVING');
  }
  const { error } = await call(health, 'Check', { service: 'nope.Service' });
  assert.equal(error.code, grpc.status.NOT_FOUND);
});

test('stop() lets a call in flight finish and then refuses new ones', async (t) => {
  const p = participant();
  let entered;
  const running = new Promise((resolve) => (entered = resolve));
  p.action('Slow', async () => {
    entered();
    await sleep(300);
    return { done: true };
  });
  const { client } = await serve(t, p);
  const inFlight = call(client, 'Execute', executeRequest({ action: 'Slow' }));
  await running; // the call is in the handler: stop() must let it finish
  const started = Date.now();
  await p.stop({ graceMs: 5000 });
  assert.ok(Date.now() - started < 2000, 'stop waits for the call, not for the grace period');
  const { response } = await inFlight;
  assert.deepEqual(JSON.parse(response.output.toString()), { done: true });
  const { error } = await call(client, 'Execute', executeRequest({ action: 'Slow' }));
  assert.equal(error.code, grpc.status.UNAVAILABLE);
});

test('stop() cancels what is still running after the grace period', async (t) => {
  const p = participant();
  p.action('Stuck', () => new Promise(() => {}));
  const { client } = await serve(t, p);
  const inFlight = call(client, 'Execute', executeRequest({ action: 'Stuck' }));
  await sleep(100);
  const started = Date.now();
  await p.stop({ graceMs: 200 });
  assert.ok(Date.now() - started < 1500);
  const { error } = await inFlight;
  assert.ok(error, 'the stuck call ends with an error');
});
