// Payloads are opaque bytes on the wire; these are the SDK's JSON conveniences on top.

const utf8 = new TextDecoder('utf-8', { fatal: true });

/**
 * Encode a payload: a Buffer or Uint8Array as it is, null or undefined as empty, anything else
 * as UTF-8 JSON.
 *
 * @param {unknown} value
 * @returns {Buffer}
 */
export function encodePayload(value) {
  if (value === null || value === undefined) return Buffer.alloc(0);
  if (Buffer.isBuffer(value)) return value;
  if (value instanceof Uint8Array) return Buffer.from(value.buffer, value.byteOffset, value.length);
  const text = JSON.stringify(value);
  if (text === undefined) {
    throw new TypeError(`a payload must be JSON-serialisable, not ${typeof value}`);
  }
  return Buffer.from(text, 'utf8');
}

/**
 * Decode a UTF-8 JSON payload; an empty payload is null. Throws (SyntaxError or TypeError) on a
 * payload that is not UTF-8 JSON.
 *
 * @param {Uint8Array | null | undefined} payload
 */
export function decodeJson(payload) {
  if (!payload || payload.length === 0) return null;
  return JSON.parse(utf8.decode(payload));
}
