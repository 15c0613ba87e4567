"""What people read at a terminal tells the saga's story in its own events."""

from __future__ import annotations

from datetime import UTC, datetime

from rich.console import Console

from coordinator.console import event_lines, saga_panel, update_line
from saga_sdk.model import (
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

T0 = datetime(2025, 1, 1, tzinfo=UTC)
STEPS = (
    ("create-user", "identity", "CreateUser", "DeactivateUser", "UserCreated"),
    ("open-account", "accounts", "OpenAccount", "CloseAccount", "AccountOpened"),
    ("issue-card", "cards", "IssueCard", "CancelCard", "CardIssued"),
)
REFUSAL = Failure(
    step="issue-card",
    operation="execute",
    code="FAILED_PRECONDITION",
    reason="CARD_LIMIT_EXCEEDED",
    message="limit above what Cards grants without review",
)


def run(name: str, participant: str, state: StepState) -> StepRun:
    return StepRun(
        name=name,
        participant=participant,
        kind=StepKind.COMPENSATABLE,
        state=state,
        execute_attempts=1,
        compensate_attempts=0,
        output=b'{"ok":true}',
        failure=None,
        start_time=T0,
        end_time=T0,
        next_attempt_time=None,
    )


def saga(state: SagaState, steps: tuple[StepRun, ...], version: int) -> Saga:
    return Saga(
        saga_id="globex-corp",
        definition="onboard-corporate-client",
        definition_version=1,
        state=state,
        input=b"{}",
        steps=steps,
        failure=None,
        cancel_reason="",
        create_time=T0,
        update_time=T0,
        end_time=None,
        version=version,
    )


def compensated_story() -> list[SagaEvent]:
    """Globex's saga: the user and the account are made, the card is refused, all undone."""
    events = [SagaEvent(1, SagaEventType.CREATED, "", 0, T0, None)]
    for name, _, action, _, emits in STEPS[:2]:
        events.append(
            SagaEvent(
                len(events) + 1,
                SagaEventType.STEP_SUCCEEDED,
                name,
                1,
                T0,
                None,
                operation="execute",
                action=action,
                emits=emits,
            )
        )
    events.append(
        SagaEvent(
            len(events) + 1,
            SagaEventType.STEP_REJECTED,
            "issue-card",
            1,
            T0,
            REFUSAL,
            operation="execute",
            action="IssueCard",
        )
    )
    for name, _, _, compensation, _ in reversed(STEPS):
        events.append(
            SagaEvent(
                len(events) + 1,
                SagaEventType.COMPENSATION_SUCCEEDED,
                name,
                1,
                T0,
                None,
                operation="compensate",
                action=compensation,
            )
        )
    return events


def plain(renderable: object) -> str:
    out = Console(width=200, record=True, highlight=False)
    out.print(renderable, soft_wrap=True)
    return out.export_text()


def watched(event: SagaEvent, state: SagaState = SagaState.RUNNING) -> str:
    return update_line(SagaUpdate(saga(state, (), event.sequence), event)).plain


def test_a_watched_step_success_names_the_event_it_stands_for() -> None:
    created = compensated_story()[1]

    assert watched(created) == (
        "#2 step succeeded create-user CreateUser attempt 1, emits UserCreated -> RUNNING"
    )


def test_a_watched_refusal_names_its_reason_and_no_event() -> None:
    refused = compensated_story()[3]

    line = watched(refused, SagaState.COMPENSATING)

    assert line == (
        "#4 step rejected issue-card IssueCard attempt 1 (FAILED_PRECONDITION "
        "CARD_LIMIT_EXCEEDED: limit above what Cards grants without review) -> COMPENSATING"
    )
    assert "CardIssued" not in line


def test_watched_compensations_name_the_commands_sent_newest_step_first() -> None:
    lines = [watched(e, SagaState.COMPENSATING) for e in compensated_story()[4:]]

    assert [line.split(" ")[4] for line in lines] == [
        "CancelCard",
        "CloseAccount",
        "DeactivateUser",
    ]
    assert not any("emits" in line for line in lines)


def test_the_event_log_names_each_success_event_and_the_refusal() -> None:
    lines = [line.plain for line in event_lines(compensated_story())]

    assert "emits UserCreated" in lines[1]
    assert "emits AccountOpened" in lines[2]
    assert "CARD_LIMIT_EXCEEDED" in lines[3]
    assert not any("CardIssued" in line for line in lines)


def test_the_saga_panel_names_the_events_of_the_steps_that_succeeded() -> None:
    steps = (
        run("create-user", "identity", StepState.COMPENSATED),
        run("open-account", "accounts", StepState.COMPENSATED),
        run("issue-card", "cards", StepState.COMPENSATED),
    )
    shown = saga(SagaState.COMPENSATED, steps, 7)

    rows = plain(saga_panel(shown, compensated_story())).splitlines()

    def row(step: str) -> str:
        return next(line for line in rows if f" {step} " in line)

    assert "UserCreated" in row("create-user")
    assert "AccountOpened" in row("open-account")
    assert "CardIssued" not in row("issue-card")


def test_the_saga_panel_without_events_has_no_event_column() -> None:
    shown = saga(SagaState.RUNNING, (run("create-user", "identity", StepState.SUCCEEDED),), 2)

    assert " event " not in plain(saga_panel(shown))
