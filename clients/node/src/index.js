// Node.js SDK for the saga coordinator: the client, and participants with an idempotency barrier.

export { SagaClient, DEFAULT_TIMEOUT_MS, sagaName, rewatchDelayMs } from './client.js';
export { DEFAULT_TARGET, connectionFromEnvironment } from './connection.js';
export { Participant, SERVICE_NAME } from './participant.js';
export { SqliteBarrier, BarrierKey, Operation, OutcomeKind, DEFAULT_TABLE } from './barrier.js';
export { MINIMUM_RETENTION_MS, endedOn } from './retention.js';
export {
  SdkError,
  SagaRpcError,
  WaitTimeout,
  Rejected,
  ExecuteAfterCompensate,
  RetryLater,
  PermanentFailure,
  errorFromGrpc,
} from './errors.js';
export {
  Saga,
  StepRun,
  SagaState,
  StepState,
  StepKind,
  SagaEventType,
  SETTLED_STATES,
} from './model.js';
export { encodePayload, decodeJson } from './payload.js';
export { loadContract, defaultProtosDir, LOADER_OPTIONS } from './contract.js';
export { encodeStatus, decodeStatus, statusError, STATUS_DETAILS_KEY } from './rich_status.js';
export { HealthService } from './health.js';
