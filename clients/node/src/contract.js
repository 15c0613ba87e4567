// Loads the saga.v1 contract that ships inside the package (protos/), with @grpc/proto-loader.

import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';

/** The package's own directory. */
export const PACKAGE_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

/**
 * The protos shipped with the package: saga.v1 (a copy of the repository's protos/saga/v1, kept
 * equal by `npm run sync-protos` and checked by the tests), google.rpc and grpc.health.v1.
 */
export const BUNDLED_PROTOS_DIR = path.join(PACKAGE_DIR, 'protos');

/**
 * Where saga/v1/*.proto are read from unless a caller says otherwise: $SAGA_PROTOS_DIR, else
 * the copy inside the package.
 */
export function defaultProtosDir() {
  return process.env.SAGA_PROTOS_DIR || BUNDLED_PROTOS_DIR;
}

/**
 * How messages are converted: field names as in the .proto (snake_case), 64-bit integers as
 * numbers (saga versions and sequences stay far below 2^53), enums as their names, bytes as
 * Buffers, unset scalars as their defaults, and the name of the set field of each oneof (proto3
 * `optional` fields are synthetic oneofs: `_execute_output` says whether execute_output is set).
 */
export const LOADER_OPTIONS = Object.freeze({
  keepCase: true,
  longs: Number,
  enums: String,
  bytes: Buffer,
  defaults: true,
  oneofs: true,
});

const SAGA_FILES = ['saga/v1/participant_service.proto', 'saga/v1/coordinator_service.proto'];

const loaded = new Map();

/**
 * Load the contract once per protos directory and return its services and client constructors.
 *
 * @param {string} [protosDir] directory holding saga/v1/*.proto; see defaultProtosDir().
 */
export function loadContract(protosDir = defaultProtosDir()) {
  const dir = path.resolve(protosDir);
  const known = loaded.get(dir);
  if (known) return known;
  if (!fs.existsSync(path.join(dir, SAGA_FILES[0]))) {
    throw new Error(
      `saga.v1 protos not found in ${dir} (expected ${SAGA_FILES[0]}); ` +
        'pass protosDir or set SAGA_PROTOS_DIR',
    );
  }
  const definition = protoLoader.loadSync(SAGA_FILES, { ...LOADER_OPTIONS, includeDirs: [dir] });
  const health = protoLoader.loadSync('grpc/health/v1/health.proto', {
    ...LOADER_OPTIONS,
    includeDirs: [BUNDLED_PROTOS_DIR],
  });
  const participantService = definition['saga.v1.ParticipantService'];
  const coordinatorService = definition['saga.v1.CoordinatorService'];
  const healthService = health['grpc.health.v1.Health'];
  const contract = Object.freeze({
    protosDir: dir,
    definition,
    participantService,
    coordinatorService,
    healthService,
    ParticipantClient: grpc.makeGenericClientConstructor(
      participantService,
      'saga.v1.ParticipantService',
    ),
    CoordinatorClient: grpc.makeGenericClientConstructor(
      coordinatorService,
      'saga.v1.CoordinatorService',
    ),
    HealthClient: grpc.makeGenericClientConstructor(healthService, 'grpc.health.v1.Health'),
  });
  loaded.set(dir, contract);
  return contract;
}
