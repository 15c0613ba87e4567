"""The main job, ``make demo``, as a newcomer runs it."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
STORY_EVENTS = ("UserCreated", "AccountOpened", "CardIssued", "SubscriptionCreated")


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
    # The watch lines read as the story: each service's success names its event; when the card
    # is refused, CardIssued never comes and the compensations are sent newest step first.
    words = " ".join(out.split())  # undo the terminal's line wrapping
    acme, globex = words.split("Onboarding Globex Corp")
    assert [name for name in STORY_EVENTS if f"emits {name}" not in acme] == []
    story = [
        "step succeeded create-user CreateUser attempt 1, emits UserCreated",
        "step succeeded open-account OpenAccount attempt 1, emits AccountOpened",
        "step rejected issue-card IssueCard attempt 1 (FAILED_PRECONDITION CARD_LIMIT_EXCEEDED: ",
        "compensation succeeded issue-card CancelCard",
        "compensation succeeded open-account CloseAccount",
        "compensation succeeded create-user DeactivateUser",
    ]
    told = [globex.index(line) for line in story]
    assert told == sorted(told)
    assert "CardIssued" not in globex
    assert "SubscriptionCreated" not in globex
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


def test_the_demo_runs_on_postgresql_with_two_replicas(tmp_path: Path, postgres_url: str) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "demo.py"),
            "--workdir",
            str(tmp_path),
            "--database",
            postgres_url,
            "--replicas",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    words = " ".join(result.stdout.split())
    assert "acme-corp SUCCEEDED, globex-corp COMPENSATED" in words
    first, second = (line.split()[2] for line in words.split("coordinator-")[1:3])
    # Created on the first replica, told step by step by the second.
    assert f"started sagas/acme-corp on {first} watching it on {second}" in words
    assert "emits SubscriptionCreated -> SUCCEEDED" in words
    assert "compensation succeeded create-user DeactivateUser attempt 1 -> COMPENSATED" in words


def test_the_demo_refuses_replicas_without_a_shared_store(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--replicas", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 2
    assert "--replicas above 1 needs a shared --database" in result.stderr


def test_the_demo_runs_with_tls_on_both_hops_and_a_token(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--secure", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    words = " ".join(result.stdout.split())
    assert "TLS on both hops" in words
    assert "acme-corp SUCCEEDED, globex-corp COMPENSATED" in words
    config = yaml.safe_load((tmp_path / "saga-1.yaml").read_text())
    assert config["tls"]["client_ca"]
    # The demo's client, and the console of `make console ARGS=--secure`.
    assert config["tls"]["allowed_clients"] == ["CN=demo-client", "CN=demo-console"]
    assert config["auth"]["tokens"]
    for name, endpoint in config["participants"].items():
        assert endpoint["tls"] is True, name
        assert endpoint["client_certificate"].endswith("coordinator-client.pem"), name
    tokens = yaml.safe_load(Path(config["auth"]["tokens"]).read_text())["tokens"]
    assert [(t["name"], t["roles"]) for t in tokens] == [
        ("demo-client", ["client"]),
        ("demo-console", ["operator"]),  # the console repairs sagas
    ]
    keys = sorted((tmp_path / "certs").glob("*.key"))
    assert len(keys) == 8
    assert all(key.stat().st_mode & 0o077 == 0 for key in keys)
    for token in ("demo-client.token", "demo-console.token"):
        assert (tmp_path / "certs" / token).stat().st_mode & 0o077 == 0
