// A participant serving TLS, and mTLS with `clientCa`: callers the handshake refuses never reach
// a handler. Certificates come from a CA made with the openssl command (test/pki.js).

import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import grpc from '@grpc/grpc-js';
import { Participant, loadContract } from '../src/index.js';
import { call, executeRequest, silentLogger } from './helpers.js';
import { certificateAuthority, hasOpenssl } from './pki.js';

const skip = hasOpenssl() ? false : 'the openssl command is needed to make certificates';

let pki;
function certificates() {
  // One set for the whole file: openssl takes a few tens of milliseconds per certificate.
  if (!pki) {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'saga-sdk-tls-'));
    process.on('exit', () => fs.rmSync(dir, { recursive: true, force: true }));
    const ca = certificateAuthority(dir, 'ca');
    const other = certificateAuthority(dir, 'other');
    pki = {
      ca: ca.pem,
      otherCa: other.pem,
      participant: ca.issue('cards'),
      coordinator: ca.issue('coordinator'),
      stranger: other.issue('coordinator'),
    };
  }
  return pki;
}

/** A participant whose action counts its calls, serving `tls` on a loopback port. */
async function countingParticipant(t, tls) {
  const participant = new Participant('cards', { logger: silentLogger });
  const calls = { count: 0 };
  participant.action('Do', () => ({ call: ++calls.count }));
  const port = await participant.start('127.0.0.1:0', { tls });
  t.after(() => participant.stop({ graceMs: 0 }));
  return { port, calls };
}

function client(t, port, credentials) {
  const { ParticipantClient } = loadContract();
  // The certificate names localhost too; checked against that name, TLS sends it as SNI, which
  // an IP address cannot be.
  const made = new ParticipantClient(`127.0.0.1:${port}`, credentials, {
    'grpc.ssl_target_name_override': 'localhost',
  });
  t.after(() => made.close());
  return made;
}

test('a participant serving TLS answers a caller that trusts its CA', { skip }, async (t) => {
  const { ca, participant } = certificates();
  const { port, calls } = await countingParticipant(t, {
    certChain: participant.cert,
    privateKey: participant.key.toString(),
  });

  const { response, error } = await call(
    client(t, port, grpc.credentials.createSsl(ca)),
    'Execute',
    executeRequest(),
  );

  assert.equal(error, undefined);
  assert.deepEqual(JSON.parse(response.output.toString()), { call: 1 });
  assert.equal(calls.count, 1);
});

test('a caller that does not trust the certificate never reaches a handler', { skip }, async (t) => {
  const { otherCa, participant } = certificates();
  const { port, calls } = await countingParticipant(t, {
    certChain: participant.cert,
    privateKey: participant.key,
  });

  const { error } = await call(
    client(t, port, grpc.credentials.createSsl(otherCa)),
    'Execute',
    executeRequest(),
  );

  assert.equal(error?.codeName, 'UNAVAILABLE');
  assert.equal(calls.count, 0);
});

test('a plaintext caller never reaches a handler of a TLS participant', { skip }, async (t) => {
  const { participant } = certificates();
  const { port, calls } = await countingParticipant(t, {
    certChain: participant.cert,
    privateKey: participant.key,
  });

  const { error } = await call(
    client(t, port, grpc.credentials.createInsecure()),
    'Execute',
    executeRequest(),
  );

  assert.equal(error?.codeName, 'UNAVAILABLE');
  assert.equal(calls.count, 0);
});

test('with clientCa, only callers with a certificate from that CA get through', { skip }, async (t) => {
  const { ca, participant, coordinator, stranger } = certificates();
  const { port, calls } = await countingParticipant(t, {
    certChain: participant.cert,
    privateKey: participant.key,
    clientCa: ca,
  });

  const anonymous = await call(
    client(t, port, grpc.credentials.createSsl(ca)),
    'Execute',
    executeRequest(),
  );
  const foreign = await call(
    client(t, port, grpc.credentials.createSsl(ca, stranger.key, stranger.cert)),
    'Execute',
    executeRequest(),
  );
  assert.equal(anonymous.error?.codeName, 'UNAVAILABLE');
  assert.equal(foreign.error?.codeName, 'UNAVAILABLE');
  assert.equal(calls.count, 0, 'a refused caller reached the handler');

  const known = await call(
    client(t, port, grpc.credentials.createSsl(ca, coordinator.key, coordinator.cert)),
    'Execute',
    executeRequest(),
  );
  assert.equal(known.error, undefined);
  assert.deepEqual(JSON.parse(known.response.output.toString()), { call: 1 });
});

test('TLS settings that cannot work are refused before serving', { skip }, async (t) => {
  const { ca, participant } = certificates();
  const p = new Participant('cards', { logger: silentLogger });
  t.after(() => p.stop({ graceMs: 0 }));

  await assert.rejects(p.start('127.0.0.1:0', { tls: { certChain: participant.cert } }), {
    name: 'TypeError',
    message: /tls\.privateKey/,
  });
  await assert.rejects(
    p.start('127.0.0.1:0', { tls: { certChain: participant.key, privateKey: participant.cert } }),
    { name: 'TypeError', message: /tls\.certChain holds no PEM certificate/ },
  );
  await assert.rejects(
    p.start('127.0.0.1:0', {
      tls: { certChain: participant.cert, privateKey: participant.key, clientCa: 'not a CA' },
    }),
    { name: 'TypeError', message: /tls\.clientCa holds no PEM certificate/ },
  );
  await assert.rejects(
    p.start('127.0.0.1:0', {
      tls: { certChain: participant.cert, privateKey: participant.key },
      credentials: grpc.ServerCredentials.createInsecure(),
    }),
    { name: 'TypeError', message: /tls or credentials, not both/ },
  );
  const credentials = Participant.serverCredentials({
    certChain: participant.cert,
    privateKey: participant.key,
    clientCa: ca,
  });
  assert.ok(credentials instanceof grpc.ServerCredentials);
});

test('serving plaintext beyond loopback says so; on loopback it is quiet', async (t) => {
  const warnings = [];
  const logger = { ...silentLogger, warn: (message) => warnings.push(message) };
  const open = new Participant('cards', { logger });
  t.after(() => open.stop({ graceMs: 0 }));
  const local = new Participant('cards', { logger });
  t.after(() => local.stop({ graceMs: 0 }));

  await local.start('127.0.0.1:0');
  assert.deepEqual(warnings, []);
  await open.start('0.0.0.0:0');
  assert.equal(warnings.length, 1);
  assert.match(warnings[0], /serves plaintext on 0\.0\.0\.0:0/);
});
