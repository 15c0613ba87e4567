"""Saga definitions: every invalid field named by its path, and the catalog's lookups."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest

from coordinator.core.definitions import (
    DefinitionCatalog,
    definition_violations,
    validate_definition,
)
from coordinator.core.errors import DefinitionNotFound, InvalidDefinition
from coordinator.core.model import RetryPolicy, SagaDefinition, StepDefinition, StepKind

from .builders import (
    FOUR_STEPS,
    PARTICIPANTS,
    PIVOTED,
    compensatable,
    pivot,
    retriable,
    saga_definition,
)

SOURCE = "definitions/open-account.yaml"


def _with_step(step: StepDefinition, index: int = 0) -> SagaDefinition:
    steps = list(FOUR_STEPS.steps)
    steps[index] = step
    return dataclasses.replace(FOUR_STEPS, steps=tuple(steps))


def _with_retry(index: int, **changes: object) -> SagaDefinition:
    step = FOUR_STEPS.steps[index]
    return _with_step(
        dataclasses.replace(step, retry=dataclasses.replace(step.retry, **changes)),  # type: ignore[arg-type]
        index,
    )


@pytest.mark.parametrize(
    "definition",
    [
        pytest.param(FOUR_STEPS, id="compensatable steps"),
        pytest.param(PIVOTED, id="compensatable, pivot, retriable"),
        pytest.param(saga_definition(pivot("charge")), id="a lone pivot"),
        pytest.param(
            saga_definition(pivot("charge"), retriable("notify"), retriable("invoice")),
            id="pivot first",
        ),
        pytest.param(
            saga_definition(compensatable("hold"), compensatable("reserve"), pivot("charge")),
            id="pivot last",
        ),
    ],
)
def test_valid_definition_has_no_violations(definition: SagaDefinition) -> None:
    assert definition_violations(definition, PARTICIPANTS) == []
    assert validate_definition(definition, PARTICIPANTS, SOURCE) is definition


@pytest.mark.parametrize(
    ("definition", "path"),
    [
        pytest.param(saga_definition(), "steps", id="no steps"),
        pytest.param(dataclasses.replace(FOUR_STEPS, name=""), "name", id="empty name"),
        pytest.param(dataclasses.replace(FOUR_STEPS, name="open account"), "name", id="bad name"),
        pytest.param(dataclasses.replace(FOUR_STEPS, version=0), "version", id="version 0"),
        pytest.param(
            saga_definition(compensatable("hold"), compensatable("hold")),
            "steps[1].name",
            id="duplicate step names",
        ),
        pytest.param(
            _with_step(compensatable("identity", "mainframe")),
            "steps[0].participant",
            id="unknown participant",
        ),
        pytest.param(
            _with_step(dataclasses.replace(compensatable("x"), participant="")),
            "steps[0].participant",
            id="no participant",
        ),
        pytest.param(
            _with_step(dataclasses.replace(compensatable("x"), action=""), 1),
            "steps[1].action",
            id="no action",
        ),
        pytest.param(
            _with_step(dataclasses.replace(compensatable("account"), compensation=""), 1),
            "steps[1].compensation",
            id="compensatable without compensation",
        ),
        pytest.param(
            saga_definition(compensatable("hold"), pivot("charge"), compensatable("ship")),
            "steps[2].kind",
            id="compensatable after the pivot",
        ),
        pytest.param(
            saga_definition(compensatable("hold"), retriable("notify"), pivot("charge")),
            "steps[1].kind",
            id="retriable before any pivot",
        ),
        pytest.param(
            saga_definition(
                compensatable("hold"), dataclasses.replace(pivot("charge"), compensation="refund")
            ),
            "steps[1].compensation",
            id="compensation on a pivot",
        ),
        pytest.param(
            saga_definition(
                pivot("charge"), dataclasses.replace(retriable("notify"), compensation="unsend")
            ),
            "steps[1].compensation",
            id="compensation on a retriable step",
        ),
        pytest.param(
            saga_definition(compensatable("hold"), pivot("charge"), pivot("ship")),
            "steps[2].kind",
            id="two pivots",
        ),
        pytest.param(
            _with_step(dataclasses.replace(compensatable("x"), timeout=timedelta(0)), 2),
            "steps[2].timeout",
            id="zero timeout",
        ),
        pytest.param(
            _with_retry(1, max_attempts=0), "steps[1].retry.max_attempts", id="0 attempts"
        ),
        pytest.param(
            _with_retry(1, initial_backoff=timedelta(seconds=-1)),
            "steps[1].retry.initial_backoff",
            id="negative backoff",
        ),
        pytest.param(
            _with_retry(1, initial_backoff=timedelta(seconds=20), max_backoff=timedelta(seconds=1)),
            "steps[1].retry.max_backoff",
            id="max backoff below initial",
        ),
        pytest.param(
            _with_retry(1, multiplier=0.5), "steps[1].retry.backoff_multiplier", id="shrinking"
        ),
        pytest.param(_with_retry(1, jitter=1.5), "steps[1].retry.jitter", id="jitter above 1"),
        pytest.param(
            _with_step(
                dataclasses.replace(
                    compensatable("x"), compensation_retry=RetryPolicy(max_attempts=0)
                ),
                3,
            ),
            "steps[3].compensation_retry.max_attempts",
            id="compensation 0 attempts",
        ),
    ],
)
def test_invalid_definition_names_the_offending_field(
    definition: SagaDefinition, path: str
) -> None:
    violations = definition_violations(definition, PARTICIPANTS)

    assert path in [violation.field for violation in violations]
    assert all(violation.description for violation in violations)

    with pytest.raises(InvalidDefinition) as raised:
        validate_definition(definition, PARTICIPANTS, SOURCE)
    assert raised.value.reason == "INVALID_DEFINITION"
    assert raised.value.message.startswith(SOURCE)
    assert path in raised.value.message
    assert tuple(violations) == raised.value.violations


def test_every_violation_of_a_definition_is_reported_at_once() -> None:
    definition = saga_definition(
        dataclasses.replace(compensatable("hold"), compensation=""),
        compensatable("hold", "mainframe"),
    )

    fields = [violation.field for violation in definition_violations(definition, PARTICIPANTS)]

    assert fields == ["steps[0].compensation", "steps[1].name", "steps[1].participant"]


def test_unknown_participant_violation_lists_the_known_ones() -> None:
    [violation] = definition_violations(
        _with_step(compensatable("identity", "mainframe")), PARTICIPANTS
    )

    assert "mainframe" in violation.description
    assert "accounts" in violation.description


def test_step_kinds_default_to_compensatable() -> None:
    assert StepDefinition(name="x", participant="p", action="a").kind is StepKind.COMPENSATABLE


OLD = dataclasses.replace(FOUR_STEPS, version=1)
NEW = dataclasses.replace(FOUR_STEPS, version=3)
OTHER = dataclasses.replace(PIVOTED, name="close-account", version=2)
CATALOG = DefinitionCatalog.of([NEW, OTHER, OLD])


def test_catalog_resolves_version_0_to_the_newest() -> None:
    assert CATALOG.resolve("open-account") is NEW
    assert CATALOG.resolve("open-account", 0) is NEW


def test_catalog_resolves_an_exact_version() -> None:
    assert CATALOG.resolve("open-account", 1) is OLD
    assert CATALOG.resolve("close-account", 2) is OTHER


def test_catalog_names_the_known_definitions_when_the_name_is_unknown() -> None:
    with pytest.raises(DefinitionNotFound) as raised:
        CATALOG.resolve("open-acount")

    assert raised.value.reason == "DEFINITION_NOT_FOUND"
    assert "'open-acount'" in raised.value.message
    assert "close-account, open-account" in raised.value.message


def test_catalog_names_the_versions_it_has_when_the_version_is_unknown() -> None:
    with pytest.raises(DefinitionNotFound) as raised:
        CATALOG.resolve("open-account", 2)

    assert "version 2" in raised.value.message
    assert "versions: 1, 3" in raised.value.message


def test_empty_catalog_resolves_nothing() -> None:
    with pytest.raises(DefinitionNotFound, match="known: none"):
        DefinitionCatalog.of([]).resolve("open-account")


def test_catalog_refuses_the_same_name_and_version_twice() -> None:
    with pytest.raises(InvalidDefinition, match="version 3 is defined twice"):
        DefinitionCatalog.of([NEW, OLD, NEW])


def test_catalog_lists_every_definition_by_name_then_version() -> None:
    assert CATALOG.all() == [OTHER, OLD, NEW]
