// The client against a coordinator that requires TLS, a client certificate and a bearer token:
// the token goes with every call (streams and their reconnections too), settings that cannot
// work are refused with the option or variable named, and a token never shows.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import util from 'node:util';
import grpc from '@grpc/grpc-js';
import { SagaClient, connectionFromEnvironment } from '../src/index.js';
import { sagaProto, startFakeCoordinator } from './fake_coordinator.js';
import { certificateAuthority, hasOpenssl } from './pki.js';

const skip = hasOpenssl() ? false : 'the openssl command is needed to make certificates';
const SECRET = 'sk-live-0123456789abcdef';

let pki;
function certificates() {
  if (!pki) {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'saga-client-tls-'));
    process.on('exit', () => fs.rmSync(dir, { recursive: true, force: true }));
    const ca = certificateAuthority(dir, 'ca');
    pki = { dir, ca: ca.pem, coordinator: ca.issue('coordinator'), client: ca.issue('orders-service') };
    for (const [name, { cert, key }] of Object.entries({ coordinator: pki.coordinator, client: pki.client })) {
      fs.writeFileSync(path.join(dir, `${name}.pem`), cert);
      fs.writeFileSync(path.join(dir, `${name}.key`), key, { mode: 0o600 });
    }
    fs.writeFileSync(path.join(dir, 'ca.pem'), ca.pem);
  }
  return pki;
}

/** A fake coordinator serving TLS and requiring a client certificate from the test CA. */
async function mtlsCoordinator(t) {
  const { ca, coordinator } = certificates();
  const credentials = grpc.ServerCredentials.createSsl(
    ca,
    [{ cert_chain: coordinator.cert, private_key: coordinator.key }],
    true,
  );
  return startFakeCoordinator(t, { credentials });
}

function feedChange(position) {
  return {
    position,
    saga_id: `s-${position}`,
    definition: 'onboard',
    definition_version: 1,
    state: 'SAGA_STATE_RUNNING',
    event: { sequence: 1, type: 'SAGA_EVENT_TYPE_CREATED' },
    labels: {},
  };
}

const authorizations = (fake, method) =>
  fake.requests.filter((r) => !method || r.method === method).map((r) => r.metadata.get('authorization')[0]);

test('over mTLS the token goes with every call, and a reconnected feed asks for a fresh one', { skip }, async (t) => {
  const { fake, target } = await mtlsCoordinator(t);
  const { ca, client: mine } = certificates();
  let asked = 0;
  const client = new SagaClient(target, {
    tls: { ca, certChain: mine.cert, privateKey: mine.key.toString(), serverName: 'localhost' },
    token: async () => `token-${++asked}`,
  });
  t.after(() => client.close());
  fake.watchScript = (call) => {
    call.write({ saga: sagaProto('acme', { state: 'SAGA_STATE_SUCCEEDED' }) });
    call.end();
  };
  fake.feed = [feedChange(3), feedChange(7)];
  fake.breakFeeds = 1;

  await client.create('onboard', { company: 'ACME' }, { sagaId: 'acme' });
  assert.equal((await client.get('acme')).sagaId, 'acme');
  for await (const update of client.watch('acme')) assert.equal(update.saga.sagaId, 'acme');
  const positions = [];
  for await (const change of client.changes({ follow: false })) positions.push(change.position);

  assert.deepEqual(positions, [3, 7]);
  assert.deepEqual(authorizations(fake), ['token-1', 'token-2', 'token-3', 'token-4', 'token-5'].map((x) => `Bearer ${x}`));
  assert.deepEqual(authorizations(fake, 'WatchChanges'), ['Bearer token-4', 'Bearer token-5']);
});

test('without its client certificate the handshake refuses the client', { skip }, async (t) => {
  const { fake, target } = await mtlsCoordinator(t);
  const client = new SagaClient(target, { tls: { ca: certificates().ca, serverName: 'localhost' }, token: SECRET });
  t.after(() => client.close());

  const error = await client.get('acme').catch((e) => e);

  assert.equal(error.codeName, 'UNAVAILABLE');
  assert.equal(fake.requests.length, 0);
  assert.ok(!error.message.includes(SECRET));
});

