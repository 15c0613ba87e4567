// How Accounts answers, status by status, and what it writes.

package main

import (
	"context"
	"encoding/json"
	"path/filepath"
	"testing"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	sagav1 "saga-coordinator/sagav1"
)

func newTestServer(t *testing.T) *Server {
	t.Helper()
	barrier, err := OpenBarrier(filepath.Join(t.TempDir(), "accounts.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { barrier.Close() })
	server, err := NewServer(barrier)
	if err != nil {
		t.Fatal(err)
	}
	return server
}

func openRequest(requestID, input string) *sagav1.ExecuteRequest {
	return &sagav1.ExecuteRequest{
		Saga: "sagas/s1", Definition: "onboard", DefinitionVersion: 1, Step: "open-account",
		Action: "OpenAccount", RequestId: requestID, Attempt: 1, Input: []byte(input),
		PreviousOutputs: map[string][]byte{"create-user": []byte(`{"user_id": "usr_1"}`)},
	}
}

func closeRequest(requestID, executeRequestID string) *sagav1.CompensateRequest {
	return &sagav1.CompensateRequest{
		Saga: "sagas/s1", Definition: "onboard", DefinitionVersion: 1, Step: "open-account",
		Action: "CloseAccount", RequestId: requestID, Attempt: 1, ExecuteRequestId: executeRequestID,
	}
}

func accountStates(t *testing.T, s *Server) map[string]string {
	t.Helper()
	rows, err := s.barrier.DB().Query(`SELECT execute_request_id, status FROM accounts`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	states := map[string]string{}
	for rows.Next() {
		var id, state string
		if err := rows.Scan(&id, &state); err != nil {
			t.Fatal(err)
		}
		states[id] = state
	}
	return states
}

// errorInfo returns the code and the ErrorInfo reason and domain of err.
func errorInfo(t *testing.T, err error) (codes.Code, string, string) {
	t.Helper()
	st, ok := status.FromError(err)
	if !ok {
		t.Fatalf("not a gRPC status: %v", err)
	}
	for _, detail := range st.Details() {
		if info, ok := detail.(*errdetails.ErrorInfo); ok {
			return st.Code(), info.Reason, info.Domain
		}
	}
	return st.Code(), "", ""
}

func TestOpenAccountAnswersItsAccountAndTheDuplicateTheSame(t *testing.T) {
	s := newTestServer(t)
	first, err := s.Execute(context.Background(), openRequest("e1", `{"currency": "chf"}`))
	if err != nil {
		t.Fatal(err)
	}
	again, err := s.Execute(context.Background(), openRequest("e1", `{"currency": "chf"}`))
	if err != nil {
		t.Fatal(err)
	}

	var account Account
	if err := json.Unmarshal(first.Output, &account); err != nil {
		t.Fatal(err)
	}
	if account.Owner != "usr_1" || account.Currency != "CHF" || len(account.AccountID) != len("acc_")+10 {
		t.Fatalf("account %+v", account)
	}
	if string(again.Output) != string(first.Output) {
		t.Fatalf("duplicate answered %s, first %s", again.Output, first.Output)
	}
	if got := accountStates(t, s); len(got) != 1 || got["e1"] != "open" {
		t.Fatalf("accounts %v", got)
	}
}

func TestCloseAccountClosesTheAccountOfItsExecute(t *testing.T) {
	s := newTestServer(t)
	if _, err := s.Execute(context.Background(), openRequest("e1", `{}`)); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2; i++ {
		if _, err := s.Compensate(context.Background(), closeRequest("c1", "e1")); err != nil {
			t.Fatal(err)
		}
	}
	if got := accountStates(t, s); got["e1"] != "closed" {
		t.Fatalf("accounts %v", got)
	}
}

func TestBusinessNoIsFailedPreconditionWithErrorInfo(t *testing.T) {
	s := newTestServer(t)
	noOwner := openRequest("e2", `{}`)
	noOwner.PreviousOutputs = nil
	for request, reason := range map[*sagav1.ExecuteRequest]string{
		openRequest("e1", `{"currency": "XYZ"}`): "CURRENCY_NOT_SUPPORTED",
		noOwner:                                  "OWNER_MISSING",
	} {
		_, err := s.Execute(context.Background(), request)
		code, gotReason, domain := errorInfo(t, err)
		if code != codes.FailedPrecondition || gotReason != reason || domain != Domain {
			t.Fatalf("%s answered %v %s %s, want FAILED_PRECONDITION %s", request.RequestId, code, gotReason, domain, reason)
		}
	}
	if got := accountStates(t, s); len(got) != 0 {
		t.Fatalf("a refusal wrote accounts: %v", got)
	}
}

func TestLateExecuteAfterNullCompensationIsRefused(t *testing.T) {
	s := newTestServer(t)
	if _, err := s.Compensate(context.Background(), closeRequest("c1", "e1")); err != nil {
		t.Fatal(err)
	}
	_, err := s.Execute(context.Background(), openRequest("e1", `{}`))
	code, reason, _ := errorInfo(t, err)
	if code != codes.FailedPrecondition || reason != ReasonExecuteAfterCompensate {
		t.Fatalf("late Execute answered %v %s", code, reason)
	}
	if got := accountStates(t, s); len(got) != 0 {
		t.Fatalf("the late Execute opened an account: %v", got)
	}
}

func TestUnknownActionsAndMalformedRequestsAreNotRetried(t *testing.T) {
	s := newTestServer(t)
	wrongAction := openRequest("e1", `{}`)
	wrongAction.Action = "Teleport"
	wrongCompensation := closeRequest("c1", "e1")
	wrongCompensation.Action = "Unteleport"
	notJSON := openRequest("e2", `[1, 2]`)
	noRequestID := openRequest("", `{}`)
	badSaga := openRequest("e3", `{}`)
	badSaga.Saga = "s1"
	noExecuteID := closeRequest("c2", "")

	_, err := s.Execute(context.Background(), wrongAction)
	if code, reason, _ := errorInfo(t, err); code != codes.Unimplemented || reason != "UNKNOWN_ACTION" {
		t.Fatalf("unknown action answered %v %s", code, reason)
	}
	_, err = s.Compensate(context.Background(), wrongCompensation)
	if code, reason, _ := errorInfo(t, err); code != codes.Unimplemented || reason != "UNKNOWN_ACTION" {
		t.Fatalf("unknown compensation answered %v %s", code, reason)
	}
	for _, request := range []*sagav1.ExecuteRequest{notJSON, noRequestID, badSaga} {
		_, err := s.Execute(context.Background(), request)
		if code, _, _ := errorInfo(t, err); code != codes.InvalidArgument {
			t.Fatalf("%+v answered %v", request, code)
		}
	}
	_, err = s.Compensate(context.Background(), noExecuteID)
	if code, _, _ := errorInfo(t, err); code != codes.InvalidArgument {
		t.Fatalf("a Compensate without execute_request_id answered %v", code)
	}
	if got := accountStates(t, s); len(got) != 0 {
		t.Fatalf("refused requests wrote accounts: %v", got)
	}
}
