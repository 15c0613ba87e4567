"""The feed check counts what a consumer missed, got wrong or got out of order, and nothing more:
replays after a restart are what dedupe by position is for."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.torture.checker import CheckReport
from tests.torture.feed_check import StoredChange, check_feed

STORED: list[StoredChange] = [(1, "a", 1), (2, "b", 1), (3, "a", 2), (4, "b", 2), (5, "a", 3)]
"""(position, saga, sequence) as the store's feed gives them."""


def delivered(directory: Path, lives: Sequence[Sequence[tuple[int, str, int]]]) -> Path:
    """Write what a consumer recorded, life after life."""
    lines = [
        {"life": life, "position": p, "saga_id": s, "sequence": q, "type": "X", "state": "RUNNING"}
        for life, changes in enumerate(lives, start=1)
        for p, s, q in changes
    ]
    (directory / "changes.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return directory


def check(directory: Path, feed: Sequence[StoredChange] = STORED) -> CheckReport:
    report = CheckReport()
    check_feed(report, feed, directory)
    return report


def broken(report: CheckReport) -> dict[str, Any]:
    return {name: count for name, count in report.figures.items() if count}


def test_replays_after_restarts_are_deduped_by_position(tmp_path: Path) -> None:
    report = check(delivered(tmp_path, [STORED[:3], STORED[2:4], STORED[3:]]))

    assert broken(report) == {}
    assert report.info["feed"] == {
        "changes_stored": 5,
        "changes_delivered": 7,
        "duplicates_after_restarts": 2,
        "consumer_lives": 3,
        "sagas": 2,
    }


def test_a_change_no_life_delivered_is_missed(tmp_path: Path) -> None:
    report = check(delivered(tmp_path, [STORED[:2], STORED[3:]]))

    assert broken(report) == {"feed_changes_missed": 1}
    assert report.examples["feed_changes_missed"] == ["@3: ('a', 2)"]


def test_a_change_under_another_position_is_misdelivered(tmp_path: Path) -> None:
    wrong = [*STORED[:4], (5, "b", 3)]

    report = check(delivered(tmp_path, [wrong]))

    assert broken(report) == {"feed_changes_misdelivered": 1}


def test_a_feed_going_backwards_within_a_life_is_an_order_violation(tmp_path: Path) -> None:
    report = check(delivered(tmp_path, [[STORED[0], STORED[2], STORED[1], *STORED[3:]]]))

    assert broken(report) == {"feed_order_violations": 1}


def test_a_saga_seen_out_of_its_commit_order_is_an_order_violation(tmp_path: Path) -> None:
    # The second life starts after position 3 but the first never delivered it: a's change #2
    # arrives after its #3.
    report = check(delivered(tmp_path, [[STORED[0], STORED[1], STORED[4]], STORED[2:4]]))

    assert broken(report) == {"feed_order_violations": 1}


def test_positions_that_do_not_follow_a_log_are_out_of_commit_order(tmp_path: Path) -> None:
    feed: list[StoredChange] = [(1, "a", 2), (2, "a", 1)]

    report = check(delivered(tmp_path, [feed]), feed)

    assert report.figures["feed_positions_out_of_commit_order"] == 1
