// The barrier's rules on a real SQLite file: duplicates, null compensations, late Executes,
// refusals, failures, concurrent duplicates and a reopened file.

package main

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
)

func openTestBarrier(t *testing.T) (*Barrier, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "barrier test.db")
	barrier, err := OpenBarrier(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := barrier.DB().Exec(`CREATE TABLE effects (request_id TEXT, what TEXT)`); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { barrier.Close() })
	return barrier, path
}

// effect records one row per run, so that the tests count how often it really ran.
func effect(requestID, what string, output string) Effect {
	return func(tx *sql.Tx) ([]byte, error) {
		if _, err := tx.Exec(`INSERT INTO effects VALUES (?, ?)`, requestID, what); err != nil {
			return nil, err
		}
		return []byte(output), nil
	}
}

func effects(t *testing.T, db *sql.DB) []string {
	t.Helper()
	rows, err := db.Query(`SELECT request_id || ':' || what FROM effects ORDER BY rowid`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var seen []string
	for rows.Next() {
		var s string
		if err := rows.Scan(&s); err != nil {
			t.Fatal(err)
		}
		seen = append(seen, s)
	}
	return seen
}

func executeKey(requestID string) Key {
	return Key{SagaID: "s1", Step: "open-account", Operation: OpExecute, RequestID: requestID}
}

func compensateKey(requestID, executeRequestID string) Key {
	return Key{
		SagaID: "s1", Step: "open-account", Operation: OpCompensate,
		RequestID: requestID, ExecuteRequestID: executeRequestID,
	}
}

func mustRun(t *testing.T, b *Barrier, key Key, e Effect) Outcome {
	t.Helper()
	outcome, err := b.Run(context.Background(), key, e)
	if err != nil {
		t.Fatalf("%+v: %v", key, err)
	}
	return outcome
}

func assertEffects(t *testing.T, b *Barrier, want ...string) {
	t.Helper()
	got := effects(t, b.DB())
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("effects %v, want %v", got, want)
	}
}

func TestRepeatedExecuteAnswersTheFirstOutputAndAppliesOnce(t *testing.T) {
	b, _ := openTestBarrier(t)
	first := mustRun(t, b, executeKey("e1"), effect("e1", "open", "first"))
	again := mustRun(t, b, executeKey("e1"), effect("e1", "open", "second"))

	if first.Kind != Applied || string(first.Output) != "first" {
		t.Fatalf("first call: %+v", first)
	}
	if again.Kind != Replayed || string(again.Output) != "first" {
		t.Fatalf("repeated call: %+v", again)
	}
	assertEffects(t, b, "e1:open")
}

func TestCompensateUndoesAnAppliedExecuteOnceWhenRepeated(t *testing.T) {
	b, _ := openTestBarrier(t)
	mustRun(t, b, executeKey("e1"), effect("e1", "open", "out"))
	first := mustRun(t, b, compensateKey("c1", "e1"), effect("c1", "close", ""))
	again := mustRun(t, b, compensateKey("c1", "e1"), effect("c1", "close", ""))

	if first.Kind != Applied || again.Kind != Replayed {
		t.Fatalf("compensations: %+v then %+v", first, again)
	}
	assertEffects(t, b, "e1:open", "c1:close")
}

func TestCompensateBeforeExecuteIsNullAndRefusesTheLateExecute(t *testing.T) {
	b, _ := openTestBarrier(t)
	null := mustRun(t, b, compensateKey("c1", "e1"), effect("c1", "close", ""))
	_, err := b.Run(context.Background(), executeKey("e1"), effect("e1", "open", "out"))
	again := mustRun(t, b, compensateKey("c1", "e1"), effect("c1", "close", ""))

	if null.Kind != NullCompensation {
		t.Fatalf("compensation before the Execute: %+v", null)
	}
	var refusal *Refusal
	if !errors.As(err, &refusal) || refusal.Reason != ReasonExecuteAfterCompensate {
		t.Fatalf("late Execute answered %v, want a %s refusal", err, ReasonExecuteAfterCompensate)
	}
	if again.Kind != Replayed {
		t.Fatalf("repeated null compensation: %+v", again)
	}
	assertEffects(t, b) // nothing applied, nothing undone
}

