// PEM checks shared by what serves TLS (participants) and what dials it (the client): a field
// that holds the wrong thing is refused with its name before gRPC sees it.

export const CERTIFICATE = /-----BEGIN CERTIFICATE-----/;
// gRPC reads unencrypted keys only: PKCS#8, or the traditional EC and RSA forms.
export const PRIVATE_KEY = /-----BEGIN (RSA |EC )?PRIVATE KEY-----/;

/** `value` (a Buffer or a string) as a Buffer, if it holds `block`; else a TypeError naming `tls.${field}`. */
export function pem(value, field, block) {
  if (typeof value !== 'string' && !(value instanceof Uint8Array)) {
    throw new TypeError(`tls.${field} must be PEM, as a Buffer or a string`);
  }
  const bytes = Buffer.from(value);
  if (!block.test(bytes.toString('latin1'))) {
    const kind = block === PRIVATE_KEY ? 'unencrypted private key' : 'certificate';
    throw new TypeError(`tls.${field} holds no PEM ${kind}`);
  }
  return bytes;
}
