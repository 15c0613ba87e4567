// Types of @saga-coordinator/sdk/tracing.

export const DEFAULT_EXPORT_TIMEOUT_MS: number;

export interface TracingOptions {
  /** service.name of the spans. Default $OTEL_SERVICE_NAME, else "saga-participant". */
  serviceName?: string;
  /** OTLP/gRPC endpoint, e.g. "http://127.0.0.1:4317". Default $OTEL_EXPORTER_OTLP_ENDPOINT. */
  endpoint?: string;
  /** Bound of each export, and so of shutdown with the collector down. Default 2000. */
  exportTimeoutMs?: number;
}

export interface Tracing {
  /** False when no endpoint was configured: nothing was set up. */
  readonly enabled: boolean;
  /** Never rejects; a failed export is reported on stderr. */
  forceFlush(): Promise<void>;
  /** Flush and stop exporting. Never rejects. */
  shutdown(): Promise<void>;
}

/**
 * Register a global tracer provider exporting over OTLP/gRPC, with the W3C propagator and an
 * AsyncLocalStorage context manager. Needs the optional peer dependencies
 * @opentelemetry/sdk-trace-node, sdk-trace-base, exporter-trace-otlp-grpc and resources.
 */
export function setupTracing(options?: TracingOptions): Promise<Tracing>;
