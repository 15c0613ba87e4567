"""The change feed's part of the offline checker: what a consumer killed at random instants and
resumed from its stored position recorded (``tests.torture.feed_consumer``), against every
change of the feed the coordinators' store holds.

After dedupe by position, the consumer must hold every change of every saga exactly once, each
under the position, saga and sequence the store gave it, and each saga's changes in the order
they were committed. Within one life of the consumer the positions only grow.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

FIGURES = (
    "feed_changes_missed",
    "feed_changes_misdelivered",
    "feed_order_violations",
    "feed_positions_out_of_commit_order",
)

StoredChange = tuple[int, str, int]
"""(position, saga id, sequence) of one change of the feed, as the store gives it."""


class Report(Protocol):
    """The part of the checker's report this check writes to."""

    info: dict[str, Any]

    def violation(self, figure: str, example: str, count: int = 1) -> None: ...


def check_feed(report: Report, feed: Sequence[StoredChange], consumer_dir: Path) -> None:
    """Count the feed's broken promises into ``report``, given every change of the ``feed`` as
    the store holds it; see the module docstring."""
    stored = _stored_changes(report, feed)
    lines = _consumer_lines(consumer_dir / "changes.jsonl")
    seen: dict[int, tuple[str, int]] = {}
    last_in_life: dict[int, int] = {}
    last_sequence: dict[str, int] = {}
    duplicates = 0
    for line in lines:
        position, life = int(line["position"]), int(line["life"])
        change = (str(line["saga_id"]), int(line["sequence"]))
        if position <= last_in_life.get(life, 0):
            report.violation(
                "feed_order_violations",
                f"life {life}: position {position} after {last_in_life[life]}",
            )
        last_in_life[life] = max(position, last_in_life.get(life, 0))
        if stored.get(position) != change:
            report.violation(
                "feed_changes_misdelivered",
                f"@{position}: delivered {change}, stored {stored.get(position)}",
            )
        if position in seen:
            duplicates += 1
            continue
        seen[position] = change
        saga_id, sequence = change
        if sequence <= last_sequence.get(saga_id, 0):
            report.violation(
                "feed_order_violations",
                f"{saga_id}: sequence {sequence} after {last_sequence[saga_id]}",
            )
        last_sequence[saga_id] = max(sequence, last_sequence.get(saga_id, 0))
    for position in sorted(set(stored) - set(seen)):
        report.violation("feed_changes_missed", f"@{position}: {stored[position]}")
    report.info["feed"] = {
        "changes_stored": len(stored),
        "changes_delivered": len(lines),
        "duplicates_after_restarts": duplicates,
        "consumer_lives": len(last_in_life),
        "sagas": len({saga_id for saga_id, _ in stored.values()}),
    }


def _stored_changes(report: Report, feed: Sequence[StoredChange]) -> dict[int, tuple[str, int]]:
    """Every change of the feed by its position; checks positions follow each log's order."""
    changes: dict[int, tuple[str, int]] = {}
    last: dict[str, int] = defaultdict(int)
    for position, saga_id, sequence in sorted(feed, key=lambda change: change[1:]):
        if position <= last[saga_id]:
            report.violation(
                "feed_positions_out_of_commit_order",
                f"{saga_id}#{sequence}: position {position} after {last[saga_id]}",
            )
            continue
        last[saga_id] = position
        changes[position] = (saga_id, sequence)
    return changes


def _consumer_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]
