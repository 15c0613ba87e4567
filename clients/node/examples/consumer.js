// A backend that reacts to sagas: it follows the change feed, prints each change, sends the
// welcome mail when a saga succeeds and pages on-call when one is parked.
//
//   node examples/consumer.js --target 127.0.0.1:50051 --position-file consumer.position \
//     [--state succeeded --state needs_attention] [--definition onboard-corporate-client]
//
// The target and the file may also come from SAGA_TARGET and POSITION_FILE. The position of the
// last change processed is saved after each one, by writing a temporary file and renaming it
// over the old one, so the file always holds a whole position. Killed at any instant, the
// consumer resumes after it: it misses no change, and at most sees the last one again, with the
// same position (dedupe on it when an effect must not repeat). SIGTERM or SIGINT stops it
// between two changes.

import fs from 'node:fs';
import { parseArgs } from 'node:util';
import { SagaClient } from '@saga-coordinator/sdk';

const { values: args } = parseArgs({
  options: {
    target: { type: 'string', default: process.env.SAGA_TARGET ?? '127.0.0.1:50051' },
    'position-file': { type: 'string', default: process.env.POSITION_FILE ?? 'consumer.position' },
    state: { type: 'string', multiple: true, default: [] },
    definition: { type: 'string', default: '' },
  },
});
const positionFile = args['position-file'];

/** The position of the last change processed; 0 the first time (from the oldest change kept). */
function loadPosition() {
  try {
    return Number.parseInt(fs.readFileSync(positionFile, 'utf8'), 10);
  } catch (error) {
    if (error.code === 'ENOENT') return 0;
    throw error;
  }
}

function savePosition(position) {
  const temporary = `${positionFile}.tmp`;
  const fd = fs.openSync(temporary, 'w');
  try {
    fs.writeSync(fd, `${position}\n`);
    fs.fsyncSync(fd); // on disk before the rename makes it the position
  } finally {
    fs.closeSync(fd);
  }
  fs.renameSync(temporary, positionFile); // atomic: the old position or the new one, never half
}

/** Print the change, then act on the sagas that ended well or need a human. */
function handle({ position, sagaId, definition, state, event }) {
  console.log(`@${position} ${sagaId} ${definition} ${state} ${event.type} ${event.step || '-'}`);
  if (state === 'SUCCEEDED') {
    console.log(`welcome mail to ${sagaId}`);
  } else if (state === 'NEEDS_ATTENTION') {
    const why = event.failure?.reason || event.failure?.code || event.type;
    console.log(`page on-call: ${sagaId} ${why}`);
  }
}

// SIGTERM or SIGINT ends the feed's iteration, between two changes or while it waits.
const stop = new AbortController();
for (const signal of ['SIGTERM', 'SIGINT']) process.once(signal, () => stop.abort());

const client = new SagaClient(args.target);
try {
  const feed = client.changes({
    afterPosition: loadPosition(),
    states: args.state,
    definition: args.definition,
    signal: stop.signal,
  });
  for await (const change of feed) {
    // Act first, then save: a kill in between repeats this change, it never skips it.
    handle(change);
    savePosition(change.position);
    if (stop.signal.aborted) break;
  }
} finally {
  client.close();
}
