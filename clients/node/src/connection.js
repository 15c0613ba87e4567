// How a client reaches a secured coordinator: TLS settings and a bearer token, given as options
// or read from the environment variables the Python SDK and the `saga` command read too:
//
//   SAGA_TARGET            host:port (default 127.0.0.1:50051)
//   SAGA_TLS_CA            CA certificates (PEM file) to trust the coordinator by
//   SAGA_TLS_CERT          this client's certificate (PEM file), for mTLS
//   SAGA_TLS_KEY           its private key (PEM file, unencrypted)
//   SAGA_TLS_SERVER_NAME   the name the coordinator's certificate carries
//   SAGA_TLS=true          TLS with the system's CAs, without any file
//   SAGA_TOKEN             the bearer token
//   SAGA_TOKEN_FILE        a file holding it, read again when it changes (rotation)
//
// Any of the TLS settings means TLS; none means plaintext. Problems throw a TypeError naming the
// variable or option at fault, never the token.

import fs from 'node:fs';
import grpc from '@grpc/grpc-js';
import { CERTIFICATE, PRIVATE_KEY, pem } from './pem.js';

/** The coordinator's address when nothing names one. */
export const DEFAULT_TARGET = '127.0.0.1:50051';

/**
 * What a client dials TLS with, in PEM (Buffers or strings); every field is optional.
 *
 * @typedef {{ca?: Buffer | string | null, certChain?: Buffer | string | null,
 *   privateKey?: Buffer | string | null, serverName?: string | null}} ClientTls
 */

/**
 * The grpc-js channel credentials and channel options of `tls`.
 *
 * @param {ClientTls} tls
 */
export function clientCredentials(tls) {
  if (tls === null || typeof tls !== 'object') {
    throw new TypeError('tls must be {ca?, certChain?, privateKey?, serverName?}');
  }
  const { ca = null, certChain = null, privateKey = null, serverName = null } = tls;
  if (privateKey != null && certChain == null) {
    throw new TypeError('tls.privateKey needs tls.certChain: a client key goes with its certificate');
  }
  if (certChain != null && privateKey == null) {
    throw new TypeError('tls.certChain needs tls.privateKey: a client certificate goes with its key');
  }
  if (serverName != null && (typeof serverName !== 'string' || !/^\S+$/.test(serverName))) {
    throw new TypeError(`tls.serverName must be a host name, got ${JSON.stringify(serverName)}`);
  }
  const credentials = grpc.credentials.createSsl(
    ca == null ? null : pem(ca, 'ca', CERTIFICATE),
    privateKey == null ? null : pem(privateKey, 'privateKey', PRIVATE_KEY),
    certChain == null ? null : pem(certChain, 'certChain', CERTIFICATE),
  );
  const channelOptions = serverName == null ? {} : { 'grpc.ssl_target_name_override': serverName };
  return { credentials, channelOptions };
}

/** `token` if it can be sent as a bearer token; else a TypeError naming `where`, never the token. */
export function checkToken(token, where) {
  if (typeof token !== 'string') throw new TypeError(`${where}: a token is a string, got ${typeof token}`);
  if (token === '') throw new TypeError(`${where}: the token is empty`);
  if (/^bearer\s/i.test(token)) {
    throw new TypeError(`${where}: give the token alone; 'Bearer ' is added to it`);
  }
  if (/\s/.test(token)) {
    throw new TypeError(
      `${where}: the token holds whitespace or a line break; a token is one word (a token file ` +
        'may end with a newline, nothing else)',
    );
  }
  if (!/^[\x21-\x7e]+$/.test(token)) {
    throw new TypeError(`${where}: the token holds a character a gRPC header cannot carry`);
  }
  return token;
}

/**
 * A function giving the `authorization` value of the next call, from a token (checked now) or
 * a function returning one (or a Promise of one), asked and checked before every call.
 */
export function bearer(token) {
  if (typeof token === 'string') {
    const value = `Bearer ${checkToken(token, 'token')}`;
    return async () => value;
  }
  if (typeof token === 'function') {
    return async () => `Bearer ${checkToken(await token(), "token: the function's answer")}`;
  }
  throw new TypeError('token must be a string, or a function returning one (or a Promise of one)');
}