test('settings that cannot work throw a TypeError naming them, and never the token', { skip }, async (t) => {
  const { ca, client: mine } = certificates();
  const cases = [
    [{ tls: { ca, privateKey: mine.key } }, /tls\.privateKey needs tls\.certChain/],
    [{ tls: { ca, certChain: mine.cert } }, /tls\.certChain needs tls\.privateKey/],
    [{ tls: { ca: mine.key } }, /tls\.ca holds no PEM certificate/],
    [{ tls: { certChain: mine.cert, privateKey: mine.cert } }, /tls\.privateKey holds no PEM unencrypted private key/],
    [{ tls: { ca }, credentials: grpc.credentials.createInsecure() }, /tls or credentials, not both/],
    [{ token: `${SECRET}\n` }, /whitespace or a line break/],
    [{ token: `Bearer ${SECRET}` }, /give the token alone; 'Bearer ' is added/],
    [{ token: 42 }, /a string, or a function/],
    [{ token: SECRET, metadata: { Authorization: `Bearer ${SECRET}` } }, /not both/],
  ];
  for (const [options, message] of cases) {
    assert.throws(() => new SagaClient('127.0.0.1:1', options), (error) => {
      assert.ok(error instanceof TypeError);
      assert.match(error.message, message);
      assert.ok(!error.message.includes(SECRET), error.message);
      return true;
    });
  }

  const { fake, target } = await mtlsCoordinator(t);
  const client = new SagaClient(target, {
    tls: { ca, certChain: mine.cert, privateKey: mine.key, serverName: 'localhost' },
    token: () => `${SECRET} and more`,
  });
  t.after(() => client.close());
  const error = await client.get('acme').catch((e) => e);
  assert.ok(error instanceof TypeError);
  assert.match(error.message, /the function's answer: the token holds whitespace/);
  assert.ok(!error.message.includes(SECRET));
  assert.equal(fake.requests.length, 0);
  assert.ok(!util.inspect(new SagaClient(target, { token: SECRET }), { showHidden: true, depth: 5 }).includes(SECRET));
});

test('fromEnvironment reads SAGA_TARGET, SAGA_TLS_* and SAGA_TOKEN_FILE, re-reading a rotated token', { skip }, async (t) => {
  const { fake, target } = await mtlsCoordinator(t);
  const { dir } = certificates();
  const tokenFile = path.join(dir, `token-${process.pid}`);
  fs.writeFileSync(tokenFile, 'first-token\n', { mode: 0o600 });
  const env = {
    SAGA_TARGET: target,
    SAGA_TLS_CA: path.join(dir, 'ca.pem'),
    SAGA_TLS_CERT: path.join(dir, 'client.pem'),
    SAGA_TLS_KEY: path.join(dir, 'client.key'),
    SAGA_TLS_SERVER_NAME: 'localhost',
    SAGA_TOKEN_FILE: tokenFile,
  };
  const client = SagaClient.fromEnvironment({ env, timeoutMs: 5000 });
  t.after(() => client.close());
  fake.sagas.set('acme', sagaProto('acme'));

  await client.get('acme');
  fs.writeFileSync(`${tokenFile}.new`, 'second-token\n');
  fs.renameSync(`${tokenFile}.new`, tokenFile); // how a rotation replaces it
  await client.get('acme');

  assert.deepEqual(authorizations(fake), ['Bearer first-token', 'Bearer second-token']);
});

test('fromEnvironment refuses variables that cannot work, naming them', { skip }, () => {
  const { dir } = certificates();
  const key = path.join(dir, 'client.key');
  const cases = [
    [{ SAGA_TLS_KEY: key }, /^SAGA_TLS_KEY needs SAGA_TLS_CERT/],
    [{ SAGA_TLS_CA: path.join(dir, 'missing.pem') }, /^SAGA_TLS_CA: cannot read .*missing\.pem: ENOENT/],
    [{ SAGA_TLS_CA: key }, /^SAGA_TLS_CA \(.*client\.key\): tls\.ca holds no PEM certificate/],
    [{ SAGA_TOKEN: SECRET, SAGA_TOKEN_FILE: key }, /SAGA_TOKEN or SAGA_TOKEN_FILE, not both/],
    [{ SAGA_TOKEN: `${SECRET} ` }, /^SAGA_TOKEN: the token holds whitespace/],
    [{ SAGA_TOKEN_FILE: path.join(dir, 'missing-token') }, /^SAGA_TOKEN_FILE: cannot read/],
    [{ SAGA_TLS: 'maybe' }, /^SAGA_TLS: expected true or false/],
  ];
  for (const [env, message] of cases) {
    assert.throws(() => connectionFromEnvironment(env), (error) => {
      assert.ok(error instanceof TypeError);
      assert.match(error.message, message);
      assert.ok(!error.message.includes(SECRET), error.message);
      return true;
    });
  }
  assert.deepEqual(connectionFromEnvironment({}), { target: '127.0.0.1:50051', tls: null, token: null });
  assert.deepEqual(connectionFromEnvironment({ SAGA_TLS: 'true' }).tls, {
    ca: null,
    certChain: null,
    privateKey: null,
    serverName: null,
  });
});
