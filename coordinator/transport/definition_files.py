"""Saga definitions read from YAML or JSON files, checked against the proto's SagaDefinition."""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format
from saga.v1 import saga_pb2

from coordinator.core.definitions import DefinitionCatalog, validate_definition
from coordinator.core.errors import FieldViolation, InvalidDefinition
from coordinator.core.model import SagaDefinition
from coordinator.transport.convert import definition_from_proto

SUFFIXES = (".yaml", ".yml", ".json")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_DURATION_FIELDS = (
    "timeout",
    "initial_backoff",
    "initialBackoff",
    "max_backoff",
    "maxBackoff",
    "deadline",
)


def _normalise_duration(value: Any, path: str) -> Any:
    """Accept 2, 1.5, "500ms", "2s", "1m" as well as the proto JSON form "2s"."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return f"{float(value)}s"
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match is None:
            raise InvalidDefinition(
                f"{path}: expected a duration like 500ms, 2s or 1m, got {value!r}",
                (FieldViolation(path, "expected a duration like 500ms, 2s or 1m"),),
            )
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        return f"{seconds:.9f}s"
    return value


_ZERO_MEANS_DEFAULT = (
    "timeout",
    "initial_backoff",
    "initialBackoff",
    "max_backoff",
    "maxBackoff",
    "max_attempts",
    "maxAttempts",
    "backoff_multiplier",
    "backoffMultiplier",
)


def _refuse_explicit_zero(key: str, value: Any, path: str) -> None:
    """In the proto a zero means "the default"; written out in a file it is a mistake."""
    zero = value == 0 if isinstance(value, int | float) and not isinstance(value, bool) else False
    if isinstance(value, str):
        match = _DURATION.match(value)
        zero = match is not None and float(match.group(1)) == 0
    if zero and key in _ZERO_MEANS_DEFAULT:
        description = "must be positive; leave it out for the default"
        raise InvalidDefinition(f"{path}: {description}", (FieldViolation(path, description),))


MAX_NODES = 100_000
"""More values than a saga definition could hold: a file of nested YAML aliases (anchors used
many times over) expands to that, and is refused before it eats the memory."""


def _normalise(raw: Any, path: str = "", budget: list[int] | None = None) -> Any:
    """Friendly spellings of the YAML form, turned into the proto JSON form."""
    budget = [MAX_NODES] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0:
        where = path.split("[")[0].split(".")[0] or "the file"
        raise InvalidDefinition(
            f"{where}: more than {MAX_NODES} values, not a saga definition (nested YAML aliases?)",
            (FieldViolation(where, f"more than {MAX_NODES} values"),),
        )
    if isinstance(raw, dict):
        result = {}
        for key, value in raw.items():
            child = f"{path}.{key}" if path else str(key)
            _refuse_explicit_zero(key, value, child)
            if key in _DURATION_FIELDS:
                result[key] = _normalise_duration(value, child)
            elif key == "kind" and isinstance(value, str) and not value.startswith("STEP_KIND_"):
                result[key] = "STEP_KIND_" + value.upper()
            else:
                result[key] = _normalise(value, child, budget)
        return result
    if isinstance(raw, list):
        return [_normalise(item, f"{path}[{i}]", budget) for i, item in enumerate(raw)]
    return raw


def _message(raw: Any, source: str) -> saga_pb2.SagaDefinition:
    """The proto message of the parsed contents of one file; only its shape is checked."""
    if not isinstance(raw, dict):
        raise InvalidDefinition(
            f"{source}: a saga definition is a mapping (name, version, steps)",
            (FieldViolation("", "expected a mapping"),),
        )
    try:
        return json_format.ParseDict(
            _normalise(raw, ""), saga_pb2.SagaDefinition(), ignore_unknown_fields=False
        )
    except InvalidDefinition as error:
        raise InvalidDefinition(f"{source}: {error.message}", error.violations) from None
    except json_format.ParseError as error:
        raise InvalidDefinition(
            f"{source}: invalid saga definition: {error}", (FieldViolation("", str(error)),)
        ) from None


def parse_definition(raw: Any, source: str, participants: Collection[str]) -> SagaDefinition:
    """A validated definition from the parsed contents of one file."""
    message = _message(raw, source)
    return validate_definition(definition_from_proto(message), participants, source)


def _read(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidDefinition(f"{path}: cannot read: {error}") from None
    try:
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise InvalidDefinition(f"{path}: not valid {path.suffix[1:].upper()}: {error}") from None
    except RecursionError:
        raise InvalidDefinition(f"{path}: nested too deeply to be a saga definition") from None


def load_definition_file(path: Path, participants: Collection[str]) -> SagaDefinition:
    """Read and validate one definition file."""
    raw = _read(path)
    try:
        return parse_definition(raw, str(path), participants)
    except RecursionError:
        raise InvalidDefinition(f"{path}: nested too deeply to be a saga definition") from None


def read_definition_message(path: Path) -> saga_pb2.SagaDefinition:
    """The ``saga.v1.SagaDefinition`` message of one definition file, as a client sends it to
    RegisterDefinition.

    The file's friendly spellings (``2s``, ``500ms``, ``kind: pivot``) are turned into the
    proto's form and its shape is checked (YAML or JSON, known fields, their types); the rules
    of a definition and its participants are checked by whoever registers it
    (``load_definition_file`` checks both). Raises ``InvalidDefinition`` naming the file.
    """
    raw = _read(path)
    try:
        return _message(raw, str(path))
    except RecursionError:
        raise InvalidDefinition(f"{path}: nested too deeply to be a saga definition") from None


def load_definitions(directory: Path, participants: Collection[str]) -> DefinitionCatalog:
    """Every definition in a directory; any invalid file refuses them all, naming each problem."""
    if not directory.is_dir():
        raise InvalidDefinition(f"{directory}: not a directory of saga definitions")
    files = sorted(p for p in directory.iterdir() if p.suffix in SUFFIXES and p.is_file())
    definitions: list[SagaDefinition] = []
    problems: list[InvalidDefinition] = []
    for path in files:
        try:
            definitions.append(load_definition_file(path, participants))
        except InvalidDefinition as error:
            problems.append(error)
    if problems:
        raise InvalidDefinition(
            "\n".join(error.message for error in problems),
            tuple(v for error in problems for v in error.violations),
        )
    try:
        return DefinitionCatalog.of(definitions)
    except InvalidDefinition as error:
        raise InvalidDefinition(f"{directory}: {error.message}", error.violations) from None
