// The participant continues the saga's trace from the incoming W3C traceparent; the client
// sends the active trace context along. Spans are kept by an in-memory exporter.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { context, propagation, SpanKind, trace } from '@opentelemetry/api';
import { AsyncLocalStorageContextManager } from '@opentelemetry/context-async-hooks';
import { W3CTraceContextPropagator } from '@opentelemetry/core';
import {
  BasicTracerProvider,
  InMemorySpanExporter,
  SimpleSpanProcessor,
} from '@opentelemetry/sdk-trace-base';
import { Participant, Rejected, SagaClient, SqliteBarrier } from '../src/index.js';
import { call, executeRequest, serve, silentLogger } from './helpers.js';
import { sagaProto, startFakeCoordinator } from './fake_coordinator.js';

// This file runs in its own process (node --test), so registering globals here is contained.
const exporter = new InMemorySpanExporter();
const provider = new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] });
trace.setGlobalTracerProvider(provider);
context.setGlobalContextManager(new AsyncLocalStorageContextManager().enable());
propagation.setGlobalPropagator(new W3CTraceContextPropagator());

const TRACE_ID = '4bf92f3577b34da6a3ce929d0e0e4736';
const PARENT_SPAN_ID = '00f067aa0ba902b7';
const TRACEPARENT = `00-${TRACE_ID}-${PARENT_SPAN_ID}-01`;

test('a handler runs in a span that continues the incoming traceparent', async (t) => {
  exporter.reset();
  const p = new Participant('cards', { barrier: new SqliteBarrier(':memory:'), logger: silentLogger });
  const seen = {};
  p.action('IssueCard', async () => {
    await sleep(5); // the active span must survive an await
    seen.before = trace.getActiveSpan()?.spanContext();
    return () => {
      seen.inEffect = trace.getActiveSpan()?.spanContext();
      return { card_id: 'c-1' };
    };
  });
  const { client } = await serve(t, p);
  const { error } = await call(
    client,
    'Execute',
    executeRequest({ action: 'IssueCard', step: 'issue-card' }),
    { traceparent: TRACEPARENT },
  );
  assert.equal(error, undefined);
  assert.equal(seen.before.traceId, TRACE_ID);
  assert.equal(seen.inEffect.spanId, seen.before.spanId);

  const [span] = exporter.getFinishedSpans();
  assert.equal(span.name, 'Execute IssueCard');
  assert.equal(span.kind, SpanKind.SERVER);
  assert.equal(span.spanContext().traceId, TRACE_ID);
  assert.equal(span.spanContext().spanId, seen.before.spanId);
  assert.equal(span.parentSpanContext?.spanId, PARENT_SPAN_ID);
  assert.equal(span.attributes['saga.id'], 's-1');
  assert.equal(span.attributes['saga.step'], 'issue-card');
  assert.equal(span.attributes['saga.operation'], 'execute');
  assert.equal(span.attributes['saga.outcome'], 'applied');
});

test('a rejection and a replay are recorded on their spans', async (t) => {
  exporter.reset();
  const p = new Participant('cards', { barrier: new SqliteBarrier(':memory:'), logger: silentLogger });
  p.action('IssueCard', () => {
    throw new Rejected('CARD_LIMIT_EXCEEDED', 'too high');
  });
  const { client } = await serve(t, p);
  const request = executeRequest({ action: 'IssueCard' });
  await call(client, 'Execute', request, { traceparent: TRACEPARENT });
  await call(client, 'Execute', request, { traceparent: TRACEPARENT });
  const spans = exporter.getFinishedSpans();
  assert.equal(spans.length, 2);
  for (const span of spans) {
    assert.equal(span.spanContext().traceId, TRACE_ID);
    assert.equal(span.attributes['saga.outcome'], 'rejected');
    assert.equal(span.attributes['saga.reason'], 'CARD_LIMIT_EXCEEDED');
  }
});

test('without a traceparent the handler starts a new trace', async (t) => {
  exporter.reset();
  const p = new Participant('cards', { logger: silentLogger });
  let traceId;
  p.action('Do', () => {
    traceId = trace.getActiveSpan()?.spanContext().traceId;
  });
  const { client } = await serve(t, p);
  await call(client, 'Execute', executeRequest());
  assert.match(traceId, /^[0-9a-f]{32}$/);
  assert.notEqual(traceId, TRACE_ID);
});

test('the client sends the active trace context to the coordinator', async (t) => {
  const { fake, target } = await startFakeCoordinator(t);
  fake.sagas.set('a', sagaProto('a'));
  const client = new SagaClient(target);
  t.after(() => client.close());
  const tracer = trace.getTracer('test');
  await tracer.startActiveSpan('caller', async (span) => {
    await client.get('a');
    span.end();
  });
  const [traceparent] = fake.requests[0].metadata.get('traceparent');
  const callerTraceId = exporter.getFinishedSpans().find((s) => s.name === 'caller').spanContext().traceId;
  assert.match(traceparent, new RegExp(`^00-${callerTraceId}-[0-9a-f]{16}-01$`));
});
