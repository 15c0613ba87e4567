// The package ships the saga.v1 contract: its copy must equal the repository's protos/, and the
// SDK must read only files inside the package.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { COPY_DIR, SOURCE_DIR, protoDrift, syncProtos } from '../scripts/sync-protos.js';
import { BUNDLED_PROTOS_DIR, PACKAGE_DIR } from '../src/contract.js';
import { defaultProtosDir, loadContract } from '../src/index.js';
import { tempDir } from './helpers.js';

test("the package's copy of protos/saga/v1 equals the repository's (npm run sync-protos)", () => {
  assert.deepEqual(protoDrift(), { missing: [], changed: [], extra: [] });
  assert.deepEqual(fs.readdirSync(COPY_DIR).sort(), fs.readdirSync(SOURCE_DIR).sort());
});

test('the drift check names a changed, a missing and an extra file, and sync repairs them', (t) => {
  const dir = tempDir(t);
  const source = path.join(dir, 'source');
  const copy = path.join(dir, 'copy');
  fs.mkdirSync(source);
  fs.mkdirSync(copy);
  fs.writeFileSync(path.join(source, 'a.proto'), 'syntax = "proto3";\n');
  fs.writeFileSync(path.join(source, 'b.proto'), 'syntax = "proto3";\n');
  fs.writeFileSync(path.join(copy, 'a.proto'), 'syntax = "proto3"; // edited\n');
  fs.writeFileSync(path.join(copy, 'gone.proto'), '');
  assert.deepEqual(protoDrift(source, copy), {
    missing: ['b.proto'],
    changed: ['a.proto'],
    extra: ['gone.proto'],
  });
  syncProtos(source, copy);
  assert.deepEqual(protoDrift(source, copy), { missing: [], changed: [], extra: [] });
  assert.throws(() => protoDrift(path.join(dir, 'nowhere'), copy), /no \.proto files/);
});

test('the contract is read from inside the package unless SAGA_PROTOS_DIR says otherwise', () => {
  const saved = process.env.SAGA_PROTOS_DIR;
  delete process.env.SAGA_PROTOS_DIR;
  try {
    assert.equal(defaultProtosDir(), BUNDLED_PROTOS_DIR);
    assert.ok(BUNDLED_PROTOS_DIR.startsWith(PACKAGE_DIR + path.sep));
    const contract = loadContract();
    assert.equal(contract.protosDir, BUNDLED_PROTOS_DIR);
    assert.ok(contract.participantService.Execute);
  } finally {
    if (saved !== undefined) process.env.SAGA_PROTOS_DIR = saved;
  }
});

test('every file the package ships is listed in package.json files, and nothing reads ../../protos', () => {
  const pkg = JSON.parse(fs.readFileSync(path.join(PACKAGE_DIR, 'package.json'), 'utf8'));
  assert.equal(pkg.private, undefined, 'the package is publishable');
  assert.ok(pkg.files.includes('protos'));
  for (const file of fs.readdirSync(path.join(PACKAGE_DIR, 'src'))) {
    const text = fs.readFileSync(path.join(PACKAGE_DIR, 'src', file), 'utf8');
    assert.doesNotMatch(text, /'\.\.', '\.\.'|\.\.\/\.\.\/protos/, `${file} reaches outside the package`);
  }
});
