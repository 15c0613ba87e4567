#!/usr/bin/env node
// Copies the repository's saga.v1 contract (protos/saga/v1/*.proto) into the package, which
// ships it: an installed package reads only its own files.
//
//   npm run sync-protos           copy, replacing what drifted and removing files gone upstream
//   npm run sync-protos -- --check  change nothing; exit 1 and name the drift, if any

import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const PACKAGE_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

/** The repository's contract, the source of truth. */
export const SOURCE_DIR = path.resolve(PACKAGE_DIR, '..', '..', 'protos', 'saga', 'v1');
/** The package's copy. */
export const COPY_DIR = path.join(PACKAGE_DIR, 'protos', 'saga', 'v1');

function protoFiles(dir) {
  if (!fs.existsSync(dir)) return [];
  return fs
    .readdirSync(dir)
    .filter((name) => name.endsWith('.proto'))
    .sort();
}

/**
 * How the package's copy differs from the repository's protos: the files missing from the
 * copy, those that differ, and those the repository no longer has. Empty lists: in sync.
 */
export function protoDrift(source = SOURCE_DIR, copy = COPY_DIR) {
  const upstream = protoFiles(source);
  if (upstream.length === 0) throw new Error(`no .proto files in ${source}`);
  const copied = new Set(protoFiles(copy));
  const missing = upstream.filter((name) => !copied.has(name));
  const changed = upstream.filter(
    (name) =>
      copied.has(name) &&
      !fs.readFileSync(path.join(source, name)).equals(fs.readFileSync(path.join(copy, name))),
  );
  const extra = [...copied].filter((name) => !upstream.includes(name));
  return { missing, changed, extra };
}

/** Make the copy equal to the repository's protos; returns the drift that was repaired. */
export function syncProtos(source = SOURCE_DIR, copy = COPY_DIR) {
  const drift = protoDrift(source, copy);
  fs.mkdirSync(copy, { recursive: true });
  for (const name of [...drift.missing, ...drift.changed]) {
    fs.copyFileSync(path.join(source, name), path.join(copy, name));
  }
  for (const name of drift.extra) fs.rmSync(path.join(copy, name));
  return drift;
}

function describe({ missing, changed, extra }) {
  return [
    ...missing.map((name) => `missing: ${name}`),
    ...changed.map((name) => `differs: ${name}`),
    ...extra.map((name) => `not in the repository: ${name}`),
  ];
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const check = process.argv.includes('--check');
  const drift = check ? protoDrift() : syncProtos();
  const lines = describe(drift);
  const copy = path.relative(process.cwd(), COPY_DIR) || '.';
  if (lines.length === 0) {
    console.log(`${copy} matches the repository's protos/saga/v1`);
  } else if (check) {
    console.error(`${copy} drifted from the repository's protos/saga/v1 (npm run sync-protos):`);
    for (const line of lines) console.error(`  ${line}`);
    process.exitCode = 1;
  } else {
    for (const line of lines) console.log(`synced ${line}`);
  }
}
