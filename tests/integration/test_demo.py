"""The main job, ``make demo``, as a newcomer runs it."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_demo_onboards_one_client_and_compensates_the_other(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "acme-corp SUCCEEDED, globex-corp COMPENSATED" in out
    backwards = [
        "compensation succeeded issue-card",
        "compensation succeeded open-account",
        "compensation succeeded create-user",
    ]
    positions = [out.index(line) for line in backwards]
    assert positions == sorted(positions)
    # Each service's own database tells the same story.
    with sqlite3.connect(tmp_path / "accounts.db") as db:
        rows = dict(db.execute("SELECT saga, status FROM accounts").fetchall())
    assert rows == {"acme-corp": "open", "globex-corp": "closed"}
    with sqlite3.connect(tmp_path / "identity.db") as db:
        users = dict(db.execute("SELECT saga, active FROM users").fetchall())
    assert users == {"acme-corp": 1, "globex-corp": 0}
    with sqlite3.connect(tmp_path / "cards.db") as db:  # the Node.js service's database
        cards = db.execute("SELECT saga_id, state FROM cards").fetchall()
    assert cards == [("acme-corp", "active")]
    with sqlite3.connect(tmp_path / "billing.db") as db:
        subscriptions = db.execute("SELECT saga, status FROM subscriptions").fetchall()
    assert subscriptions == [("acme-corp", "active")]
