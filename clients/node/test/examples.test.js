// The examples run as real Node.js processes: started on a free port, called over gRPC, stopped
// with SIGTERM.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import Database from 'better-sqlite3';
import grpc from '@grpc/grpc-js';
import { call, compensateRequest, executeRequest, freePort, participantClient, tempDir, waitServing } from './helpers.js';
import { startOtlpReceiver } from './otlp_receiver.js';

const EXAMPLES = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'examples');

/** Start an example; SIGTERMed (and awaited) when the test ends if still running. */
async function startExample(t, script, args = [], env = {}) {
  const port = await freePort();
  const child = spawn(process.execPath, [path.join(EXAMPLES, script), ...args(port)], {
    env: { ...process.env, OTEL_EXPORTER_OTLP_ENDPOINT: '', ...env(port) },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let output = '';
  child.stdout.on('data', (d) => (output += d));
  child.stderr.on('data', (d) => (output += d));
  const exited = once(child, 'exit');
  t.after(async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGTERM');
      await exited;
    }
  });
  try {
    await waitServing(port, { exited: () => child.exitCode !== null });
  } catch (error) {
    throw new Error(`${script} did not serve: ${error.message}\n${output}`);
  }
  const stop = async () => {
    child.kill('SIGTERM');
    const [code, signal] = await exited;
    return { code, signal, output };
  };
  return { port, client: participantClient(t, port), stop, output: () => output };
}

test('the README shows examples/participant.js as it is, in at most 30 lines', () => {
  const readme = fs.readFileSync(path.join(EXAMPLES, '..', 'README.md'), 'utf8');
  const section = readme.slice(readme.indexOf('## Write a participant in Node.js'));
  const shown = section.match(/```js\n([\s\S]*?)```/)[1];
  const example = fs.readFileSync(path.join(EXAMPLES, 'participant.js'), 'utf8');
  assert.equal(shown, example);
  assert.ok(example.trimEnd().split('\n').length <= 30);
});

test('the README example serves OpenAccount and CloseAccount', async (t) => {
  const dir = tempDir(t);
  const database = path.join(dir, 'accounts.db');
  const example = await startExample(t, 'participant.js', () => [], (port) => ({
    PORT: String(port),
    DATABASE: database,
  }));
  const request = executeRequest({
    saga: 'sagas/acme-1',
    action: 'OpenAccount',
    input: Buffer.from(JSON.stringify({ company: 'Acme Corp' })),
  });
  const { response } = await call(example.client, 'Execute', request);
  assert.deepEqual(JSON.parse(response.output.toString()), { account_id: 'acme-1' });
  const again = await call(example.client, 'Execute', request);
  assert.deepEqual(again.response.output, response.output);

  const refused = await call(example.client, 'Execute', executeRequest({ action: 'OpenAccount', request_id: 'x' }));
  assert.equal(refused.error.code, grpc.status.FAILED_PRECONDITION);
  assert.equal(refused.error.reason, 'COMPANY_REQUIRED');

  const undo = await call(
    example.client,
    'Compensate',
    compensateRequest({ saga: 'sagas/acme-1', action: 'CloseAccount' }),
  );
  assert.deepEqual(undo.response, {});
  const { code } = await example.stop();
  assert.equal(code, 0);
  const db = new Database(database, { readonly: true });
  t.after(() => db.close());
  assert.deepEqual(db.prepare('SELECT id, owner, open FROM accounts').all(), [
    { id: 'acme-1', owner: 'Acme Corp', open: 0 },
  ]);
});

const cardInput = (fields) => Buffer.from(JSON.stringify({ company: 'Acme Corp', ...fields }));

test('cards issues a card once, refuses a limit above 100000, and cancels on compensation', async (t) => {
  const dir = tempDir(t);
  const database = path.join(dir, 'cards.db');
  const cards = await startExample(
    t,
    'cards.js',
    (port) => ['--port', String(port), '--database', database],
    () => ({}),
  );
  const issue = executeRequest({ saga: 'sagas/acme', step: 'issue-card', action: 'IssueCard', input: cardInput({ card_limit: 50_000 }) });
  const { response } = await call(cards.client, 'Execute', issue);
  const card = JSON.parse(response.output.toString());
  assert.match(card.card_id, /^card-/);
  assert.match(card.last4, /^\d{4}$/);
  const again = await call(cards.client, 'Execute', issue);
  assert.deepEqual(JSON.parse(again.response.output.toString()), card);

  const refused = await call(
    cards.client,
    'Execute',
    executeRequest({ saga: 'sagas/globex', step: 'issue-card', action: 'IssueCard', request_id: 'globex-exec', input: cardInput({ card_limit: 250_000 }) }),
  );
  assert.equal(refused.error.code, grpc.status.FAILED_PRECONDITION);
  assert.equal(refused.error.reason, 'CARD_LIMIT_EXCEEDED');
  assert.equal(refused.error.domain, 'cards');

  const cancel = compensateRequest({ saga: 'sagas/acme', step: 'issue-card', action: 'CancelCard', execute_request_id: 'exec-1' });
  assert.deepEqual((await call(cards.client, 'Compensate', cancel)).response, {});
  // The refused card's compensation is a null one.
  const nothing = compensateRequest({ saga: 'sagas/globex', step: 'issue-card', action: 'CancelCard', request_id: 'globex-comp', execute_request_id: 'globex-exec' });
  assert.deepEqual((await call(cards.client, 'Compensate', nothing)).response, {});

  const started = Date.now();
  const { code } = await cards.stop();
  assert.equal(code, 0);
  assert.ok(Date.now() - started < 5000, 'SIGTERM stops it promptly');
  const db = new Database(database, { readonly: true });
  t.after(() => db.close());
  assert.deepEqual(db.prepare('SELECT card_id, saga_id, state, card_limit FROM cards').all(), [
    { card_id: card.card_id, saga_id: 'acme', state: 'cancelled', card_limit: 50_000 },
  ]);
});

test('cards exports its spans, in the caller\'s trace, when OTEL_EXPORTER_OTLP_ENDPOINT is set', async (t) => {
  const receiver = await startOtlpReceiver(t);
  const dir = tempDir(t);
  const cards = await startExample(
    t,
    'cards.js',
    (port) => ['--port', String(port), '--database', path.join(dir, 'cards.db')],
    () => ({ OTEL_EXPORTER_OTLP_ENDPOINT: receiver.endpoint }),
  );
  const traceId = '0af7651916cd43dd8448eb211c80319c';
  const parent = 'b7ad6b7169203331';
  const { error } = await call(
    cards.client,
    'Execute',
    executeRequest({ action: 'IssueCard', step: 'issue-card', input: cardInput({}) }),
    { traceparent: `00-${traceId}-${parent}-01` },
  );
  assert.equal(error, undefined);
  const { code } = await cards.stop(); // shutdown flushes the spans
  assert.equal(code, 0);
  const span = receiver.spans.find((s) => s.name === 'Execute IssueCard');
  assert.ok(span, `no span exported: ${JSON.stringify(receiver.spans)}`);
  assert.equal(span.traceId, traceId);
  assert.equal(span.parentSpanId, parent);
  assert.equal(span.service, 'cards');
  assert.equal(span.attributes['saga.step'], 'issue-card');
});
