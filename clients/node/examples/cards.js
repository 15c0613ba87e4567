// The demo's Cards service: issues a virtual card per saga and cancels it on compensation.
//
//   node examples/cards.js --port 50063 --database cards.db [--host 127.0.0.1]
//     [--tls-cert cards.pem --tls-key cards.key [--client-ca coordinator-ca.pem]]
//
// Serves saga.v1.ParticipantService and the gRPC health service, stops gracefully on SIGTERM,
// and exports traces over OTLP/gRPC when OTEL_EXPORTER_OTLP_ENDPOINT is set.

import { randomInt, randomUUID } from 'node:crypto';
import fs from 'node:fs';
import { parseArgs } from 'node:util';
import { Participant, Rejected, SqliteBarrier } from '@saga-coordinator/sdk';
import { setupTracing } from '@saga-coordinator/sdk/tracing';

/** The highest card limit Cards grants without a manual review. */
const MAX_CARD_LIMIT = 100_000;
const DEFAULT_CARD_LIMIT = 10_000;

const { values: args } = parseArgs({
  options: {
    port: { type: 'string', default: '50063' },
    host: { type: 'string', default: '127.0.0.1' },
    database: { type: 'string', default: 'cards.db' },
    'tls-cert': { type: 'string' },
    'tls-key': { type: 'string' },
    'client-ca': { type: 'string' },
  },
});

const tracing = await setupTracing({ serviceName: 'cards' });
const barrier = new SqliteBarrier(args.database);
barrier.db.exec(`
  CREATE TABLE IF NOT EXISTS cards (
    card_id            TEXT PRIMARY KEY,
    saga_id            TEXT NOT NULL,
    execute_request_id TEXT NOT NULL UNIQUE,
    holder             TEXT NOT NULL,
    last4              TEXT NOT NULL,
    card_limit         INTEGER NOT NULL,
    state              TEXT NOT NULL CHECK (state IN ('active', 'cancelled')),
    issued_at          TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    cancelled_at       TEXT
  ) STRICT`);

const cards = new Participant('cards', { barrier });

cards.action('IssueCard', (ctx) => {
  const limit = Number(ctx.input?.card_limit ?? DEFAULT_CARD_LIMIT);
  if (!Number.isFinite(limit) || limit <= 0) {
    throw new Rejected('INVALID_CARD_LIMIT', `card_limit must be a positive number, not ${limit}`);
  }
  if (limit > MAX_CARD_LIMIT) {
    throw new Rejected(
      'CARD_LIMIT_EXCEEDED',
      `a card limit of ${limit} is above the ${MAX_CARD_LIMIT} Cards grants without review`,
    );
  }
  const card = { card_id: `card-${randomUUID()}`, last4: String(randomInt(10_000)).padStart(4, '0') };
  return (db) => {
    db.prepare(
      `INSERT INTO cards (card_id, saga_id, execute_request_id, holder, last4, card_limit, state)
       VALUES (?, ?, ?, ?, ?, ?, 'active')`,
    ).run(card.card_id, ctx.sagaId, ctx.requestId, ctx.input?.company ?? '', card.last4, limit);
    return card;
  };
});

// Keyed by the Execute's request_id, not by its output: the coordinator may not have received
// the output (a timeout) even though the card was issued here.
cards.compensation('CancelCard', (ctx) => (db) => {
  db.prepare(
    `UPDATE cards SET state = 'cancelled', cancelled_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
     WHERE execute_request_id = ? AND state = 'active'`,
  ).run(ctx.executeRequestId);
});

// With a certificate it serves TLS; with a client CA it also requires the coordinator's.
const tls = args['tls-cert']
  ? {
      certChain: fs.readFileSync(args['tls-cert']),
      privateKey: fs.readFileSync(args['tls-key']),
      clientCa: args['client-ca'] ? fs.readFileSync(args['client-ca']) : null,
    }
  : undefined;
await cards.serve(`${args.host}:${args.port}`, { tls });
barrier.close();
await tracing.shutdown();
