// The idempotency barrier: applies each Execute and Compensate once, in the business transaction.

package main

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"

	// The SQLite driver (cgo, linked against the system's libsqlite3).
	_ "github.com/mattn/go-sqlite3"
)

// Laid out like the Python and Node.js SDKs' barrier table, so that barrier rows read alike
// whatever language wrote them; without their 'failed' state, which this participant never
// writes (it has no permanent failure that is stored).
const barrierSchema = `
CREATE TABLE IF NOT EXISTS saga_barrier (
    saga_id    TEXT NOT NULL,
    step       TEXT NOT NULL,
    operation  TEXT NOT NULL CHECK (operation IN ('execute', 'compensate')),
    request_id TEXT NOT NULL,
    state      TEXT NOT NULL CHECK (state IN ('pending', 'done', 'rejected', 'blocked')),
    output     BLOB,
    reason     TEXT NOT NULL DEFAULT '',
    message    TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (saga_id, step, operation, request_id)
) STRICT`

const (
	claimSQL = `INSERT INTO saga_barrier (saga_id, step, operation, request_id, state)
		VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING`
	readSQL = `SELECT state, output, reason, message FROM saga_barrier
		WHERE saga_id = ? AND step = ? AND operation = ? AND request_id = ?`
	recordSQL = `UPDATE saga_barrier SET state = ?, output = ?, reason = ?, message = ?
		WHERE saga_id = ? AND step = ? AND operation = ? AND request_id = ?`
)

// Barrier row states. Pending is only ever seen inside the transaction that wrote it.
const (
	statePending  = "pending"
	stateDone     = "done"
	stateRejected = "rejected"
	// stateBlocked is the marker a null compensation leaves under its Execute's request_id.
	stateBlocked = "blocked"
)

// Operation names which call of the contract a barrier row records.
type Operation string

// The contract's two calls.
const (
	OpExecute    Operation = "execute"
	OpCompensate Operation = "compensate"
)

// Key identifies one call: the saga, the step, the operation and its request_id.
type Key struct {
	SagaID    string
	Step      string
	Operation Operation
	RequestID string
	// ExecuteRequestID is, for a Compensate, the request_id of the Execute it undoes.
	ExecuteRequestID string
}

func (k Key) params() []any {
	return []any{k.SagaID, k.Step, string(k.Operation), k.RequestID}
}

func (k Key) executeKey() Key {
	return Key{SagaID: k.SagaID, Step: k.Step, Operation: OpExecute, RequestID: k.ExecuteRequestID}
}

func (k Key) validate() error {
	if k.RequestID == "" {
		return errors.New("request_id must not be empty")
	}
	if k.Operation == OpCompensate && k.ExecuteRequestID == "" {
		return errors.New("a Compensate needs the execute_request_id it undoes")
	}
	if k.Operation != OpExecute && k.Operation != OpCompensate {
		return fmt.Errorf("unknown operation %q", k.Operation)
	}
	return nil
}

// Refusal is a business "no": nothing was applied. The participant answers it with
// FAILED_PRECONDITION and an ErrorInfo carrying Reason.
type Refusal struct {
	Reason  string
	Message string
}

func (r *Refusal) Error() string { return r.Reason + ": " + r.Message }

// ReasonExecuteAfterCompensate is the refusal of an Execute whose Compensate was answered first.
const ReasonExecuteAfterCompensate = "EXECUTE_AFTER_COMPENSATE"

// OutcomeKind says how the barrier answered a call.
type OutcomeKind string

// The barrier's successful answers.
const (
	// Applied: the effect ran and committed now.
	Applied OutcomeKind = "applied"
	// Replayed: a repeated call, answered with the first answer without running the effect.
	Replayed OutcomeKind = "replayed"
	// NullCompensation: a Compensate whose Execute never took effect; nothing ran.
	NullCompensation OutcomeKind = "null_compensation"
)

// Outcome is the barrier's successful answer to a call; a refusal is returned as *Refusal.
type Outcome struct {
	Output []byte
	Kind   OutcomeKind
}

// Effect is a business effect: it writes on the barrier's transaction (and never commits it)
// and returns the call's output, or a *Refusal for a business "no".
type Effect func(tx *sql.Tx) ([]byte, error)

// Barrier keeps, in the participant's own SQLite file, one row per call it answered:
//
//   - a repeated call (same request_id) does not run the effect again: it gets the first
//     answer, the output or the refusal;
//   - a Compensate whose Execute never took effect runs nothing and answers OK (a null
//     compensation), and leaves a marker under the Execute's request_id, so that the Execute,
//     arriving late, is refused and applies nothing;
//   - concurrent duplicates wait for SQLite's write lock and then replay the first answer;
//   - a refused Execute rolls its writes back and the refusal is remembered; a refused
//     Compensate rolls everything back and is not remembered (nothing was undone, and the same
//     compensation may be sent again once its cause is fixed);
//   - any other error rolls everything back and leaves no row: a retry runs afresh.
type Barrier struct {
	db *sql.DB
}

