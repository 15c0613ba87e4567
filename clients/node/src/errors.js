// The SDK's errors, and the reading of gRPC's rich error status into them.
//
//   SdkError                       root of everything the SDK throws
//   ├── SagaRpcError               the coordinator answered a non-OK status: code, ErrorInfo
//   │                              reason and domain, BadRequest field violations
//   ├── WaitTimeout                wait() gave up before the saga settled
//   ├── Rejected                   thrown by a participant's handler: a business "no"
//   │   └── ExecuteAfterCompensate the barrier refused an Execute that came after its Compensate
//   ├── RetryLater                 thrown by a handler: transient, try again after a delay
//   └── PermanentFailure           thrown by a handler: this request can never succeed
//
// A participant's handler steers the coordinator with what it throws (the contract's table "How
// a participant's answer is read"; the Python SDK maps its exceptions of the same names alike):
//
//   Rejected(reason, message)                  -> FAILED_PRECONDITION + ErrorInfo(reason):
//                                                 business "no", not retried, the saga compensates
//   RetryLater(message, {retryAfterMs, reason}) -> UNAVAILABLE + RetryInfo + ErrorInfo(reason):
//                                                 transient, retried no sooner than retryAfterMs
//   PermanentFailure(message, {reason})        -> INVALID_ARGUMENT + ErrorInfo(reason): the step
//                                                 fails at once, no retry, the saga compensates
//   anything else                              -> INTERNAL + ErrorInfo(HANDLER_FAILED): transient

import { CODE_NAMES, statusFromMetadata } from './rich_status.js';

// ErrorInfo.reason's documented shape: UPPER_SNAKE.
const REASON = /^[A-Z][A-Z0-9_]*[A-Z0-9]$/;

/** Root of every error the SDK throws. */
export class SdkError extends Error {
  constructor(message, options) {
    super(message, options);
    this.name = new.target.name;
  }
}

/**
 * The coordinator (or any gRPC peer) answered with a non-OK status.
 *
 * `code` is the numeric gRPC status code and `codeName` its name ("NOT_FOUND"); `reason`,
 * `domain` and `errorMetadata` come from the status' ErrorInfo ("" and {} when it had none),
 * `fieldViolations` from its BadRequest, `retryDelayMs` from its RetryInfo.
 */
export class SagaRpcError extends SdkError {
  constructor(
    code,
    details,
    {
      reason = '',
      domain = '',
      errorMetadata = {},
      fieldViolations = [],
      retryDelayMs = null,
      metadata = null,
      cause,
    } = {},
  ) {
    const codeName = CODE_NAMES[code] ?? String(code);
    super(`${codeName}: ${details}${reason ? ` [${reason}]` : ''}`, cause ? { cause } : undefined);
    this.code = code;
    this.codeName = codeName;
    this.details = details;
    this.reason = reason;
    this.domain = domain;
    this.errorMetadata = Object.freeze({ ...errorMetadata });
    this.fieldViolations = Object.freeze(fieldViolations.map((v) => Object.freeze({ ...v })));
    this.retryDelayMs = retryDelayMs;
    /** The call's trailing metadata (a grpc.Metadata), when there was one. */
    this.metadata = metadata;
  }
}

/**
 * Translate a failed grpc-js call (a ServiceError: code, details, metadata) into a SagaRpcError,
 * with the google.rpc.Status from its `grpc-status-details-bin` trailer parsed.
 */
export function errorFromGrpc(error) {
  if (error instanceof SagaRpcError) return error;
  const status = statusFromMetadata(error?.metadata);
  return new SagaRpcError(error?.code ?? 2, error?.details ?? String(error?.message ?? error), {
    reason: status?.errorInfo?.reason ?? '',
    domain: status?.errorInfo?.domain ?? '',
    errorMetadata: status?.errorInfo?.metadata ?? {},
    fieldViolations: status?.fieldViolations ?? [],
    retryDelayMs: status?.retryDelayMs ?? null,
    metadata: error?.metadata ?? null,
    cause: error,
  });
}

