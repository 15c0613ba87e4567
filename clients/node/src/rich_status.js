// Encodes and decodes the google.rpc.Status that gRPC carries in `grpc-status-details-bin`.

import path from 'node:path';
import grpc from '@grpc/grpc-js';
import protobuf from 'protobufjs';
import { BUNDLED_PROTOS_DIR } from './contract.js';

/** The trailing metadata key under which gRPC carries a serialized google.rpc.Status. */
export const STATUS_DETAILS_KEY = 'grpc-status-details-bin';

const TYPE_URL_PREFIX = 'type.googleapis.com/';

const root = new protobuf.Root();
// keepCase: the field names are the .proto's (type_url, field_violations, retry_delay).
root.loadSync(
  [
    path.join(BUNDLED_PROTOS_DIR, 'google/rpc/status.proto'),
    path.join(BUNDLED_PROTOS_DIR, 'google/rpc/error_details.proto'),
  ],
  { keepCase: true },
);
const Status = root.lookupType('google.rpc.Status');
const ErrorInfo = root.lookupType('google.rpc.ErrorInfo');
const BadRequest = root.lookupType('google.rpc.BadRequest');
const RetryInfo = root.lookupType('google.rpc.RetryInfo');

/** Status code names by number, e.g. 9 -> "FAILED_PRECONDITION". */
export const CODE_NAMES = Object.freeze(
  Object.fromEntries(
    Object.entries(grpc.status)
      .filter(([, code]) => typeof code === 'number')
      .map(([name, code]) => [code, name]),
  ),
);

function pack(type, value) {
  return {
    type_url: TYPE_URL_PREFIX + type.fullName.replace(/^\./, ''),
    value: type.encode(type.fromObject(value)).finish(),
  };
}

/**
 * Serialize a google.rpc.Status.
 *
 * @param {object} status
 * @param {number} status.code gRPC status code
 * @param {string} status.message the same text as the call's status details
 * @param {{reason: string, domain?: string, metadata?: Record<string, string>}} [status.errorInfo]
 * @param {{field: string, description: string}[]} [status.fieldViolations] sent as a BadRequest
 * @param {number} [status.retryDelayMs] sent as a RetryInfo
 * @returns {Buffer}
 */
export function encodeStatus({ code, message, errorInfo, fieldViolations, retryDelayMs }) {
  const details = [];
  if (errorInfo) {
    details.push(
      pack(ErrorInfo, {
        reason: errorInfo.reason,
        domain: errorInfo.domain ?? '',
        metadata: errorInfo.metadata ?? {},
      }),
    );
  }
  if (fieldViolations && fieldViolations.length > 0) {
    details.push(pack(BadRequest, { field_violations: fieldViolations }));
  }
  if (retryDelayMs !== undefined && retryDelayMs !== null) {
    const seconds = Math.floor(retryDelayMs / 1000);
    const nanos = Math.round((retryDelayMs - seconds * 1000) * 1e6);
    details.push(pack(RetryInfo, { retry_delay: { seconds, nanos } }));
  }
  return Buffer.from(Status.encode(Status.fromObject({ code, message, details })).finish());
}

/**
 * Parse a serialized google.rpc.Status; null when the bytes are not one. Details of other types
 * are skipped.
 *
 * @param {Uint8Array} bytes
 */
export function decodeStatus(bytes) {
  let status;
  try {
    status = Status.decode(bytes);
  } catch {
    return null;
  }
  const result = {
    code: status.code,
    message: status.message,
    errorInfo: null,
    fieldViolations: [],
    retryDelayMs: null,
  };
  for (const detail of status.details) {
    const type = detail.type_url.slice(detail.type_url.lastIndexOf('/') + 1);
    try {
      if (type === 'google.rpc.ErrorInfo') {
        const info = ErrorInfo.decode(detail.value);
        result.errorInfo = {
          reason: info.reason,
          domain: info.domain,
          metadata: { ...info.metadata },
        };
      } else if (type === 'google.rpc.BadRequest') {
        const bad = BadRequest.decode(detail.value);
        for (const v of bad.field_violations) {
          result.fieldViolations.push({ field: v.field, description: v.description });
        }
      } else if (type === 'google.rpc.RetryInfo') {
        const delay = RetryInfo.decode(detail.value).retry_delay;
        if (delay) result.retryDelayMs = Number(delay.seconds) * 1000 + delay.nanos / 1e6;
      }
    } catch {
      // One garbled detail must not hide the others, nor the status itself.
    }
  }
  return result;
}

/** The google.rpc.Status in a call's trailing metadata, parsed; null when there is none. */
export function statusFromMetadata(metadata) {
  const values = metadata?.get?.(STATUS_DETAILS_KEY) ?? [];
  for (const value of values) {
    if (Buffer.isBuffer(value)) return decodeStatus(value);
  }
  return null;
}

/**
 * A grpc-js error answer ({code, details, metadata}) carrying the rich status in its trailers,
 * ready for a unary callback or `call.destroy()`.
 *
 * @param {number} code
 * @param {string} message
 * @param {Omit<Parameters<typeof encodeStatus>[0], 'code' | 'message'>} [extra]
 */
export function statusError(code, message, extra = {}) {
  const metadata = new grpc.Metadata();
  metadata.set(STATUS_DETAILS_KEY, encodeStatus({ code, message, ...extra }));
  return { code, details: message, metadata };
}
