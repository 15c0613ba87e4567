// Shared test fixtures: free ports, temp databases, participant calls over real loopback gRPC.

import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import grpc from '@grpc/grpc-js';
import { errorFromGrpc, loadContract } from '../src/index.js';

export const silentLogger = { info() {}, error() {} };

/** A loopback port nobody listens on right now. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** A fresh temp directory, removed when the test ends. */
export function tempDir(t) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'saga-sdk-test-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** A ParticipantService client of 127.0.0.1:port, closed when the test ends. */
export function participantClient(t, port) {
  const { ParticipantClient } = loadContract();
  const client = new ParticipantClient(`127.0.0.1:${port}`, grpc.credentials.createInsecure());
  t.after(() => client.close());
  return client;
}

/**
 * Call a unary method; resolves {response} or {error} (a SagaRpcError), never rejects.
 *
 * @param {Record<string, string>} [metadata]
 */
export function call(client, method, request, metadata = {}) {
  const md = new grpc.Metadata();
  for (const [key, value] of Object.entries(metadata)) md.set(key, value);
  return new Promise((resolve) => {
    client[method](request, md, { deadline: Date.now() + 10_000 }, (error, response) =>
      resolve(error ? { error: errorFromGrpc(error) } : { response }),
    );
  });
}

/** An ExecuteRequest with sensible defaults. */
export function executeRequest(overrides = {}) {
  return {
    saga: 'sagas/s-1',
    definition: 'onboard',
    definition_version: 1,
    step: 'step-1',
    action: 'Do',
    request_id: 'exec-1',
    attempt: 1,
    input: Buffer.from('{}'),
    previous_outputs: {},
    ...overrides,
  };
}

/** A CompensateRequest with sensible defaults. */
export function compensateRequest(overrides = {}) {
  return {
    saga: 'sagas/s-1',
    definition: 'onboard',
    definition_version: 1,
    step: 'step-1',
    action: 'Undo',
    request_id: 'comp-1',
    execute_request_id: 'exec-1',
    attempt: 1,
    input: Buffer.from('{}'),
    ...overrides,
  };
}

/** Start a participant on 127.0.0.1:0, stopped when the test ends; returns a client of it. */
export async function serve(t, participant) {
  const port = await participant.start('127.0.0.1:0');
  t.after(() => participant.stop({ graceMs: 1000 }));
  return { port, client: participantClient(t, port) };
}

/** Wait until the gRPC health service at 127.0.0.1:port answers SERVING. */
export async function waitServing(port, { timeoutMs = 10_000, exited = () => false } = {}) {
  const { HealthClient } = loadContract();
  // Short reconnect backoff: the process is still starting, and grpc-js would otherwise wait
  // a second or more between connection attempts.
  const client = new HealthClient(`127.0.0.1:${port}`, grpc.credentials.createInsecure(), {
    'grpc.initial_reconnect_backoff_ms': 50,
    'grpc.max_reconnect_backoff_ms': 100,
  });
  const deadline = Date.now() + timeoutMs;
  try {
    for (;;) {
      if (exited()) throw new Error('the process exited before serving');
      const { response } = await new Promise((resolve) =>
        client.Check({ service: '' }, { deadline: Date.now() + 500 }, (error, r) =>
          resolve({ error, response: r }),
        ),
      );
      if (response?.status === 'SERVING') return;
      if (Date.now() > deadline) throw new Error(`nothing served on port ${port} in time`);
      await sleep(50);
    }
  } finally {
    client.close();
  }
}
