// A test kit for participants: calls handlers as the coordinator would, with no coordinator and
// no network, and checks that the barrier makes those calls safe.
//
//   import { ParticipantTestKit } from '@saga-coordinator/sdk/testing';
//   const kit = new ParticipantTestKit(accounts);          // a Participant, with its barrier
//   const step = kit.step({ action: 'OpenAccount', compensation: 'CloseAccount',
//                           input: { company: 'Acme Corp' } });
//   (await step.execute()).json();                         // { account_id: ... }
//   await step.execute({ attempt: 2 });                    // a retry: same request_id
//   await kit.checkStep({ action: 'OpenAccount', compensation: 'CloseAccount',
//                         input: { company: 'Acme Corp' },
//                         observe: (sagaId) => accountsOf(sagaId) });
//
// The coordinator sends every call at least once, retries it with the same request_id, may send
// duplicates at the same time, and may send a step's Compensate before (or instead of) its
// Execute. checkStep() plays each of those against a fresh saga and compares what `observe`
// sees of the participant's own data (its business rows for one saga) with what a single,
// orderly call leaves: any difference is an effect applied twice, or one left hanging.

import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import grpc from '@grpc/grpc-js';
import { errorFromGrpc } from './errors.js';
import { decodeJson, encodePayload } from './payload.js';
import { CODE_NAMES } from './rich_status.js';

// What the coordinator does with each answer (DESIGN.md, "How a participant's answer is read").
const TRANSIENT = new Set([
  grpc.status.UNAVAILABLE,
  grpc.status.DEADLINE_EXCEEDED,
  grpc.status.RESOURCE_EXHAUSTED,
  grpc.status.ABORTED,
  grpc.status.INTERNAL,
  grpc.status.UNKNOWN,
  grpc.status.CANCELLED,
]);

/** How the coordinator reads an answer: 'ok', 'rejected', 'retry' or 'failed'. */
export function meaningOf(code) {
  if (code === grpc.status.OK) return 'ok';
  if (code === grpc.status.FAILED_PRECONDITION) return 'rejected';
  if (TRANSIENT.has(code)) return 'retry';
  return 'failed';
}

/** One answer of the participant, as the coordinator would read it. */
export class Answer {
  constructor({ code, output = null, error = null }) {
    /** gRPC status code (0 for OK). */
    this.code = code;
    /** Its name, e.g. "FAILED_PRECONDITION". */
    this.codeName = CODE_NAMES[code] ?? String(code);
    /** What the coordinator does: 'ok', 'rejected', 'retry' or 'failed'. */
    this.meaning = meaningOf(code);
    /** An Execute's output bytes (empty for a Compensate); null when not OK. */
    this.output = output;
    /** The SagaRpcError the coordinator would read (reason, retryDelayMs...); null when OK. */
    this.error = error;
    this.reason = error?.reason ?? '';
    this.message = error?.details ?? '';
    this.retryDelayMs = error?.retryDelayMs ?? null;
    Object.freeze(this);
  }

  get ok() {
    return this.code === grpc.status.OK;
  }

  /** The output decoded from JSON (null when empty); throws when the answer is not OK. */
  json() {
    if (!this.ok) throw new Error(`the call answered ${this.codeName}: ${this.message}`);
    return decodeJson(this.output);
  }

  /** What two answers are compared by: code, reason, message and output. */
  summary() {
    return {
      code: this.codeName,
      reason: this.reason,
      message: this.message,
      output: this.output === null ? null : this.output.toString('base64'),
    };
  }
}

function encodeInput(value, raw) {
  if (raw) return Buffer.isBuffer(value) ? value : Buffer.from(value ?? []);
  return encodePayload(value);
}

/**
 * The calls of one step of one saga, with the request_ids the coordinator would send: one for
 * the Execute (identical on every retry), another for the Compensate.
 */
export class StepCalls {
  #participant;
  #lastOutput = null;

  constructor(participant, fields) {
    this.#participant = participant;
    Object.assign(this, fields);
    Object.freeze(this);
  }

  /** The ExecuteRequest of attempt `attempt`. */
  executeRequest(attempt = 1) {
    return {
      saga: `sagas/${this.sagaId}`,
      definition: this.definition,
      definition_version: this.definitionVersion,
      step: this.step,
      action: this.action,
      request_id: this.executeRequestId,
      attempt,
      input: encodeInput(this.input, this.raw),
      previous_outputs: Object.fromEntries(
        Object.entries(this.previousOutputs).map(([step, value]) => [step, encodeInput(value, this.raw)]),
      ),
    };
  }

