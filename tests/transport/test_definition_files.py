"""Definition files: YAML or JSON, checked against the proto, refused with the file and field."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from coordinator.core.errors import InvalidDefinition
from coordinator.core.model import StepKind
from coordinator.transport.definition_files import load_definitions

PARTICIPANTS = {"identity", "accounts", "cards", "billing"}

VALID = """
name: onboard
version: 2
description: Onboard a corporate client
retry: {max_attempts: 4, initial_backoff: 200ms, max_backoff: 5s}
steps:
  - {name: create-user, participant: identity, action: CreateUser, compensation: DeactivateUser,
     timeout: 3s}
  - {name: open-account, participant: accounts, action: OpenAccount, compensation: CloseAccount,
     retry: {max_attempts: 2}}
  - {name: issue-card, participant: cards, action: IssueCard, kind: pivot}
  - {name: subscribe, participant: billing, action: CreateSubscription, kind: retriable}
"""


def write(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(exist_ok=True)
    path = directory / name
    path.write_text(text)
    return path


def test_a_yaml_definition_loads_with_friendly_durations_and_inherited_retry(
    tmp_path: Path,
) -> None:
    write(tmp_path, "onboard.yaml", VALID)

    catalog = load_definitions(tmp_path, PARTICIPANTS)

    definition = catalog.resolve("onboard")
    assert definition.version == 2
    assert [s.kind for s in definition.steps] == [
        StepKind.COMPENSATABLE,
        StepKind.COMPENSATABLE,
        StepKind.PIVOT,
        StepKind.RETRIABLE,
    ]
    assert definition.steps[0].timeout == timedelta(seconds=3)
    assert definition.steps[0].retry.max_attempts == 4
    assert definition.steps[0].retry.initial_backoff == timedelta(milliseconds=200)
    assert definition.steps[1].retry.max_attempts == 2
    assert definition.steps[1].retry.max_backoff == timedelta(seconds=5)  # from the saga
    assert definition.steps[1].retry.jitter == 0.2  # the default


def test_json_definitions_and_several_versions_load(tmp_path: Path) -> None:
    for version in (1, 2):
        body = {
            "name": "pay",
            "version": version,
            "steps": [
                {
                    "name": "charge",
                    "participant": "billing",
                    "action": "Charge",
                    "compensation": "Refund",
                }
            ],
        }
        write(tmp_path, f"pay-{version}.json", json.dumps(body))

    catalog = load_definitions(tmp_path, PARTICIPANTS)

    assert catalog.resolve("pay").version == 2
    assert catalog.resolve("pay", 1).version == 1


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("name: x\nversion: 1\nsteps: []\n", "steps"),
        (
            "name: x\nversion: 1\nsteps:\n"
            "  - {name: a, participant: identity, action: A, compensation: U}\n"
            "  - {name: a, participant: accounts, action: B, compensation: V}\n",
            "steps[1].name",
        ),
        (
            "name: x\nversion: 1\nsteps:\n"
            "  - {name: a, participant: nobody, action: A, compensation: U}\n",
            "steps[0].participant",
        ),
        (
            "name: x\nversion: 1\nsteps:\n  - {name: a, participant: identity, action: A}\n",
            "steps[0].compensation",
        ),
        (
            "name: x\nversion: 1\nsteps:\n"
            "  - {name: p, participant: identity, action: A, kind: pivot}\n"
            "  - {name: c, participant: accounts, action: B, compensation: V}\n",
            "steps[1].kind",
        ),
    ],
)
def test_invalid_definitions_are_refused_naming_the_file_and_the_field(
    tmp_path: Path, text: str, field: str
) -> None:
    path = write(tmp_path, "broken.yaml", text)

    with pytest.raises(InvalidDefinition) as caught:
        load_definitions(tmp_path, PARTICIPANTS)

    assert str(path) in caught.value.message
    assert field in caught.value.message
    assert field in {v.field for v in caught.value.violations}


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("name: x\nversion: 1\nstepz: []\n", "stepz"),
        ("name: x\nversion: 1\nsteps:\n  - {name: a, timeout: soon}\n", "steps[0].timeout"),
        ("name: x\nversion: [1\n", "not valid YAML"),
        (
            "name: x\nversion: 1\nsteps:\n  - {name: a, participant: identity, action: A,"
            " compensation: U, timeout: 0s}\n",
            "steps[0].timeout: must be positive",
        ),
        (
            "name: x\nversion: 1\nretry: {max_attempts: 0}\nsteps:\n"
            "  - {name: a, participant: identity, action: A, compensation: U}\n",
            "retry.max_attempts: must be positive",
        ),
        ("- just\n- a list\n", "mapping"),
    ],
)
def test_malformed_files_are_refused_with_a_clear_message(
    tmp_path: Path, text: str, words: str
) -> None:
    path = write(tmp_path, "bad.yaml", text)

    with pytest.raises(InvalidDefinition) as caught:
        load_definitions(tmp_path, PARTICIPANTS)

    assert str(path) in caught.value.message
    assert words in caught.value.message


def test_a_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidDefinition, match="not a directory"):
        load_definitions(tmp_path / "nowhere", PARTICIPANTS)


def test_the_same_name_and_version_twice_is_refused(tmp_path: Path) -> None:
    body = (
        "name: x\nversion: 1\nsteps:\n"
        "  - {name: a, participant: identity, action: A, compensation: U}\n"
    )
    write(tmp_path, "a.yaml", body)
    write(tmp_path, "b.yaml", body)

    with pytest.raises(InvalidDefinition, match="defined twice"):
        load_definitions(tmp_path, PARTICIPANTS)


def test_budgets_and_named_events_load_from_a_file(tmp_path: Path) -> None:
    write(
        tmp_path,
        "pay.yaml",
        """
name: pay
version: 1
deadline: 2d
steps:
  - {name: hold, participant: billing, action: Hold, compensation: Release, emits: FundsHeld}
  - {name: charge, participant: billing, action: Charge, kind: pivot, max_attempts: 5}
  - {name: ship, participant: cards, action: Ship, kind: retriable, max_attempts: 7}
""",
    )

    definition = load_definitions(tmp_path, PARTICIPANTS).resolve("pay")

    assert definition.deadline == timedelta(days=2)
    assert [s.max_attempts for s in definition.steps] == [0, 5, 7]
    assert definition.steps[0].emits == "FundsHeld"


@pytest.mark.parametrize(
    ("line", "field", "problem"),
    [
        ("deadline: 500ms\n", "deadline", "from 1s to 366 days"),
        ("deadline: 400d\n", "deadline", "from 1s to 366 days"),
    ],
)
def test_a_bad_deadline_is_refused(tmp_path: Path, line: str, field: str, problem: str) -> None:
    write(tmp_path, "pay.yaml", line + VALID)
    with pytest.raises(InvalidDefinition) as refused:
        load_definitions(tmp_path, PARTICIPANTS)
    assert any(v.field == field and problem in v.description for v in refused.value.violations)


def test_max_attempts_on_a_compensatable_step_and_a_bad_event_name_are_refused(
    tmp_path: Path,
) -> None:
    write(
        tmp_path,
        "pay.yaml",
        """
name: pay
version: 1
steps:
  - {name: hold, participant: billing, action: Hold, compensation: Release, max_attempts: 3,
     emits: "funds held!"}
""",
    )
    with pytest.raises(InvalidDefinition) as refused:
        load_definitions(tmp_path, PARTICIPANTS)
    fields = {v.field for v in refused.value.violations}
    assert fields == {"steps[0].max_attempts", "steps[0].emits"}
