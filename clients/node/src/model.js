// Typed, immutable views of the coordinator's resources, converted from their protos.

import { decodeJson } from './payload.js';

/** Where a saga stands. */
export const SagaState = Object.freeze({
  UNSPECIFIED: 'UNSPECIFIED',
  RUNNING: 'RUNNING',
  COMPENSATING: 'COMPENSATING',
  SUCCEEDED: 'SUCCEEDED',
  COMPENSATED: 'COMPENSATED',
  NEEDS_ATTENTION: 'NEEDS_ATTENTION',
});

/** The states at which WatchSaga ends and wait() returns. */
export const SETTLED_STATES = Object.freeze(
  new Set([SagaState.SUCCEEDED, SagaState.COMPENSATED, SagaState.NEEDS_ATTENTION]),
);

/** Where one step of a saga stands. */
export const StepState = Object.freeze({
  UNSPECIFIED: 'UNSPECIFIED',
  PENDING: 'PENDING',
  RUNNING: 'RUNNING',
  SUCCEEDED: 'SUCCEEDED',
  REJECTED: 'REJECTED',
  FAILED: 'FAILED',
  COMPENSATING: 'COMPENSATING',
  COMPENSATED: 'COMPENSATED',
  SKIPPED: 'SKIPPED',
});

/** The role of a step: the three kinds of saga theory. */
export const StepKind = Object.freeze({
  COMPENSATABLE: 'COMPENSATABLE',
  PIVOT: 'PIVOT',
  RETRIABLE: 'RETRIABLE',
});

/** What happened to a saga. */
export const SagaEventType = Object.freeze({
  UNSPECIFIED: 'UNSPECIFIED',
  CREATED: 'CREATED',
  STEP_SUCCEEDED: 'STEP_SUCCEEDED',
  STEP_REJECTED: 'STEP_REJECTED',
  STEP_ATTEMPT_FAILED: 'STEP_ATTEMPT_FAILED',
  STEP_FAILED: 'STEP_FAILED',
  COMPENSATION_SUCCEEDED: 'COMPENSATION_SUCCEEDED',
  COMPENSATION_ATTEMPT_FAILED: 'COMPENSATION_ATTEMPT_FAILED',
  COMPENSATION_FAILED: 'COMPENSATION_FAILED',
  CANCEL_REQUESTED: 'CANCEL_REQUESTED',
  RETRY_REQUESTED: 'RETRY_REQUESTED',
  RESUMED: 'RESUMED',
  STEP_MARKED_COMPENSATED: 'STEP_MARKED_COMPENSATED',
  STEP_COMPLETED: 'STEP_COMPLETED',
  DEADLINE_EXCEEDED: 'DEADLINE_EXCEEDED',
});

// Protobuf enums are open: an unknown number (a newer coordinator) reads as UNSPECIFIED rather
// than failing the whole conversion.
function enumValue(values, prefix, value, fallback = 'UNSPECIFIED') {
  if (typeof value !== 'string' || !value.startsWith(prefix)) return fallback;
  const name = value.slice(prefix.length);
  return Object.hasOwn(values, name) ? name : fallback;
}

function time(stamp) {
  if (!stamp) return null;
  return new Date(Number(stamp.seconds) * 1000 + Math.floor((stamp.nanos ?? 0) / 1e6));
}

/** Why a call, a step or a saga did not go as planned; null when unset. */
export function failureFromProto(f) {
  if (!f) return null;
  return Object.freeze({
    step: f.step,
    operation: f.operation,
    code: f.code,
    reason: f.reason,
    message: f.message,
  });
}

/** The record of one step of one saga. */
export class StepRun {
  constructor(fields) {
    Object.assign(this, fields);
    Object.freeze(this);
  }

  /** The output decoded as UTF-8 JSON (null when there is no output). */
  outputJson() {
    return decodeJson(this.output);
  }
}

/** One run of a saga definition. */
export class Saga {
  constructor(fields) {
    Object.assign(this, fields);
    Object.freeze(this);
  }

  /** True when the saga cannot move by itself any more (what wait() waits for). */
  get settled() {
    return SETTLED_STATES.has(this.state);
  }

  /** The input decoded as UTF-8 JSON (null when the input is empty). */
  inputJson() {
    return decodeJson(this.input);
  }

  /** The step named `name`; throws when the saga has none. */
  step(name) {
    const run = this.steps.find((s) => s.name === name);
    if (!run) throw new RangeError(`saga ${this.sagaId} has no step ${JSON.stringify(name)}`);
    return run;
  }
}

/** Convert a saga.v1.StepRun. */
export function stepFromProto(s) {
  return new StepRun({
    name: s.name,
    participant: s.participant,
    kind: enumValue(StepKind, 'STEP_KIND_', s.kind, StepKind.COMPENSATABLE),
    state: enumValue(StepState, 'STEP_STATE_', s.state),
    executeAttempts: s.execute_attempts,
    compensateAttempts: s.compensate_attempts,
    output: s._output === 'output' ? s.output : null,
    failure: failureFromProto(s.failure),
    startTime: time(s.start_time),
    endTime: time(s.end_time),
    nextAttemptTime: time(s.next_attempt_time),
  });
}

/** Convert a saga.v1.Saga. */
export function sagaFromProto(s) {
  return new Saga({
    name: s.name,
    sagaId: s.saga_id || s.name.replace(/^sagas\//, ''),
    definition: s.definition,
    definitionVersion: s.definition_version,
    state: enumValue(SagaState, 'SAGA_STATE_', s.state),
    input: s.input,
    steps: Object.freeze((s.steps ?? []).map(stepFromProto)),
    failure: failureFromProto(s.failure),
    cancelReason: s.cancel_reason,
    createTime: time(s.create_time),
    updateTime: time(s.update_time),
    endTime: time(s.end_time),
    version: Number(s.version),
    traceId: s.trace_id ?? '',
  });
}

/** Convert a saga.v1.SagaEvent; null when unset. */
export function eventFromProto(e) {
  if (!e) return null;
  return Object.freeze({
    sequence: Number(e.sequence),
    type: enumValue(SagaEventType, 'SAGA_EVENT_TYPE_', e.type),
    step: e.step,
    attempt: e.attempt,
    time: time(e.time),
    failure: failureFromProto(e.failure),
    operation: e.operation ?? '',
    action: e.action ?? '',
    emits: e.emits ?? '',
    actor: e.actor ?? '',
    reason: e.reason ?? '',
  });
}

const SETTLED_PROTO_STATES = new Set([...SETTLED_STATES].map((state) => `SAGA_STATE_${state}`));

/**
 * The saga of one WatchSaga message when it has settled, else null. The state is read from the
 * proto first, so a message in between (from a coordinator that sends every change) costs no
 * conversion.
 */
export function settledSagaFromResponse(response) {
  const saga = response?.saga;
  return saga && SETTLED_PROTO_STATES.has(saga.state) ? sagaFromProto(saga) : null;
}

/** Convert one message of a WatchSaga stream: the saga after a change, and the change. */
export function updateFromProto(response) {
  return Object.freeze({ saga: sagaFromProto(response.saga), event: eventFromProto(response.event) });
}

/** Convert a saga.v1.SagaChange: one change of the change feed, with its position. */
export function changeFromProto(c) {
  return Object.freeze({
    position: Number(c.position),
    sagaId: c.saga_id,
    definition: c.definition,
    definitionVersion: c.definition_version,
    state: enumValue(SagaState, 'SAGA_STATE_', c.state),
    event: eventFromProto(c.event),
    labels: Object.freeze({ ...(c.labels ?? {}) }),
  });
}
