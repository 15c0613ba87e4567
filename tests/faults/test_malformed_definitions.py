"""Malformed definition files: ``saga serve`` refuses to start, exit code 2, promptly, with a
message that names the file and what is wrong; never a traceback, a crash or a hang."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.faults.support import deploy, one_step_definition, serve_and_exit

PROMPTLY = 20.0
"""Seconds within which the coordinator must have refused."""


def _valid(**changes: Any) -> str:
    definition = one_step_definition("bad")
    definition.update(changes)
    return yaml.safe_dump(definition, sort_keys=False)


def _step(**changes: Any) -> str:
    definition = one_step_definition("bad")
    definition["steps"][0].update(changes)
    return yaml.safe_dump(definition, sort_keys=False)


def _many_steps(count: int) -> str:
    definition = one_step_definition("bad")
    step = definition["steps"][0]
    definition["steps"] = [{**step, "name": f"s{i}"} for i in range(count)]
    return yaml.safe_dump(definition, sort_keys=False)


def _alias_bomb() -> str:
    # Eight levels of ten aliases: 600 bytes that expand to a hundred million nodes (seven
    # levels took 23 s and 490 MB before being refused).
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 8):
        refs = ", ".join([f"*a{level - 1}"] * 10)
        lines.append(f"a{level}: &a{level} [{refs}]")
    lines += ["name: bad", "version: 1", "steps: *a7"]
    return "\n".join(lines) + "\n"


MALFORMED: dict[str, tuple[str, bytes | str, tuple[str, ...]]] = {
    # case: (file name, content, words the message must contain)
    "not YAML": ("bad.yaml", "name: [unclosed\nsteps: {", ("not valid YAML",)),
    "not JSON": ("bad.json", '{"name": "bad", ', ("not valid JSON",)),
    "not UTF-8": ("bad.yaml", b"\xff\xfe\x00garbage\x00", ("cannot read",)),
    "not a mapping": ("bad.yaml", "- just\n- a list\n", ("mapping",)),
    "empty": ("bad.yaml", "", ("mapping",)),
    "an unknown field": ("bad.yaml", _valid(colour="blue"), ("colour",)),
    "a version that is not a number": ("bad.yaml", _valid(version="one"), ("version",)),
    "no steps": ("bad.yaml", _valid(steps=[]), ("steps",)),
    "an unknown participant": ("bad.yaml", _step(participant="nobody"), ("nobody",)),
    "a compensatable step without compensation": (
        "bad.yaml",
        _step(compensation=""),
        ("compensation",),
    ),
    "a duration that is not one": ("bad.yaml", _step(timeout="5 parsecs"), ("timeout",)),
    "a negative timeout": ("bad.yaml", _step(timeout=-1), ("timeout",)),
    "a retry policy out of range": (
        "bad.yaml",
        _step(retry={"max_attempts": 3, "jitter": 7}),
        ("jitter",),
    ),
    "an invalid step name": ("bad.yaml", _step(name="no spaces allowed"), ("name",)),
    "too many steps": ("bad.yaml", _many_steps(101), ("at most",)),
    "a step kind that does not exist": ("bad.yaml", _step(kind="optional"), ("kind",)),
    "nesting ten thousand levels deep": (
        "bad.yaml",
        "name: bad\nversion: 1\nsteps: " + "[" * 10_000 + "]" * 10_000 + "\n",
        ("steps", "nest", "deep"),
    ),
    "aliases that expand to a hundred million nodes": (
        "bad.yaml",
        _alias_bomb(),
        ("more than 100000 values",),
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_definition_is_refused_at_start_with_the_file_named(
    tmp_path: Path, case: str
) -> None:
    name, content, words = MALFORMED[case]
    deployment = deploy(tmp_path, [one_step_definition("good")])
    path = deployment.directory / "definitions" / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)

    started = time.monotonic()
    try:
        done = serve_and_exit(deployment.config, timeout=PROMPTLY)
    except subprocess.TimeoutExpired:
        pytest.fail(f"saga serve still ran after {PROMPTLY}s on {case}: it hangs at start")
    took = time.monotonic() - started

    output = done.stdout + done.stderr
    assert done.returncode == 2, f"exit code {done.returncode}:\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    assert str(path) in output, f"the message does not name the file:\n{output[-3000:]}"
    assert any(word in output for word in words), output[-3000:]
    assert took < PROMPTLY


def test_two_files_with_the_same_name_and_version_are_refused(tmp_path: Path) -> None:
    deployment = deploy(tmp_path, [one_step_definition("twice")])
    copy = deployment.directory / "definitions" / "copy.yaml"
    copy.write_text(yaml.safe_dump(one_step_definition("twice")))

    done = serve_and_exit(deployment.config)

    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "'twice'" in output, output
    assert "defined twice" in output, output
    assert "Traceback" not in output, output
