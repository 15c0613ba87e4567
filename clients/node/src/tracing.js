// Optional start-up helper: exports a participant's spans over OTLP/gRPC (what Jaeger ingests).
//
// The SDK itself depends only on @opentelemetry/api. This module loads the OpenTelemetry SDK
// packages (optional peer dependencies) when called, so a process that does not trace never
// loads them.

/** How long an export (and so shutdown with a collector down) may take, in milliseconds. */
export const DEFAULT_EXPORT_TIMEOUT_MS = 2000;

function withScheme(endpoint) {
  return /^[a-z][a-z0-9+.-]*:\/\//i.test(endpoint) ? endpoint : `http://${endpoint}`;
}

async function load(name) {
  try {
    return await import(name);
  } catch (error) {
    throw new Error(
      `setupTracing needs ${name}: npm install @opentelemetry/sdk-trace-node ` +
        '@opentelemetry/sdk-trace-base @opentelemetry/exporter-trace-otlp-grpc ' +
        '@opentelemetry/resources',
      { cause: error },
    );
  }
}

/**
 * Register a global tracer provider that exports spans to an OTLP/gRPC endpoint, with the W3C
 * trace-context propagator and an AsyncLocalStorage context manager, so that participant
 * handlers continue the saga's trace. Nothing is set up, and nothing exported, when no endpoint
 * is given and OTEL_EXPORTER_OTLP_ENDPOINT is not set.
 *
 * @param {{serviceName?: string, endpoint?: string, exportTimeoutMs?: number}} [options]
 * @returns {Promise<{enabled: boolean, forceFlush(): Promise<void>, shutdown(): Promise<void>}>}
 *   forceFlush and shutdown never reject: an export that fails is reported on stderr.
 */
export async function setupTracing({
  serviceName = process.env.OTEL_SERVICE_NAME || 'saga-participant',
  endpoint = process.env.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT || process.env.OTEL_EXPORTER_OTLP_ENDPOINT,
  exportTimeoutMs = DEFAULT_EXPORT_TIMEOUT_MS,
} = {}) {
  if (!endpoint) {
    return { enabled: false, async forceFlush() {}, async shutdown() {} };
  }
  const [{ NodeTracerProvider }, { BatchSpanProcessor }, { OTLPTraceExporter }, { resourceFromAttributes }] =
    await Promise.all([
      load('@opentelemetry/sdk-trace-node'),
      load('@opentelemetry/sdk-trace-base'),
      load('@opentelemetry/exporter-trace-otlp-grpc'),
      load('@opentelemetry/resources'),
    ]);
  const exporter = new OTLPTraceExporter({ url: withScheme(endpoint), timeoutMillis: exportTimeoutMs });
  const provider = new NodeTracerProvider({
    resource: resourceFromAttributes({ 'service.name': serviceName }),
    spanProcessors: [
      new BatchSpanProcessor(exporter, {
        scheduledDelayMillis: 500,
        exportTimeoutMillis: exportTimeoutMs,
      }),
    ],
  });
  // Sets the global tracer provider, the W3C trace-context + baggage propagator and the
  // AsyncLocalStorage context manager (without which the active span is lost across awaits).
  provider.register();
  // A collector that is down must not crash a participant that is stopping: report, go on.
  const tolerant = (what) => async () => {
    try {
      await provider[what]();
    } catch (error) {
      console.warn(`tracing ${what} failed: ${error?.message ?? error}`);
    }
  };
  return { enabled: true, provider, forceFlush: tolerant('forceFlush'), shutdown: tolerant('shutdown') };
}