/** `wait()` gave up before the saga settled. */
export class WaitTimeout extends SdkError {
  constructor(sagaId, timeoutMs) {
    super(`saga ${JSON.stringify(sagaId)} did not settle within ${timeoutMs} ms`);
    this.sagaId = sagaId;
    this.timeoutMs = timeoutMs;
  }
}

/**
 * A business "no", thrown by a participant's handler: nothing was applied.
 *
 * The participant answers FAILED_PRECONDITION with an ErrorInfo carrying `reason` (UPPER_SNAKE,
 * e.g. "NO_FUNDS") and the participant's name as domain; the coordinator then compensates the
 * saga instead of retrying. `message` (default: the reason) is the status' text.
 */
export class Rejected extends SdkError {
  constructor(reason, message = '') {
    if (typeof reason !== 'string' || !REASON.test(reason)) {
      throw new TypeError(
        `a rejection's reason is UPPER_SNAKE, e.g. NO_FUNDS: ${JSON.stringify(reason)}`,
      );
    }
    super(message || reason);
    this.reason = reason;
  }
}

/** The barrier refused an Execute whose Compensate had already been answered. */
export class ExecuteAfterCompensate extends Rejected {
  static REASON = 'EXECUTE_AFTER_COMPENSATE';

  constructor(message = '') {
    super(
      ExecuteAfterCompensate.REASON,
      message || 'this step was compensated before its Execute arrived; nothing applied',
    );
  }
}

/**
 * Thrown by a participant's handler: not now, try again in `retryAfterMs` milliseconds.
 *
 * The participant answers UNAVAILABLE with a google.rpc.RetryInfo (retry_delay = retryAfterMs)
 * and an ErrorInfo carrying `reason` (default RETRY_LATER); the coordinator retries the same
 * request_id no sooner than that (it caps how long one answer can make it wait). The barrier
 * stores nothing: the retry runs the handler again. For a dependency that is down, a rate
 * limit, a resource still being prepared.
 */
export class RetryLater extends SdkError {
  static DEFAULT_REASON = 'RETRY_LATER';

  /**
   * @param {string} message
   * @param {{retryAfterMs: number, reason?: string}} options
   */
  constructor(message, { retryAfterMs, reason = RetryLater.DEFAULT_REASON } = {}) {
    if (typeof retryAfterMs !== 'number' || !Number.isFinite(retryAfterMs) || retryAfterMs <= 0) {
      throw new TypeError(
        `RetryLater needs retryAfterMs, a positive number of milliseconds: ${String(retryAfterMs)}`,
      );
    }
    checkReason(reason, 'RetryLater');
    super(message || reason);
    this.reason = reason;
    this.retryAfterMs = retryAfterMs;
  }
}

/**
 * Thrown by a participant's handler: this request can never be done here; do not retry it.
 *
 * The participant answers INVALID_ARGUMENT with an ErrorInfo carrying `reason` (default
 * PERMANENT_FAILURE). The coordinator reads any code outside the business "no" and the
 * transient ones as a failure it does not retry: the step fails at once and the saga
 * compensates. Unlike Rejected (a "no" about the current state, e.g. no funds), it says the
 * request itself is unusable (e.g. a currency this service does not handle). With a barrier, an
 * Execute's permanent failure is stored and answered again to its duplicates.
 */
export class PermanentFailure extends SdkError {
  static DEFAULT_REASON = 'PERMANENT_FAILURE';

  /**
   * @param {string} message
   * @param {{reason?: string}} [options]
   */
  constructor(message, { reason = PermanentFailure.DEFAULT_REASON } = {}) {
    checkReason(reason, 'PermanentFailure');
    super(message || reason);
    this.reason = reason;
  }
}

function checkReason(reason, what) {
  if (typeof reason !== 'string' || !REASON.test(reason)) {
    throw new TypeError(
      `a ${what}'s reason is UPPER_SNAKE, e.g. LEDGER_DOWN: ${JSON.stringify(reason)}`,
    );
  }
}