/**
 * A token kept in a file (only the token, optionally with a final newline), read now, then
 * again whenever the file changes; a file that cannot be read when it changes keeps the previous
 * token (a rotation may replace it in two steps).
 */
export function tokenFile(file, where = file) {
  let stamp = null;
  let token = '';
  const load = () => {
    let text;
    let seen;
    try {
      seen = stampOf(file);
      text = fs.readFileSync(file, 'utf8');
    } catch (error) {
      throw new TypeError(`${where}: cannot read ${file}: ${error.code ?? error.message}`);
    }
    token = checkToken(text.trim(), `${where} (${file})`);
    stamp = seen;
  };
  load();
  return () => {
    let changed;
    try {
      changed = stampOf(file) !== stamp;
    } catch {
      changed = false;
    }
    if (changed) {
      try {
        load();
      } catch {
        // keep the previous token; the coordinator says whether it is still good
      }
    }
    return token;
  };
}

function stampOf(file) {
  const info = fs.statSync(file, { bigint: true });
  return `${info.mtimeNs}:${info.size}:${info.ino}`;
}

function readPem(env, variable) {
  const file = env[variable];
  if (!file) return null;
  try {
    return fs.readFileSync(file);
  } catch (error) {
    throw new TypeError(`${variable}: cannot read ${file}: ${error.code ?? error.message}`);
  }
}

function flag(env, variable) {
  const value = (env[variable] ?? '').trim().toLowerCase();
  if (['1', 'true', 'yes', 'on'].includes(value)) return true;
  if (['0', 'false', 'no', 'off', ''].includes(value)) return false;
  throw new TypeError(`${variable}: expected true or false, got ${JSON.stringify(value)}`);
}

/**
 * The target, TLS settings and token the environment names (see the variables above).
 *
 * @param {Record<string, string | undefined>} [env]
 * @returns {{target: string, tls: ClientTls | null, token: string | (() => string) | null}}
 */
export function connectionFromEnvironment(env = process.env) {
  if (env.SAGA_TLS_KEY && !env.SAGA_TLS_CERT) {
    throw new TypeError('SAGA_TLS_KEY needs SAGA_TLS_CERT: a client key goes with its certificate');
  }
  if (env.SAGA_TLS_CERT && !env.SAGA_TLS_KEY) {
    throw new TypeError('SAGA_TLS_CERT needs SAGA_TLS_KEY: a client certificate goes with its key');
  }
  const files = {
    ca: readPem(env, 'SAGA_TLS_CA'),
    certChain: readPem(env, 'SAGA_TLS_CERT'),
    privateKey: readPem(env, 'SAGA_TLS_KEY'),
  };
  const serverName = env.SAGA_TLS_SERVER_NAME || null;
  const wanted = flag(env, 'SAGA_TLS') || serverName !== null || Object.values(files).some((f) => f !== null);
  let tls = null;
  if (wanted) {
    tls = { ...files, serverName };
    const variables = { ca: 'SAGA_TLS_CA', certChain: 'SAGA_TLS_CERT', privateKey: 'SAGA_TLS_KEY' };
    try {
      clientCredentials(tls); // checked now, with the variable named
    } catch (error) {
      const field = /^tls\.(\w+)/.exec(error.message)?.[1];
      const variable = variables[field] ?? 'SAGA_TLS_SERVER_NAME';
      throw new TypeError(`${variable} (${env[variable]}): ${error.message}`);
    }
  }
  if (env.SAGA_TOKEN && env.SAGA_TOKEN_FILE) {
    throw new TypeError('set SAGA_TOKEN or SAGA_TOKEN_FILE, not both');
  }
  let token = null;
  if (env.SAGA_TOKEN) token = checkToken(env.SAGA_TOKEN, 'SAGA_TOKEN');
  else if (env.SAGA_TOKEN_FILE) token = tokenFile(env.SAGA_TOKEN_FILE, 'SAGA_TOKEN_FILE');
  return { target: env.SAGA_TARGET || DEFAULT_TARGET, tls, token };
}
