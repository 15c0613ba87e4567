// Barrier retention: when the barrier rows of old calls may be deleted, the same rule as the
// Python SDK's saga_sdk.retention.
//
// A barrier row is what makes a duplicate harmless: while the row of a call exists, the call's
// repetitions (same request_id) answer the stored answer, and an Execute arriving after its
// Compensate is refused. Once the row is gone, a repetition runs the handler again. So:
//
// - prune({ olderThanMs }) deletes the rows of calls first seen more than `olderThanMs` ago and
//   keeps every row newer than that, by the database's clock;
// - the window must exceed the longest time during which the coordinator can still send a call
//   again: its retry horizon (a step's retries with their backoff and any RetryInfo wait, the
//   saga's deadline) and the time an operator may take to resume or retry a saga parked in
//   NEEDS_ATTENTION, which sends the same request_ids again;
// - a window shorter than MINIMUM_RETENTION_MS is refused, whatever the backend;
// - with `ended`, a function that says which sagas have ended, only the old rows of ended sagas
//   go: the saga ids of the old rows are asked in chunks, outside any write transaction and
//   before anything is deleted (a failing `ended` deletes nothing), and only answered ids that
//   were among them count.

const DAY_MS = 24 * 60 * 60 * 1000;

/**
 * The shortest window prune() accepts, 7 days: longer than the coordinator's retry horizon by
 * default (a RetryInfo can make it wait up to the longer of an hour and a step's max backoff),
 * with days to spare for an operator to resume a parked saga.
 */
export const MINIMUM_RETENTION_MS = 7 * DAY_MS;

/** The most saga ids given to one call of `ended`, and put into one statement. */
export const ENDED_CHUNK = 500;

/**
 * The options of prune() when they are safe; else throws a TypeError or RangeError saying why.
 *
 * @param {{olderThanMs: number, dryRun?: boolean, ended?: Function}} options
 * @returns {{olderThanMs: number, dryRun: boolean, ended: Function | null}}
 */
export function checkPruneOptions(options) {
  if (options === null || typeof options !== 'object') {
    throw new TypeError('prune() takes an options object: prune({ olderThanMs, dryRun, ended })');
  }
  const { olderThanMs, dryRun = false, ended } = options;
  if (typeof olderThanMs !== 'number') {
    throw new TypeError(
      `olderThanMs is a number of milliseconds, not ${olderThanMs === null ? 'null' : typeof olderThanMs}`,
    );
  }
  if (!Number.isFinite(olderThanMs) || olderThanMs <= 0) {
    throw new RangeError(`olderThanMs must be a positive finite number of milliseconds, not ${olderThanMs}`);
  }
  if (olderThanMs < MINIMUM_RETENTION_MS) {
    throw new RangeError(
      `a barrier retention window of ${describe(olderThanMs)} is shorter than the minimum of ` +
        `${MINIMUM_RETENTION_MS / DAY_MS} days: a duplicate arriving after the prune would apply ` +
        'again. Keep rows longer than the coordinator can resend a call (retries, saga ' +
        'deadline, operator resumes)',
    );
  }
  if (typeof dryRun !== 'boolean') throw new TypeError(`dryRun is a boolean, not ${typeof dryRun}`);
  if (ended !== undefined && ended !== null && typeof ended !== 'function') {
    throw new TypeError('ended is a function of an array of saga ids, returning those that ended');
  }
  return { olderThanMs, dryRun, ended: ended ?? null };
}

/**
 * The candidates (saga ids of old rows) that `ended` says have ended, asked in sorted chunks of
 * at most ENDED_CHUNK before anything is deleted; an id it answers that is not a candidate is
 * ignored.
 *
 * @param {(sagaIds: string[]) => Iterable<string> | Promise<Iterable<string>>} ended
 * @param {Iterable<string>} candidates
 * @returns {Promise<string[]>}
 */
export async function endedAmong(ended, candidates) {
  const asked = [...new Set(candidates)].sort();
  const candidate = new Set(asked);
  const found = new Set();
  for (const chunk of chunks(asked)) {
    const answer = await ended(chunk);
    if (answer === null || typeof answer !== 'object' || typeof answer[Symbol.iterator] !== 'function') {
      throw new TypeError('ended() must return (or resolve to) an array or a Set of saga ids');
    }
    for (const sagaId of answer) if (candidate.has(sagaId)) found.add(sagaId);
  }
  return [...found].sort();
}

/** `items` in arrays of at most ENDED_CHUNK. */
export function chunks(items) {
  const all = [...items];
  const out = [];
  for (let start = 0; start < all.length; start += ENDED_CHUNK) out.push(all.slice(start, start + ENDED_CHUNK));
  return out;
}

// A window in words, or in milliseconds when words would round it (7 days less 1 ms).
function describe(ms) {
  const [unitMs, unit] = ms >= DAY_MS ? [DAY_MS, 'day'] : ms >= 3_600_000 ? [3_600_000, 'hour'] : [1000, 'second'];
  const rounded = +(ms / unitMs).toFixed(3);
  if (Math.abs(rounded * unitMs - ms) >= 1) return `${ms} ms`;
  return `${rounded} ${unit}${rounded === 1 ? '' : 's'}`;
}

/**
 * An `ended` for prune() that asks the coordinator a SagaClient reaches, one GetSaga per saga:
 * a saga has ended when it is SUCCEEDED or COMPENSATED, or when the coordinator no longer knows
 * it (NOT_FOUND: it prunes only ended sagas; so ask the coordinator that calls this
 * participant). Any other error rejects, and prune() then deletes nothing. A saga parked in
 * NEEDS_ATTENTION keeps its rows, however old: the Compensate an operator's resume sends later
 * must still find its Execute.
 *
 * @param {{get(sagaId: string): Promise<{state: string}>}} client a SagaClient
 * @returns {(sagaIds: string[]) => Promise<string[]>}
 */
export function endedOn(client) {
  if (client === null || typeof client !== 'object' || typeof client.get !== 'function') {
    throw new TypeError('endedOn() takes a SagaClient');
  }
  return async (sagaIds) => {
    const ended = [];
    for (const sagaId of sagaIds) {
      let state;
      try {
        ({ state } = await client.get(sagaId));
      } catch (error) {
        if (error?.codeName === 'NOT_FOUND') {
          ended.push(sagaId);
          continue;
        }
        throw error;
      }
      if (state === 'SUCCEEDED' || state === 'COMPENSATED') ended.push(sagaId);
    }
    return ended;
  };
}
