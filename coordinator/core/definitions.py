"""Saga definitions: their validation, and the catalog the coordinator resolves names in."""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta

from coordinator.core.errors import DefinitionNotFound, FieldViolation, InvalidDefinition
from coordinator.core.model import RetryPolicy, SagaDefinition, StepKind

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
NAME_RULE = "1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit"
MAX_STEPS = 100
MAX_BACKOFF = timedelta(hours=24)
MAX_TIMEOUT = timedelta(hours=1)
MAX_DEADLINE = timedelta(days=366)
EVENT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,127}$")


def is_valid_name(name: str) -> bool:
    """Whether ``name`` is a valid saga id, definition name or step name (``NAME_RULE``)."""
    return NAME_PATTERN.match(name) is not None


def definition_violations(
    definition: SagaDefinition, participants: Collection[str]
) -> list[FieldViolation]:
    """Everything wrong with a definition, each with the path of the offending field."""
    problems: list[FieldViolation] = []

    def bad(path: str, description: str) -> None:
        problems.append(FieldViolation(path, description))

    if not NAME_PATTERN.match(definition.name):
        bad("name", "must be 1 to 128 letters, digits, '.', '_' or '-', starting alphanumeric")
    if definition.version < 1:
        bad("version", "must be at least 1")
    deadline = definition.deadline
    if deadline is not None and not timedelta(seconds=1) <= deadline <= MAX_DEADLINE:
        bad("deadline", f"must be from 1s to {MAX_DEADLINE.days} days")
    if not definition.steps:
        bad("steps", "a saga needs at least one step")
    if len(definition.steps) > MAX_STEPS:
        bad("steps", f"at most {MAX_STEPS} steps")
    seen: set[str] = set()
    pivot_at: int | None = None
    for index, step in enumerate(definition.steps):
        path = f"steps[{index}]"
        if not NAME_PATTERN.match(step.name):
            bad(f"{path}.name", "must be 1 to 128 letters, digits, '.', '_' or '-'")
        elif step.name in seen:
            bad(f"{path}.name", f"duplicate step name {step.name!r}")
        seen.add(step.name)
        if not step.participant:
            bad(f"{path}.participant", "is required")
        elif step.participant not in participants:
            known = ", ".join(sorted(participants)) or "none"
            bad(f"{path}.participant", f"unknown participant {step.participant!r} (known: {known})")
        if not step.action:
            bad(f"{path}.action", "is required")
        if step.kind is StepKind.COMPENSATABLE:
            if not step.compensation:
                bad(f"{path}.compensation", "a compensatable step needs a compensation action")
            if pivot_at is not None:
                bad(
                    f"{path}.kind",
                    f"a compensatable step cannot follow the pivot step "
                    f"{definition.steps[pivot_at].name!r}: after the pivot, steps are retriable",
                )
        elif step.compensation:
            bad(
                f"{path}.compensation",
                f"a {step.kind.lower()} step is never compensated; remove its compensation",
            )
        if step.kind is StepKind.PIVOT:
            if pivot_at is not None:
                bad(f"{path}.kind", "a saga has at most one pivot step")
            pivot_at = index if pivot_at is None else pivot_at
        if step.kind is StepKind.RETRIABLE and pivot_at is None:
            bad(f"{path}.kind", "a retriable step must come after a pivot step")
        if step.max_attempts < 0:
            bad(f"{path}.max_attempts", "must not be negative")
        elif step.max_attempts and step.kind is StepKind.COMPENSATABLE:
            bad(
                f"{path}.max_attempts",
                "only pivot and retriable steps take max_attempts; a compensatable step's "
                "budget is retry.max_attempts",
            )
        if step.emits and not EVENT_NAME.match(step.emits):
            bad(f"{path}.emits", "an event name: a letter, then letters, digits, '_', '.', '-'")
        if step.timeout.total_seconds() <= 0:
            bad(f"{path}.timeout", "must be positive")
        elif step.timeout > MAX_TIMEOUT:
            bad(f"{path}.timeout", f"at most {MAX_TIMEOUT}")
        problems.extend(retry_violations(f"{path}.retry", step.retry))
        problems.extend(retry_violations(f"{path}.compensation_retry", step.compensation_retry))
    return problems


def retry_violations(path: str, policy: RetryPolicy) -> Iterable[FieldViolation]:
    """Everything wrong with a retry policy, each with its path under ``path``."""
    if policy.max_attempts < 1:
        yield FieldViolation(f"{path}.max_attempts", "must be at least 1")
    if policy.initial_backoff.total_seconds() < 0:
        yield FieldViolation(f"{path}.initial_backoff", "must not be negative")
    if policy.max_backoff < policy.initial_backoff:
        yield FieldViolation(f"{path}.max_backoff", "must not be below initial_backoff")
    if policy.max_backoff > MAX_BACKOFF:
        yield FieldViolation(f"{path}.max_backoff", f"at most {MAX_BACKOFF}")
    if not 1.0 <= policy.multiplier <= 10.0:
        yield FieldViolation(f"{path}.backoff_multiplier", "must be from 1 to 10")
    if not 0.0 <= policy.jitter <= 1.0:
        yield FieldViolation(f"{path}.jitter", "must be from 0 to 1")


def validate_definition(
    definition: SagaDefinition, participants: Collection[str], source: str
) -> SagaDefinition:
    """Return the definition, or raise InvalidDefinition naming the source and the fields."""
    problems = definition_violations(definition, participants)
    if problems:
        details = "; ".join(f"{p.field}: {p.description}" for p in problems)
        raise InvalidDefinition(f"{source}: invalid saga definition: {details}", tuple(problems))
    return definition


@dataclass(frozen=True)
class DefinitionCatalog:
    """The definitions a coordinator runs, by name and version."""

    by_name: Mapping[str, Mapping[int, SagaDefinition]] = field(default_factory=dict)

    @classmethod
    def of(cls, definitions: Iterable[SagaDefinition]) -> DefinitionCatalog:
        """A catalog of these definitions; a name and version may appear once."""
        by_name: dict[str, dict[int, SagaDefinition]] = {}
        for definition in definitions:
            versions = by_name.setdefault(definition.name, {})
            if definition.version in versions:
                raise InvalidDefinition(
                    f"definition {definition.name!r} version {definition.version} is defined twice",
                    (FieldViolation("version", "duplicate name and version"),),
                )
            versions[definition.version] = definition
        return cls(by_name)

    def resolve(self, name: str, version: int = 0) -> SagaDefinition:
        """The definition of this name and version (0: the newest)."""
        versions = self.by_name.get(name)
        if not versions:
            known = ", ".join(sorted(self.by_name)[:50]) or "none"
            raise DefinitionNotFound(f"no saga definition named {name[:200]!r} (known: {known})")
        if version == 0:
            return versions[max(versions)]
        if version not in versions:
            have = ", ".join(str(v) for v in sorted(versions))
            raise DefinitionNotFound(
                f"saga definition {name!r} has no version {version} (versions: {have})"
            )
        return versions[version]

    def all(self) -> list[SagaDefinition]:
        """Every definition, by name then version."""
        return [
            self.by_name[name][version]
            for name in sorted(self.by_name)
            for version in sorted(self.by_name[name])
        ]
