// An OTLP/gRPC trace receiver on loopback (what Jaeger ingests), for the examples' tests.

import path from 'node:path';
import { fileURLToPath } from 'node:url';
import grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';

const PROTO = path.join(path.dirname(fileURLToPath(import.meta.url)), 'fixtures', 'otlp_trace.proto');

function attributes(list) {
  return Object.fromEntries(
    (list ?? []).map(({ key, value }) => [key, value?.[value?.value] ?? null]),
  );
}

/** Start a receiver on 127.0.0.1:0; `spans` collects {traceId, spanId, parentSpanId, name, service, attributes}. */
export async function startOtlpReceiver(t) {
  const definition = protoLoader.loadSync(PROTO, { keepCase: true, longs: Number, bytes: Buffer, oneofs: true });
  const spans = [];
  const server = new grpc.Server();
  server.addService(definition['opentelemetry.proto.collector.trace.v1.TraceService'], {
    Export: (call, callback) => {
      for (const resourceSpans of call.request.resource_spans) {
        const service = attributes(resourceSpans.resource?.attributes)['service.name'];
        for (const scope of resourceSpans.scope_spans) {
          for (const span of scope.spans) {
            spans.push({
              traceId: span.trace_id.toString('hex'),
              spanId: span.span_id.toString('hex'),
              parentSpanId: span.parent_span_id.toString('hex'),
              name: span.name,
              service,
              attributes: attributes(span.attributes),
            });
          }
        }
      }
      callback(null, {});
    },
  });
  const port = await new Promise((resolve, reject) =>
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (e, p) => (e ? reject(e) : resolve(p))),
  );
  t.after(() => server.forceShutdown());
  return { spans, endpoint: `http://127.0.0.1:${port}` };
}