func TestRefusedExecuteRollsItsWritesBackAndIsRemembered(t *testing.T) {
	b, _ := openTestBarrier(t)
	refuse := func(tx *sql.Tx) ([]byte, error) {
		if _, err := tx.Exec(`INSERT INTO effects VALUES ('e1', 'half-written')`); err != nil {
			return nil, err
		}
		return nil, &Refusal{Reason: "NO_FUNDS", Message: "balance too low"}
	}
	_, first := b.Run(context.Background(), executeKey("e1"), refuse)
	_, again := b.Run(context.Background(), executeKey("e1"), effect("e1", "open", "out"))
	null := mustRun(t, b, compensateKey("c1", "e1"), effect("c1", "close", ""))

	for _, err := range []error{first, again} {
		var refusal *Refusal
		if !errors.As(err, &refusal) || refusal.Reason != "NO_FUNDS" || refusal.Message != "balance too low" {
			t.Fatalf("answered %v, want the NO_FUNDS refusal", err)
		}
	}
	if null.Kind != NullCompensation {
		t.Fatalf("compensation of a refused Execute: %+v", null)
	}
	assertEffects(t, b)
}

func TestRefusedCompensateIsNotRememberedAndRunsAgain(t *testing.T) {
	b, _ := openTestBarrier(t)
	mustRun(t, b, executeKey("e1"), effect("e1", "open", "out"))
	_, err := b.Run(context.Background(), compensateKey("c1", "e1"), func(tx *sql.Tx) ([]byte, error) {
		return nil, &Refusal{Reason: "LEDGER_LOCKED", Message: "month end"}
	})
	var refusal *Refusal
	if !errors.As(err, &refusal) {
		t.Fatalf("answered %v, want the refusal", err)
	}
	retried := mustRun(t, b, compensateKey("c1", "e1"), effect("c1", "close", ""))

	if retried.Kind != Applied {
		t.Fatalf("compensation sent again: %+v", retried)
	}
	assertEffects(t, b, "e1:open", "c1:close")
}

func TestFailedEffectLeavesNoTraceAndTheRetryRunsAfresh(t *testing.T) {
	b, _ := openTestBarrier(t)
	broken := errors.New("disk on fire")
	_, err := b.Run(context.Background(), executeKey("e1"), func(tx *sql.Tx) ([]byte, error) {
		if _, err := tx.Exec(`INSERT INTO effects VALUES ('e1', 'half-written')`); err != nil {
			return nil, err
		}
		return nil, broken
	})
	if !errors.Is(err, broken) {
		t.Fatalf("answered %v, want the effect's error", err)
	}
	retried := mustRun(t, b, executeKey("e1"), effect("e1", "open", "out"))

	if retried.Kind != Applied || string(retried.Output) != "out" {
		t.Fatalf("retry: %+v", retried)
	}
	assertEffects(t, b, "e1:open")
}

func TestConcurrentDuplicatesApplyOnceAndAllAnswerTheSame(t *testing.T) {
	b, _ := openTestBarrier(t)
	const copies = 16
	outputs := make([][]byte, copies)
	errs := make([]error, copies)
	var wg sync.WaitGroup
	for i := 0; i < copies; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			outcome, err := b.Run(context.Background(), executeKey("e1"), effect("e1", "open", fmt.Sprintf("copy %d", i)))
			outputs[i], errs[i] = outcome.Output, err
		}(i)
	}
	wg.Wait()

	for i := range outputs {
		if errs[i] != nil {
			t.Fatalf("copy %d: %v", i, errs[i])
		}
		if !bytes.Equal(outputs[i], outputs[0]) {
			t.Fatalf("copy %d answered %q, copy 0 %q", i, outputs[i], outputs[0])
		}
	}
	assertEffects(t, b, "e1:open")
}

func TestAnswersSurviveReopeningTheFile(t *testing.T) {
	b, path := openTestBarrier(t)
	mustRun(t, b, executeKey("e1"), effect("e1", "open", "out"))
	mustRun(t, b, compensateKey("c2", "e2"), effect("c2", "close", ""))
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}

	reopened, err := OpenBarrier(path)
	if err != nil {
		t.Fatal(err)
	}
	defer reopened.Close()
	again := mustRun(t, reopened, executeKey("e1"), effect("e1", "open", "other"))
	_, late := reopened.Run(context.Background(), executeKey("e2"), effect("e2", "open", "out"))

	if again.Kind != Replayed || string(again.Output) != "out" {
		t.Fatalf("after reopening: %+v", again)
	}
	var refusal *Refusal
	if !errors.As(late, &refusal) || refusal.Reason != ReasonExecuteAfterCompensate {
		t.Fatalf("late Execute after reopening answered %v", late)
	}
	assertEffects(t, reopened, "e1:open")
}

func TestKeysWithoutRequestIdsAreRefused(t *testing.T) {
	b, _ := openTestBarrier(t)
	for _, key := range []Key{executeKey(""), compensateKey("c1", "")} {
		if _, err := b.Run(context.Background(), key, effect("x", "x", "")); err == nil {
			t.Fatalf("%+v was accepted", key)
		}
	}
	assertEffects(t, b)
}
