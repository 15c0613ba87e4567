"""The README's examples are the files that the tests run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_node_participant_example_is_the_tested_example_file() -> None:
    readme = (ROOT / "README.md").read_text()
    (block,) = re.findall(r"```js\n(.*?)```", readme, flags=re.DOTALL)
    example = (ROOT / "clients" / "node" / "examples" / "participant.js").read_text()
    assert block.strip() == example.strip()
    assert len(block.strip().splitlines()) <= 30


def test_the_readme_gives_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme
    assert "make test" in readme