  /**
   * The CompensateRequest of attempt `attempt`. `executeOutput`: the Execute output the
   * coordinator got (default: the last OK output of execute(); null: it got none).
   */
  compensateRequest(attempt = 1, executeOutput = this.#lastOutput) {
    if (!this.compensation) throw new TypeError(`step ${this.step} has no compensation`);
    const request = {
      saga: `sagas/${this.sagaId}`,
      definition: this.definition,
      definition_version: this.definitionVersion,
      step: this.step,
      action: this.compensation,
      request_id: this.compensateRequestId,
      execute_request_id: this.executeRequestId,
      attempt,
      input: encodeInput(this.input, this.raw),
    };
    if (executeOutput !== null && executeOutput !== undefined) {
      request.execute_output = Buffer.from(executeOutput);
      request._execute_output = 'execute_output';
    }
    return request;
  }

  /** Send the Execute (attempt 1 unless said otherwise); resolves its Answer, never rejects. */
  async execute({ attempt = 1 } = {}) {
    const answer = await this.#call('Execute', this.executeRequest(attempt));
    if (answer.ok) this.#lastOutput = answer.output;
    return answer;
  }

  /** Send the Compensate; resolves its Answer, never rejects. */
  compensate({ attempt = 1, executeOutput } = {}) {
    const request =
      executeOutput === undefined
        ? this.compensateRequest(attempt)
        : this.compensateRequest(attempt, executeOutput);
    return this.#call('Compensate', request);
  }

  /** `count` identical Executes at once, as duplicates the coordinator's retries can make. */
  executeConcurrently(count, { attempt = 1 } = {}) {
    return Promise.all(Array.from({ length: count }, () => this.execute({ attempt })));
  }

  /** `count` identical Compensates at once. */
  compensateConcurrently(count, { attempt = 1 } = {}) {
    return Promise.all(Array.from({ length: count }, () => this.compensate({ attempt })));
  }

  async #call(operation, request) {
    try {
      const response = await this.#participant.handle(operation, request);
      return new Answer({ code: grpc.status.OK, output: Buffer.from(response.output ?? []) });
    } catch (failure) {
      if (typeof failure?.code !== 'number') throw failure; // not an answer: a bug to see
      return new Answer({ code: failure.code, error: errorFromGrpc(failure) });
    }
  }
}

/**
 * Calls a Participant's handlers as the coordinator would, without a coordinator or a network.
 * Each step() is a fresh saga unless `sagaId` is given.
 */
export class ParticipantTestKit {
  #participant;
  #sagas = 0;

  /**
   * @param {import('./participant.js').Participant} participant
   * @param {{definition?: string, definitionVersion?: number, sagaPrefix?: string}} [options]
   */
  constructor(participant, { definition = 'test', definitionVersion = 1, sagaPrefix } = {}) {
    if (!participant || typeof participant.handle !== 'function') {
      throw new TypeError('the test kit needs a Participant');
    }
    this.#participant = participant;
    this.definition = definition;
    this.definitionVersion = definitionVersion;
    this.sagaPrefix = sagaPrefix ?? `kit-${randomUUID().slice(0, 8)}`;
  }

  /** A new saga id, unique within this kit. */
  newSagaId(label = 'saga') {
    this.#sagas += 1;
    return `${this.sagaPrefix}-${label}-${this.#sagas}`;
  }

