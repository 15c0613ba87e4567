// A Node.js backend starting a saga and following it to its ending.
//
//   node examples/onboard.js --target 127.0.0.1:50051 --id acme-corp --input '{"company":"Acme"}'
//
// Prints one JSON line per change of the saga (the first is its state when the watch began) and
// exits 0 when it SUCCEEDED, 1 otherwise.

import { parseArgs } from 'node:util';
import { SagaClient } from '@saga-coordinator/sdk';

const { values: args } = parseArgs({
  options: {
    target: { type: 'string', default: '127.0.0.1:50051' },
    definition: { type: 'string', default: 'onboard-corporate-client' },
    id: { type: 'string', default: '' },
    input: { type: 'string', default: '{}' },
  },
});

const client = new SagaClient(args.target);
try {
  const { saga, created } = await client.create(args.definition, JSON.parse(args.input), {
    sagaId: args.id,
  });
  console.error(`${created ? 'started' : 'found'} sagas/${saga.sagaId}`);
  let last = saga;
  for await (const { saga: now, event } of client.watch(saga.sagaId)) {
    last = now;
    console.log(JSON.stringify({ state: now.state, event: event?.type ?? null, step: event?.step ?? null }));
  }
  process.exitCode = last.state === 'SUCCEEDED' ? 0 : 1;
} finally {
  client.close();
}
