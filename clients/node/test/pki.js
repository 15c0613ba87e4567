// Certificates made by the tests with the openssl command: a CA, and certificates it signs for
// 127.0.0.1 and localhost (server and client use).

import { execFileSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';

const OPENSSL_CONFIG = `
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
[leaf]
basicConstraints = critical,CA:FALSE
extendedKeyUsage = serverAuth,clientAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
`;

export function hasOpenssl() {
  try {
    execFileSync('openssl', ['version'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

/** A CA in `dir`; `issue(name)` returns a {cert, key} (PEM Buffers) it signed for 127.0.0.1. */
export function certificateAuthority(dir, name) {
  const config = path.join(dir, 'openssl.cnf');
  fs.writeFileSync(config, OPENSSL_CONFIG);
  const openssl = (...args) => execFileSync('openssl', args, { stdio: ['ignore', 'pipe', 'pipe'] });
  const newKey = (file) =>
    openssl('genpkey', '-algorithm', 'EC', '-pkeyopt', 'ec_paramgen_curve:P-256', '-out', file);
  const caKey = path.join(dir, `${name}.key`);
  const caCert = path.join(dir, `${name}.pem`);
  newKey(caKey);
  openssl(
    'req', '-x509', '-new', '-key', caKey, '-subj', `/CN=${name}`, '-days', '2',
    '-config', config, '-extensions', 'ca', '-out', caCert,
  );
  return {
    pem: fs.readFileSync(caCert),
    issue(leaf) {
      const key = path.join(dir, `${name}-${leaf}.key`);
      const csr = path.join(dir, `${name}-${leaf}.csr`);
      const cert = path.join(dir, `${name}-${leaf}.pem`);
      newKey(key);
      openssl('req', '-new', '-key', key, '-subj', `/CN=${leaf}`, '-config', config, '-out', csr);
      openssl(
        'x509', '-req', '-in', csr, '-CA', caCert, '-CAkey', caKey, '-days', '2',
        '-set_serial', `0x${crypto.randomBytes(8).toString('hex')}`,
        '-extfile', config, '-extensions', 'leaf', '-out', cert,
      );
      return { cert: fs.readFileSync(cert), key: fs.readFileSync(key) };
    },
  };
}
