"""Python SDK for the saga coordinator: clients, and participants with an idempotency barrier.

`PostgresBarrier` lives in `saga_sdk.postgres_barrier` (it needs the `postgresql` extra).
"""

from saga_sdk.barrier import Barrier, BarrierKey, Operation, Outcome, OutcomeKind
from saga_sdk.client import AsyncSagaClient, SagaClient
from saga_sdk.errors import (
    AlreadyExists,
    DeadlineExceeded,
    ExecuteAfterCompensate,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Rejected,
    SagaRpcError,
    SagaSdkError,
    Unavailable,
    WaitTimeout,
)
from saga_sdk.model import (
    CreateResult,
    Failure,
    Saga,
    SagaEvent,
    SagaEventType,
    SagaState,
    SagaUpdate,
    StepKind,
    StepRun,
    StepState,
)
from saga_sdk.participant import CompensateContext, ExecuteContext, Participant
from saga_sdk.sqlite_barrier import SqliteBarrier

__all__ = [
    "AlreadyExists",
    "AsyncSagaClient",
    "Barrier",
    "BarrierKey",
    "CompensateContext",
    "CreateResult",
    "DeadlineExceeded",
    "ExecuteAfterCompensate",
    "ExecuteContext",
    "FailedPrecondition",
    "Failure",
    "FieldViolation",
    "InvalidArgument",
    "NotFound",
    "Operation",
    "Outcome",
    "OutcomeKind",
    "Participant",
    "Rejected",
    "Saga",
    "SagaClient",
    "SagaEvent",
    "SagaEventType",
    "SagaRpcError",
    "SagaSdkError",
    "SagaState",
    "SagaUpdate",
    "SqliteBarrier",
    "StepKind",
    "StepRun",
    "StepState",
    "Unavailable",
    "WaitTimeout",
]
