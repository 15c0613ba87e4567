// The gRPC face of Accounts: saga.v1.ParticipantService, its answers mapped to the contract.

package main

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"strings"
	"time"

	"github.com/golang/protobuf/proto"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	sagav1 "saga-coordinator/sagav1"
)

// Domain is the ErrorInfo domain of every error this participant answers.
const Domain = "accounts"

const (
	actionOpenAccount  = "OpenAccount"
	actionCloseAccount = "CloseAccount"
	// The step whose output names the account's owner.
	ownerStep = "create-user"
)

// callTimeout bounds one call's transaction. It is not the caller's deadline: a call whose
// deadline expired still commits its effect, and the coordinator's retry (same request_id)
// gets that answer from the barrier.
const callTimeout = 30 * time.Second

// Server answers Execute and Compensate:
//
//	the effect committed          -> OK, with the output
//	a business "no" (*Refusal)    -> FAILED_PRECONDITION + ErrorInfo(reason, domain "accounts")
//	an action it does not have    -> UNIMPLEMENTED + ErrorInfo(UNKNOWN_ACTION): not retried
//	a malformed request           -> INVALID_ARGUMENT + BadRequest: not retried
//	anything else (the database)  -> INTERNAL, logged: transient, retried with the same request_id
type Server struct {
	sagav1.UnimplementedParticipantServiceServer
	barrier *Barrier
}

// NewServer serves Accounts from the barrier's database, creating its table when missing.
func NewServer(barrier *Barrier) (*Server, error) {
	if _, err := barrier.DB().Exec(accountsSchema); err != nil {
		return nil, fmt.Errorf("create the accounts table: %w", err)
	}
	return &Server{barrier: barrier}, nil
}

// Execute applies OpenAccount once per request_id.
func (s *Server) Execute(_ context.Context, req *sagav1.ExecuteRequest) (*sagav1.ExecuteResponse, error) {
	if req.Action != actionOpenAccount {
		return nil, unknownAction("action", req.Action, actionOpenAccount)
	}
	sagaID, violations := identity(req.Saga, req.RequestId)
	var input OpenAccountInput
	if err := decodeJSON(req.Input, &input); err != nil {
		violations = append(violations, violation("input", "not a valid JSON object: "+err.Error()))
	}
	var owner struct {
		UserID string `json:"user_id"`
	}
	if raw, ok := req.PreviousOutputs[ownerStep]; ok {
		if err := decodeJSON(raw, &owner); err != nil {
			violations = append(violations, violation(
				"previous_outputs["+ownerStep+"]", "not a valid JSON object: "+err.Error()))
		}
	}
	if len(violations) > 0 {
		return nil, badRequest(violations)
	}
	key := Key{SagaID: sagaID, Step: req.Step, Operation: OpExecute, RequestID: req.RequestId}
	outcome, err := s.run(key, func(tx *sql.Tx) ([]byte, error) {
		return openAccount(tx, sagaID, req.RequestId, input, owner.UserID)
	})
	if err != nil {
		return nil, s.answer("Execute", key, err)
	}
	return &sagav1.ExecuteResponse{Output: outcome.Output}, nil
}

// Compensate applies CloseAccount once per request_id; for an Execute that never took effect it
// applies nothing and answers OK.
func (s *Server) Compensate(_ context.Context, req *sagav1.CompensateRequest) (*sagav1.CompensateResponse, error) {
	if req.Action != actionCloseAccount {
		return nil, unknownAction("compensation", req.Action, actionCloseAccount)
	}
	sagaID, violations := identity(req.Saga, req.RequestId)
	if req.ExecuteRequestId == "" {
		violations = append(violations, violation("execute_request_id", "must not be empty"))
	}
	if len(violations) > 0 {
		return nil, badRequest(violations)
	}
	key := Key{
		SagaID:           sagaID,
		Step:             req.Step,
		Operation:        OpCompensate,
		RequestID:        req.RequestId,
		ExecuteRequestID: req.ExecuteRequestId,
	}
	if _, err := s.run(key, func(tx *sql.Tx) ([]byte, error) {
		return nil, closeAccount(tx, req.ExecuteRequestId)
	}); err != nil {
		return nil, s.answer("Compensate", key, err)
	}
	return &sagav1.CompensateResponse{}, nil
}

func (s *Server) run(key Key, effect Effect) (Outcome, error) {
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	return s.barrier.Run(ctx, key, effect)
}

// answer turns the barrier's error into the contract's status.
func (s *Server) answer(call string, key Key, err error) error {
	var refusal *Refusal
	if errors.As(err, &refusal) {
		return withDetails(status.New(codes.FailedPrecondition, refusal.Message), &errdetails.ErrorInfo{
			Reason: refusal.Reason,
			Domain: Domain,
		})
	}
	log.Printf("%s of %s/%s (request %s) failed: %v", call, key.SagaID, key.Step, key.RequestID, err)
	return status.Error(codes.Internal, call+" failed inside accounts; retry with the same request_id")
}

func identity(saga, requestID string) (string, []*errdetails.BadRequest_FieldViolation) {
	var violations []*errdetails.BadRequest_FieldViolation
	sagaID := strings.TrimPrefix(saga, "sagas/")
	if sagaID == saga || sagaID == "" {
		violations = append(violations, violation("saga", fmt.Sprintf("expected sagas/{id}, got %q", saga)))
	}
	if requestID == "" {
		violations = append(violations, violation("request_id", "must not be empty"))
	}
	return sagaID, violations
}

// decodeJSON reads a JSON object into v; an empty payload is the empty object.
func decodeJSON(raw []byte, v any) error {
	if len(bytes.TrimSpace(raw)) == 0 {
		return nil
	}
	if trimmed := bytes.TrimSpace(raw); trimmed[0] != '{' {
		return errors.New("expected an object")
	}
	return json.Unmarshal(raw, v)
}

func violation(field, description string) *errdetails.BadRequest_FieldViolation {
	return &errdetails.BadRequest_FieldViolation{Field: field, Description: description}
}

func badRequest(violations []*errdetails.BadRequest_FieldViolation) error {
	parts := make([]string, len(violations))
	for i, v := range violations {
		parts[i] = v.Field + ": " + v.Description
	}
	return withDetails(
		status.New(codes.InvalidArgument, strings.Join(parts, "; ")),
		&errdetails.ErrorInfo{Reason: "INVALID_REQUEST", Domain: Domain},
		&errdetails.BadRequest{FieldViolations: violations},
	)
}

func unknownAction(kind, name, known string) error {
	return withDetails(
		status.New(codes.Unimplemented, fmt.Sprintf("accounts has no %s %q (it has: %s)", kind, name, known)),
		&errdetails.ErrorInfo{Reason: "UNKNOWN_ACTION", Domain: Domain, Metadata: map[string]string{kind: name}},
	)
}

// withDetails attaches the details to the status; a detail that cannot be marshalled (a bug)
// still leaves the code and message.
func withDetails(st *status.Status, details ...proto.Message) error {
	detailed, err := st.WithDetails(details...)
	if err != nil {
		log.Printf("attach error details: %v", err)
		return st.Err()
	}
	return detailed.Err()
}