// OpenBarrier opens (or creates) the SQLite file at path, in WAL mode with synchronous=FULL so
// that an answered call is on disk, and creates the barrier's table when it is missing.
func OpenBarrier(path string) (*Barrier, error) {
	if path == "" {
		return nil, errors.New("the database path is empty")
	}
	// _txlock=immediate: every transaction takes the write lock at BEGIN, so that concurrent
	// duplicates queue there (up to the busy timeout) instead of failing at their first write.
	query := url.Values{
		"_txlock":       {"immediate"},
		"_busy_timeout": {"30000"},
		"_journal_mode": {"WAL"},
		"_synchronous":  {"FULL"},
	}
	db, err := sql.Open("sqlite3", "file:"+url.PathEscape(path)+"?"+query.Encode())
	if err != nil {
		return nil, err
	}
	if _, err := db.Exec(barrierSchema); err != nil {
		db.Close()
		return nil, fmt.Errorf("create the barrier table in %s: %w", path, err)
	}
	return &Barrier{db: db}, nil
}

// DB is the database the barrier lives in, for the participant's business tables.
func (b *Barrier) DB() *sql.DB { return b.db }

// Close closes the database.
func (b *Barrier) Close() error { return b.db.Close() }

type storedAnswer struct {
	state   string
	output  []byte
	reason  string
	message string
}

func read(ctx context.Context, tx *sql.Tx, key Key) (storedAnswer, error) {
	var a storedAnswer
	err := tx.QueryRowContext(ctx, readSQL, key.params()...).Scan(&a.state, &a.output, &a.reason, &a.message)
	if errors.Is(err, sql.ErrNoRows) {
		return a, fmt.Errorf("the barrier row of %+v vanished inside its transaction", key)
	}
	return a, err
}

func replay(key Key, a storedAnswer) (Outcome, error) {
	switch {
	case a.state == stateDone:
		return Outcome{Output: a.output, Kind: Replayed}, nil
	case a.state == stateRejected:
		return Outcome{}, &Refusal{Reason: a.reason, Message: a.message}
	case a.state == stateBlocked && key.Operation == OpExecute:
		return Outcome{}, &Refusal{
			Reason:  ReasonExecuteAfterCompensate,
			Message: "this step was compensated before its Execute arrived; nothing applied",
		}
	case a.state == stateBlocked:
		return Outcome{Output: []byte{}, Kind: Replayed}, nil
	}
	return Outcome{}, fmt.Errorf("the barrier row of %+v is in unexpected state %q", key, a.state)
}

func record(ctx context.Context, tx *sql.Tx, key Key, state string, output []byte, reason, message string) error {
	args := append([]any{state, output, reason, message}, key.params()...)
	_, err := tx.ExecContext(ctx, recordSQL, args...)
	return err
}

// Run applies effect once for key, in one transaction with the barrier row; see Barrier.
func (b *Barrier) Run(ctx context.Context, key Key, effect Effect) (outcome Outcome, err error) {
	if err := key.validate(); err != nil {
		return Outcome{}, err
	}
	tx, err := b.db.BeginTx(ctx, nil)
	if err != nil {
		return Outcome{}, err
	}
	committed := false
	defer func() {
		if !committed {
			tx.Rollback()
		}
	}()
	commit := func() error {
		committed = true
		return tx.Commit()
	}

	claimed, err := tx.ExecContext(ctx, claimSQL, append(key.params(), statePending)...)
	if err != nil {
		return Outcome{}, err
	}
	if n, err := claimed.RowsAffected(); err != nil {
		return Outcome{}, err
	} else if n == 0 {
		// A call with this request_id committed first (BEGIN IMMEDIATE waited for it).
		answer, err := read(ctx, tx, key)
		if err != nil {
			return Outcome{}, err
		}
		return replay(key, answer)
	}

	if key.Operation == OpCompensate {
		execute := key.executeKey()
		// Claiming the Execute's key both detects an Execute that never arrived and, by
		// leaving the blocked marker, refuses one that arrives later.
		marked, err := tx.ExecContext(ctx, claimSQL, append(execute.params(), stateBlocked)...)
		if err != nil {
			return Outcome{}, err
		}
		neverArrived, err := marked.RowsAffected()
		if err != nil {
			return Outcome{}, err
		}
		applied := false
		if neverArrived == 0 {
			answer, err := read(ctx, tx, execute)
			if err != nil {
				return Outcome{}, err
			}
			applied = answer.state == stateDone
		}
		if !applied {
			if err := record(ctx, tx, key, stateDone, []byte{}, "", ""); err != nil {
				return Outcome{}, err
			}
			if err := commit(); err != nil {
				return Outcome{}, err
			}
			return Outcome{Output: []byte{}, Kind: NullCompensation}, nil
		}
	}

	// A savepoint, so that a refusal undoes the effect's writes but keeps the barrier row.
	if _, err := tx.ExecContext(ctx, "SAVEPOINT barrier_effect"); err != nil {
		return Outcome{}, err
	}
	output, err := effect(tx)
	var refusal *Refusal
	if errors.As(err, &refusal) && key.Operation == OpExecute {
		if _, err := tx.ExecContext(ctx, "ROLLBACK TO SAVEPOINT barrier_effect"); err != nil {
			return Outcome{}, err
		}
		if err := record(ctx, tx, key, stateRejected, nil, refusal.Reason, refusal.Message); err != nil {
			return Outcome{}, err
		}
		if err := commit(); err != nil {
			return Outcome{}, err
		}
		return Outcome{}, refusal
	}
	if err != nil {
		return Outcome{}, err // rolled back whole by the deferred Rollback
	}
	if output == nil {
		output = []byte{}
	}
	if err := record(ctx, tx, key, stateDone, output, "", ""); err != nil {
		return Outcome{}, err
	}
	if err := commit(); err != nil {
		return Outcome{}, err
	}
	return Outcome{Output: output, Kind: Applied}, nil
}
