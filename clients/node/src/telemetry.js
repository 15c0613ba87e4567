// The participant's spans: names and `saga.*` attribute keys in one place, OpenTelemetry API only.

import { context, propagation, SpanKind, SpanStatusCode, trace } from '@opentelemetry/api';

export const TRACER_NAME = '@saga-coordinator/sdk';

export const Attribute = Object.freeze({
  SAGA_ID: 'saga.id',
  DEFINITION: 'saga.definition',
  STEP: 'saga.step',
  OPERATION: 'saga.operation',
  ACTION: 'saga.action',
  ATTEMPT: 'saga.attempt',
  REQUEST_ID: 'saga.request_id',
  PARTICIPANT: 'saga.participant',
  OUTCOME: 'saga.outcome',
  REASON: 'saga.reason',
});

/** Reads W3C trace context (traceparent, tracestate) from grpc-js Metadata. */
export const metadataGetter = Object.freeze({
  keys(metadata) {
    return Object.keys(metadata?.getMap?.() ?? {});
  },
  get(metadata, key) {
    const values = (metadata?.get?.(key) ?? []).filter((v) => typeof v === 'string');
    if (values.length === 0) return undefined;
    return values.length === 1 ? values[0] : values;
  },
});

/** Writes W3C trace context into grpc-js Metadata. */
export const metadataSetter = Object.freeze({
  set(metadata, key, value) {
    metadata.set(key, value);
  },
});

/**
 * The context a participant's span starts in: the active one when something (e.g. the gRPC
 * instrumentation) already opened a server span for this call, else the caller's trace
 * continued from the `traceparent` in the call's metadata.
 */
function parentOf(metadata) {
  const active = context.active();
  if (trace.getSpan(active)) return { parent: active, kind: SpanKind.INTERNAL };
  return { parent: propagation.extract(active, metadata, metadataGetter), kind: SpanKind.SERVER };
}

/**
 * Run `work(span)` inside a span named "{Operation} {action}", child of the incoming trace.
 * Without a registered tracer provider the span is a no-op.
 */
export function inParticipantSpan({ participant, operation, request, metadata }, work) {
  const { parent, kind } = parentOf(metadata);
  const tracer = trace.getTracer(TRACER_NAME);
  const attributes = {
    [Attribute.SAGA_ID]: request.saga.replace(/^sagas\//, ''),
    [Attribute.DEFINITION]: request.definition,
    [Attribute.STEP]: request.step,
    [Attribute.OPERATION]: operation.toLowerCase(),
    [Attribute.ACTION]: request.action,
    [Attribute.ATTEMPT]: request.attempt,
    [Attribute.REQUEST_ID]: request.request_id,
    [Attribute.PARTICIPANT]: participant,
    'rpc.system': 'grpc',
    'rpc.service': 'saga.v1.ParticipantService',
    'rpc.method': operation,
  };
  return tracer.startActiveSpan(
    `${operation} ${request.action}`,
    { kind, attributes },
    parent,
    async (span) => {
      try {
        return await work(span);
      } finally {
        span.end();
      }
    },
  );
}

/** Record how a call ended on its span. */
export function recordOutcome(span, outcome, { reason = '', error = null } = {}) {
  span.setAttribute(Attribute.OUTCOME, outcome);
  if (reason) span.setAttribute(Attribute.REASON, reason);
  if (error) {
    span.recordException(error);
    span.setStatus({ code: SpanStatusCode.ERROR, message: String(error.message ?? error) });
  }
}

/** Copy the active trace context into outgoing gRPC metadata (a no-op without a propagator). */
export function injectTraceContext(metadata) {
  propagation.inject(context.active(), metadata, metadataSetter);
  return metadata;
}
