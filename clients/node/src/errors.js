// The SDK's errors, and the reading of gRPC's rich error status into them.
//
//   SdkError                       root of everything the SDK throws
//   ├── SagaRpcError               the coordinator answered a non-OK status: code, ErrorInfo
//   │                              reason and domain, BadRequest field violations
//   ├── WaitTimeout                wait() gave up before the saga settled
//   └── Rejected                   thrown by a participant's handler: a business "no"
//       └── ExecuteAfterCompensate the barrier refused an Execute that came after its Compensate

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