  /**
   * The calls of one step. `input` and `previousOutputs` are JSON values (Buffers when `raw`).
   *
   * @param {{action: string, compensation?: string, step?: string, sagaId?: string,
   *   input?: unknown, previousOutputs?: Record<string, unknown>, raw?: boolean}} options
   */
  step({
    action,
    compensation = '',
    step = 'step-1',
    sagaId = this.newSagaId(),
    input = {},
    previousOutputs = {},
    raw = false,
  }) {
    if (!action) throw new TypeError('step() needs the Execute action');
    return new StepCalls(this.#participant, {
      sagaId,
      definition: this.definition,
      definitionVersion: this.definitionVersion,
      step,
      action,
      compensation,
      input,
      previousOutputs,
      raw,
      // Deterministic per (saga, step, operation), as the coordinator's are.
      executeRequestId: `${sagaId}/${step}/execute`,
      compensateRequestId: `${sagaId}/${step}/compensate`,
    });
  }

  /**
   * Play the coordinator's hard cases against one step and check the participant's data after
   * each, throwing an AssertionError that names the case that went wrong:
   *
   * - **retry**: the Execute sent again with the same request_id answers the same and changes
   *   nothing more;
   * - **concurrent duplicates**: `concurrency` identical Executes at once answer the same and
   *   leave what one Execute leaves;
   * - **compensation**: Execute then Compensate, the Compensate sent twice: one undo;
   * - **compensation before execution**: a Compensate for an Execute that never arrived answers
   *   OK and changes nothing; the late Execute is refused (EXECUTE_AFTER_COMPENSATE) and
   *   changes nothing.
   *
   * `observe(sagaId)` returns what the participant holds for one saga (e.g. its rows), without
   * the saga id itself, so that two sagas treated alike look alike; it may be async. Needs a
   * participant with a barrier. Resolves a report of the answers seen.
   *
   * @param {{action: string, compensation: string, step?: string, input?: unknown,
   *   previousOutputs?: Record<string, unknown>, raw?: boolean, concurrency?: number,
   *   observe: (sagaId: string) => unknown}} options
   */
  async checkStep({ observe, concurrency = 8, ...stepOptions }) {
    if (typeof observe !== 'function') throw new TypeError('checkStep() needs observe(sagaId)');
    if (!stepOptions.compensation) throw new TypeError('checkStep() needs the compensation');
    if (!this.#participant.barrier) {
      throw new TypeError('checkStep() checks the barrier: give the participant one');
    }
    const look = async (sagaId) => structuredClone(await observe(sagaId));

    // The reference: one orderly Execute on a fresh saga.
    const once = this.step({ ...stepOptions, sagaId: this.newSagaId('once') });
    const untouched = await look(once.sagaId);
    const first = await once.execute();
    assert.notEqual(
      first.meaning,
      'retry',
      `the Execute answered ${first.codeName} (${first.message}): the kit needs a definite answer`,
    );
    const applied = await look(once.sagaId);

    // Retry: same request_id, attempt 2.
    const retry = await once.execute({ attempt: 2 });
    assert.deepEqual(retry.summary(), first.summary(), 'retry: a retried Execute answers differently');
    assert.deepEqual(await look(once.sagaId), applied, 'retry: a retried Execute changed the data again');

    // Concurrent duplicates.
    const twin = this.step({ ...stepOptions, sagaId: this.newSagaId('concurrent') });
    const duplicates = await twin.executeConcurrently(concurrency);
    for (const answer of duplicates) {
      assert.deepEqual(
        answer.summary().code,
        first.summary().code,
        'concurrent duplicates: the duplicates answered differently from one Execute',
      );
      assert.deepEqual(
        answer.summary(),
        duplicates[0].summary(),
        'concurrent duplicates: the duplicates did not all get the same answer',
      );
    }
    assert.deepEqual(
      await look(twin.sagaId),
      applied,
      'concurrent duplicates: the data differs from what one Execute leaves (applied more than once?)',
    );

    // Compensation, sent twice.
    const undone = [];
    if (first.ok) {
      undone.push(await once.compensate());
      const afterUndo = await look(once.sagaId);
      undone.push(await once.compensate({ attempt: 2 }));
      for (const answer of undone) {
        assert.equal(answer.codeName, 'OK', `compensation: the Compensate answered ${answer.codeName} (${answer.message})`);
      }
      assert.deepEqual(await look(once.sagaId), afterUndo, 'compensation: a retried Compensate undid again');
    }

    // Compensation before execution.
    const early = this.step({ ...stepOptions, sagaId: this.newSagaId('early') });
    const before = await look(early.sagaId);
    const nullCompensation = await early.compensate({ executeOutput: null });
    assert.equal(
      nullCompensation.codeName,
      'OK',
      `compensation before execution: answered ${nullCompensation.codeName} (${nullCompensation.message}); a null compensation answers OK`,
    );
    assert.deepEqual(await look(early.sagaId), before, 'compensation before execution: the Compensate changed the data');
    const late = await early.execute();
    assert.equal(late.codeName, 'FAILED_PRECONDITION', `compensation before execution: the late Execute answered ${late.codeName}`);
    assert.equal(late.reason, 'EXECUTE_AFTER_COMPENSATE');
    assert.deepEqual(await look(early.sagaId), before, 'compensation before execution: the late Execute changed the data');
    assert.deepEqual(untouched, before, 'observe() of two untouched sagas differs: it must not show the saga id');

    return Object.freeze({ first, retry, duplicates, undone, nullCompensation, late });
  }
}
