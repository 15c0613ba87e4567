// Types of @saga-coordinator/sdk/testing: calls handlers as the coordinator would.

import type { Participant, SagaRpcError } from './index.js';

/** How the coordinator reads an answer's code. */
export type Meaning = 'ok' | 'rejected' | 'retry' | 'failed';
export function meaningOf(code: number): Meaning;

/** One answer of the participant, as the coordinator would read it. */
export class Answer {
  readonly code: number;
  readonly codeName: string;
  readonly meaning: Meaning;
  readonly ok: boolean;
  /** An Execute's output bytes (empty for a Compensate); null when not OK. */
  readonly output: Buffer | null;
  readonly error: SagaRpcError | null;
  readonly reason: string;
  readonly message: string;
  readonly retryDelayMs: number | null;
  /** The output decoded from JSON; throws when the answer is not OK. */
  json(): any;
  summary(): { code: string; reason: string; message: string; output: string | null };
}

export interface StepOptions {
  /** The Execute action. */
  action: string;
  compensation?: string;
  /** Default "step-1". */
  step?: string;
  /** Default: a fresh saga id. */
  sagaId?: string;
  /** The saga input: a JSON value, or a Buffer when raw. */
  input?: unknown;
  previousOutputs?: Record<string, unknown>;
  raw?: boolean;
}

/** The calls of one step of one saga, with the coordinator's request_ids. */
export class StepCalls {
  readonly sagaId: string;
  readonly step: string;
  readonly action: string;
  readonly compensation: string;
  readonly executeRequestId: string;
  readonly compensateRequestId: string;
  execute(options?: { attempt?: number }): Promise<Answer>;
  /** `executeOutput`: what the coordinator got from the Execute (default: the last OK output). */
  compensate(options?: { attempt?: number; executeOutput?: Uint8Array | null }): Promise<Answer>;
  executeConcurrently(count: number, options?: { attempt?: number }): Promise<Answer[]>;
  compensateConcurrently(count: number, options?: { attempt?: number }): Promise<Answer[]>;
}

export interface CheckStepOptions extends Omit<StepOptions, 'sagaId' | 'compensation'> {
  compensation: string;
  /** What the participant holds for one saga, without the saga id itself. */
  observe: (sagaId: string) => unknown;
  /** Concurrent duplicates sent at once. Default 8. */
  concurrency?: number;
}

export interface CheckReport {
  readonly first: Answer;
  readonly retry: Answer;
  readonly duplicates: readonly Answer[];
  readonly undone: readonly Answer[];
  readonly nullCompensation: Answer;
  readonly late: Answer;
}

/** Calls a Participant's handlers as the coordinator would, without a coordinator or network. */
export class ParticipantTestKit {
  constructor(
    participant: Participant<any>,
    options?: { definition?: string; definitionVersion?: number; sagaPrefix?: string },
  );
  readonly sagaPrefix: string;
  newSagaId(label?: string): string;
  step(options: StepOptions): StepCalls;
  /**
   * Retries, concurrent duplicates, a repeated Compensate, and a Compensate before its Execute,
   * each checked against what `observe` sees; throws an AssertionError naming the failed case.
   */
  checkStep(options: CheckStepOptions): Promise<CheckReport>;
}
