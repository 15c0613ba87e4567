"""Operating sagas with the ``saga`` command as an operator does: the actions and their
refusals, the audit trail, the event log, labels and filters, the definitions registry and
pruning, each against a real coordinator process on a real SQLite file."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from tests.support.coordinator import FAST_RETRY, four_step_definition, write_definitions
from tests.support.participants import Answer, ScriptedParticipant, error, reject
from tests.support.processes import CoordinatorProcess, free_port

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
ACTOR = "ops@example"


def shipping_definition() -> dict[str, Any]:
    """reserve (compensatable), charge (the pivot), notify (retriable, parked after 2 tries)."""
    return {
        "name": "ship",
        "version": 1,
        "retry": FAST_RETRY,
        "compensation_retry": FAST_RETRY,
        "steps": [
            {
                "name": "reserve",
                "participant": "identity",
                "action": "Reserve",
                "compensation": "Release",
                "timeout": "2s",
            },
            {
                "name": "charge",
                "participant": "billing",
                "action": "Charge",
                "kind": "pivot",
                "max_attempts": 2,
            },
            {
                "name": "notify",
                "participant": "cards",
                "action": "Notify",
                "kind": "retriable",
                "max_attempts": 2,
                "emits": "CustomerNotified",
            },
        ],
    }


class Saga:
    """The ``saga`` command, run as a user runs it, against one coordinator."""

    def __init__(self, target: str) -> None:
        self.target = target

    async def __call__(
        self, *args: str, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``saga ARGS --target ...`` in a child process (the participants keep serving)."""
        return await asyncio.to_thread(run, *args, "--target", self.target, env=env)

    async def json(self, *args: str) -> Any:
        """Run a command that must succeed with ``--output json``; return what it printed."""
        result = await self(*args, "--output", "json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    async def settled(self, saga_id: str) -> dict[str, Any]:
        """Watch the saga until it settles; return it as ``saga get`` shows it."""
        watched = await self("watch", saga_id)
        assert watched.returncode == 0, watched.stderr
        shown: dict[str, Any] = await self.json("get", saga_id)
        return shown


def run(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``saga ARGS`` in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "coordinator.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
async def coordinator(
    tmp_path: Path, participants: dict[str, ScriptedParticipant]
) -> AsyncIterator[CoordinatorProcess]:
    write_definitions(
        tmp_path / "definitions", [four_step_definition("onboard"), shipping_definition()]
    )
    process = CoordinatorProcess.configure(
        tmp_path / "saga.yaml", tmp_path / "saga.db", participants
    )
    await process.start()
    yield process
    if process.process is not None and process.process.poll() is None:
        await process.stop()


@pytest.fixture
def saga(coordinator: CoordinatorProcess) -> Saga:
    return Saga(coordinator.target)


def break_compensation(participant: ScriptedParticipant, action: str) -> list[bool]:
    """Make ``action`` answer UNAVAILABLE while the returned flag holds True."""
    broken = [True]

    def rule(request: Any) -> Answer | None:
        return error(UNAVAILABLE, "ledger down") if broken[0] and request.action == action else None

    participant.rule = rule
    return broken


def refuse_cards(participants: dict[str, ScriptedParticipant]) -> None:
    """Cards refuses the card of every saga whose input asks for it."""
    participants["cards"].script("IssueCard", reject("CARD_LIMIT", "limit too high"))


async def park_on_close_account(
    saga: Saga, participants: dict[str, ScriptedParticipant], saga_id: str
) -> list[bool]:
    """Start an onboarding whose card is refused and whose CloseAccount keeps failing: the
    saga parks in NEEDS_ATTENTION on open-account's compensation."""
    refuse_cards(participants)
    broken = break_compensation(participants["accounts"], "CloseAccount")
    started = await saga("start", "onboard", "--id", saga_id, "--wait", "--json")
    assert started.returncode == 1, started.stderr  # it did not succeed
    assert json.loads(started.stdout)["state"] == "NEEDS_ATTENTION"
    return broken


async def test_resume_after_the_compensation_is_fixed_ends_compensated_with_an_audit_trail(
    saga: Saga, participants: dict[str, ScriptedParticipant]
) -> None:
    broken = await park_on_close_account(saga, participants, "globex")
    parked = await saga.json("get", "globex")
    assert [s["state"] for s in parked["steps"]] == [
        "SUCCEEDED",
        "COMPENSATING",
        "COMPENSATED",
        "PENDING",
    ]

    # Refused: what does not fit the state, a stale version, no reason, an unknown saga.
    wrong = await saga("complete", "globex", "--reason", "looks done")
    assert wrong.returncode == 1
    assert "FAILED_PRECONDITION ACTION_NOT_ALLOWED" in wrong.stderr
    assert "NEEDS_ATTENTION" in wrong.stderr
    assert "what fits now: resume step 'open-account'" in wrong.stderr
    stale = await saga("resume", "globex", "--reason", "fixed", "--expected-version", "1")
    assert stale.returncode == 1
    assert "ABORTED SAGA_VERSION_MISMATCH" in stale.stderr
    no_reason = await saga("resume", "globex")
    assert no_reason.returncode == 2
    assert "the following arguments are required: --reason" in no_reason.stderr
    empty_reason = await saga("resume", "globex", "--reason", "")
    assert empty_reason.returncode == 2
    assert "INVALID_ARGUMENT" in empty_reason.stderr
    assert "reason" in empty_reason.stderr
    ghost = await saga("resume", "ghost", "--reason", "fixed")
    assert ghost.returncode == 3
    assert "NOT_FOUND SAGA_NOT_FOUND" in ghost.stderr
    assert (await saga.json("get", "globex"))["audit"] == []  # nothing refused was recorded

    broken[0] = False
    resumed = await saga.json(
        "resume",
        "globex",
        "--reason",
        "ledger is back",
        "--actor",
        ACTOR,
        "--expected-version",
        str(parked["version"]),
        "--max-attempts",
        "5",
        "--initial-backoff",
        "10ms",
        "--max-backoff",
        "50ms",
    )
    assert resumed["state"] in ("COMPENSATING", "COMPENSATED")
    done = await saga.settled("globex")
    assert done["state"] == "COMPENSATED"
    assert [s["state"] for s in done["steps"]] == ["COMPENSATED"] * 3 + ["PENDING"]
    (entry,) = done["audit"]
    assert entry["action"] == "RESUME"
    assert entry["actor"] == ACTOR
    assert entry["reason"] == "ledger is back"
    assert entry["step"] == "open-account"
    assert entry["sequence"] == parked["version"] + 1

    again = await saga("resume", "globex", "--reason", "once more")
    assert again.returncode == 1
    assert "ACTION_NOT_ALLOWED" in again.stderr
    assert "what fits now: none" in again.stderr


async def test_events_name_every_action_and_compensation_sent(
    saga: Saga, participants: dict[str, ScriptedParticipant]
) -> None:
    broken = await park_on_close_account(saga, participants, "globex")
    broken[0] = False
    assert (
        await saga("resume", "globex", "--reason", "ledger is back", "--actor", ACTOR)
    ).returncode == 0
    assert (await saga.settled("globex"))["state"] == "COMPENSATED"

    events = await saga.json("events", "globex")
    sent = [(e["type"], e["step"], e["action"]) for e in events if e["action"]]
    assert sent[:4] == [
        ("STEP_SUCCEEDED", "create-user", "CreateUser"),
        ("STEP_SUCCEEDED", "open-account", "OpenAccount"),
        ("STEP_REJECTED", "issue-card", "IssueCard"),
        ("COMPENSATION_SUCCEEDED", "issue-card", "CancelCard"),
    ]
    compensated = [e["action"] for e in events if e["type"] == "COMPENSATION_SUCCEEDED"]
    assert compensated == ["CancelCard", "CloseAccount", "DeactivateUser"]
    failed = [e for e in events if e["type"] == "COMPENSATION_ATTEMPT_FAILED"]
    assert [e["attempt"] for e in failed] == [1, 2, 3]
    assert {e["action"] for e in failed} == {"CloseAccount"}
    assert [e["sequence"] for e in events] == list(range(1, len(events) + 1))

    shown = await saga("events", "globex")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert len(lines) == len(events)  # one line per event
    assert lines[0].startswith("#1 ")
    rejected = next(line for line in lines if "step rejected" in line)
    assert "issue-card" in rejected
    assert "IssueCard" in rejected
    assert "FAILED_PRECONDITION CARD_LIMIT: limit too high" in rejected
    backwards = [line for line in lines if "compensation succeeded" in line]
    assert ["CancelCard" in backwards[0], "CloseAccount" in backwards[1]] == [True, True]
    assert "DeactivateUser" in backwards[2]
    retried = [line for line in lines if "compensation attempt failed" in line]
    assert all("open-account" in line and "CloseAccount" in line for line in retried)
    assert "attempt 3" in retried[-1]
    assert "UNAVAILABLE" in retried[-1]
    (resumed,) = [line for line in lines if "resumed" in line]
    assert f"by {ACTOR}: ledger is back" in resumed

    got = await saga("get", "globex", "--events")
    assert got.returncode == 0, got.stderr
    assert "audit" in got.stdout
    assert ACTOR in got.stdout
    assert "DeactivateUser" in got.stdout
    with_events = await saga.json("get", "globex", "--events")
    assert [e["sequence"] for e in with_events["events"]] == [e["sequence"] for e in events]


async def test_events_without_an_id_read_the_change_feed_and_resume_after_a_position(
    saga: Saga, participants: dict[str, ScriptedParticipant]
) -> None:
    for saga_id in ("feed-1", "feed-2"):
        started = await saga("start", "onboard", "--id", saga_id, "--label", f"who={saga_id}")
        assert started.returncode == 0, started.stderr
        await saga.settled(saga_id)

    def lines_of(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
        assert result.returncode == 0, result.stderr
        return [json.loads(line) for line in result.stdout.splitlines()]

    feed = lines_of(await saga("events", "--output", "json"))
    positions = [change["position"] for change in feed]
    assert positions == sorted(set(positions))
    assert [(c["saga_id"], c["event"]["sequence"]) for c in feed] == [
        ("feed-1", n) for n in range(1, 6)
    ] + [("feed-2", n) for n in range(1, 6)]
    assert feed[-1]["state"] == "SUCCEEDED"
    assert feed[0]["labels"] == {"who": "feed-1"}

    rest = lines_of(await saga("events", "--from", str(positions[4]), "--output", "json"))
    assert [c["position"] for c in rest] == positions[5:]
    ended = lines_of(
        await saga("events", "--state", "succeeded", "--label", "who=feed-2", "--output", "json")
    )
    assert [(c["saga_id"], c["state"]) for c in ended] == [("feed-2", "SUCCEEDED")]

    human = await saga("events", "--definition", "onboard")
    assert human.returncode == 0, human.stderr
    first = human.stdout.splitlines()[0]
    assert first.startswith(f"@{positions[0]} feed-1 onboard v1 #1 created")
    mixed = await saga("events", "feed-1", "--follow")
    assert mixed.returncode == 2
    assert "without a saga ID" in mixed.stderr


async def test_watch_lines_name_the_action_or_compensation_sent(
    saga: Saga, participants: dict[str, ScriptedParticipant]
) -> None:
    refuse_cards(participants)
    participants["identity"].script("CreateUser", Answer(output=b"{}", delay=1.5))
    assert (await saga("start", "onboard", "--id", "watched")).returncode == 0

    watched = await saga("watch", "watched")

    assert watched.returncode == 0, watched.stderr
    lines = watched.stdout.splitlines()
    assert lines[0] == "watched: RUNNING (version 1)"
    assert "#2 step succeeded create-user CreateUser attempt 1 -> RUNNING" in lines
    assert any(
        line.startswith("#4 step rejected issue-card IssueCard attempt 1 (FAILED_PRECONDITION")
        for line in lines
    )
    backwards = [line for line in lines if "compensation succeeded" in line]
    assert [line.split()[4] for line in backwards] == [
        "CancelCard",
        "CloseAccount",
        "DeactivateUser",
    ]
    assert lines[-1].endswith("-> COMPENSATED")


async def test_mark_compensated_records_the_step_undone_by_hand(
    saga: Saga, participants: dict[str, ScriptedParticipant]
) -> None:
    await park_on_close_account(saga, participants, "by-hand")

    wrong_step = await saga("mark-compensated", "by-hand", "create-user", "--reason", "x")
    assert wrong_step.returncode == 1
    assert "ACTION_NOT_ALLOWED" in wrong_step.stderr
    assert "mark-compensated step 'open-account'" in wrong_step.stderr

    marked = await saga(
        "mark-compensated",
        "by-hand",
        "open-account",
        "--reason",
        "closed in the ledger by hand",
        env={"SAGA_ACTOR": "night-shift@example"},
    )
    assert marked.returncode == 0, marked.stderr
    assert "marked compensated: sagas/by-hand step open-account" in marked.stdout
    done = await saga.settled("by-hand")
    assert done["state"] == "COMPENSATED"
    step = done["steps"][1]
    assert (step["state"], step["by_operator"]) == ("COMPENSATED", True)
    assert done["steps"][0]["by_operator"] is False
    (entry,) = done["audit"]
    assert (entry["action"], entry["actor"], entry["step"]) == (
        "MARK_COMPENSATED",
        "night-shift@example",
        "open-account",
    )
    # CloseAccount itself never succeeded; create-user was compensated after the mark.
    assert [c.compensate.action for c in participants["identity"].calls("compensate")] == [
        "DeactivateUser"
    ]
    lines = (await saga("events", "by-hand")).stdout.splitlines()
    (mark,) = [line for line in lines if "step marked compensated" in line]
    assert "open-account" in mark
    assert "CloseAccount" in mark
    assert "by night-shift@example: closed in the ledger by hand" in mark


async def test_complete_and_retry_a_parked_retriable_step(
    saga: Saga, participants: dict[str, ScriptedParticipant]
) -> None:
    broken = [True]
    participants["cards"].rule = lambda r: (
        error(UNAVAILABLE, "mail down") if broken[0] and r.action == "Notify" else None
    )
    for saga_id in ("by-phone", "later"):
        started = await saga("start", "ship", "--id", saga_id, "--wait", "--json")
        assert started.returncode == 1
        parked = json.loads(started.stdout)
        assert parked["state"] == "NEEDS_ATTENTION"
        assert parked["steps"][2]["state"] in ("FAILED", "REJECTED")

    stuck = await saga.json("list", "--stuck-on", "cards")
    assert [s["saga_id"] for s in stuck] == ["by-phone", "later"]
    assert await saga.json("list", "--stuck-on", "accounts") == []
    assert len(await saga.json("list", "--stuck-on-step", "notify")) == 2
    assert await saga.json("list", "--stuck-on-step", "reserve") == []

    bad_output = await saga("complete", "by-phone", "notify", "--reason", "x", "--result", "{no")
    assert bad_output.returncode == 2
    assert "--result is not valid JSON" in bad_output.stderr
    wrong_step = await saga("complete", "by-phone", "reserve", "--reason", "x")
    assert wrong_step.returncode == 1
    assert "complete step 'notify'" in wrong_step.stderr

    completed = await saga.json(
        "complete",
        "by-phone",
        "notify",
        "--reason",
        "told the customer by phone",
        "--result",
        '{"sent": "by phone"}',
        "--actor",
        ACTOR,
    )
    assert completed["state"] == "SUCCEEDED"
    step = completed["steps"][2]
    assert (step["state"], step["by_operator"], step["output"]) == (
        "SUCCEEDED",
        True,
        {"sent": "by phone"},
    )
    assert [(a["action"], a["actor"]) for a in completed["audit"]] == [("COMPLETE", ACTOR)]
    line = next(
        line
        for line in (await saga("events", "by-phone")).stdout.splitlines()
        if "step completed" in line
    )
    assert "notify" in line
    assert "Notify" in line
    assert f"by {ACTOR}: told the customer by phone" in line
    assert "emits CustomerNotified" in line

    broken[0] = False
    retried = await saga("retry", "later", "--reason", "mail is back", "--actor", ACTOR)
    assert retried.returncode == 0, retried.stderr
    assert "retry sent for sagas/later" in retried.stdout
    done = await saga.settled("later")
    assert done["state"] == "SUCCEEDED"
    assert done["steps"][2]["by_operator"] is False
    assert [(a["action"], a["step"]) for a in done["audit"]] == [("RETRY", "notify")]

    ended = await saga("complete", "later", "--reason", "again", "--output", "json")
    assert ended.returncode == 1
    assert "ACTION_NOT_ALLOWED" in ended.stderr
    assert await saga.json("list", "--stuck-on", "cards") == []


async def test_cancel_records_who_cancelled_and_refuses_an_ended_saga(
    saga: Saga, participants: dict[str, ScriptedParticipant]
) -> None:
    calling = asyncio.Event()

    def slow(request: Any) -> Answer | None:
        if request.action == "OpenAccount":
            calling.set()
            return Answer(output=b"{}", delay=1.0)
        return None

    participants["accounts"].rule = slow
    assert (await saga("start", "onboard", "--id", "leaving")).returncode == 0
    await asyncio.wait_for(calling.wait(), 10)

    cancelled = await saga.json(
        "cancel", "leaving", "--reason", "customer left", "--actor", "support@example"
    )
    assert cancelled["state"] == "COMPENSATING"
    assert cancelled["cancel_reason"] == "customer left"
    done = await saga.settled("leaving")
    assert done["state"] == "COMPENSATED"
    assert [(a["action"], a["actor"], a["reason"]) for a in done["audit"]] == [
        ("CANCEL", "support@example", "customer left")
    ]
    lines = (await saga("events", "leaving")).stdout.splitlines()
    assert any("cancel requested" in line and "by support@example" in line for line in lines)

    again = await saga("cancel", "leaving")
    assert again.returncode == 1
    assert "FAILED_PRECONDITION SAGA_ENDED" in again.stderr


async def test_list_and_count_filter_by_labels_time_version_and_state(
    saga: Saga, participants: dict[str, ScriptedParticipant]
) -> None:
    refuse_cards(participants)
    for saga_id, labels in (
        ("a", ["tenant=t-1", "plan=gold"]),
        ("b", ["tenant=t-1"]),
        ("c", ["tenant=t-2"]),
    ):
        flags = [flag for label in labels for flag in ("--label", label)]
        started = await saga("start", "onboard", "--id", saga_id, "--wait", *flags)
        assert started.returncode == (1 if saga_id == "a" else 0), started.stderr

    def ids(sagas: list[dict[str, Any]]) -> list[str]:
        return [s["saga_id"] for s in sagas]

    assert ids(await saga.json("list", "--label", "tenant=t-1")) == ["a", "b"]
    both = await saga.json("list", "--label", "tenant=t-1", "--label", "plan=gold")
    assert ids(both) == ["a"]
    assert both[0]["labels"] == {"plan": "gold", "tenant": "t-1"}
    assert ids(await saga.json("list", "--since", "1h")) == ["a", "b", "c"]
    assert ids(await saga.json("list", "--until", "1h")) == []
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert ids(await saga.json("list", "--since", future)) == []
    assert ids(await saga.json("list", "--state", "compensated")) == ["a"]
    assert ids(await saga.json("list", "--definition", "onboard", "--version", "1")) == [
        "a",
        "b",
        "c",
    ]
    assert ids(await saga.json("list", "--definition", "ship")) == []
    assert ids(await saga.json("list", "--limit", "2")) == ["a", "b"]

    table = await saga("list", "--label", "plan=gold")
    assert table.returncode == 0
    assert "plan=gold" in table.stdout

    counted = await saga.json("count", "--label", "tenant=t-1")
    assert next(iter(counted["counts"])) == "NEEDS_ATTENTION"
    assert counted["counts"]["SUCCEEDED"] == 1
    assert counted["counts"]["COMPENSATED"] == 1
    assert counted["total"] == 2
    everything = await saga("count")
    assert everything.returncode == 0
    rows = [line.split() for line in everything.stdout.splitlines()[1:]]
    assert rows[0] == ["NEEDS_ATTENTION", "0"]
    assert rows[-1] == ["total", "3"]

    no_definition = await saga("list", "--version", "2")
    assert no_definition.returncode == 2
    assert "--version needs --definition" in no_definition.stderr
    garbage = await saga("list", "--since", "last tuesday")
    assert garbage.returncode == 2
    assert "expected a duration ago" in garbage.stderr
    bad_label = await saga("list", "--label", "no-equals-sign")
    assert bad_label.returncode == 2
    unknown_state = await saga("list", "--state", "sleeping")
    assert unknown_state.returncode == 2


def write_yaml(path: Path, content: Mapping[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(dict(content), sort_keys=False))
    return path


async def test_a_second_version_is_applied_while_first_version_sagas_run(
    saga: Saga, participants: dict[str, ScriptedParticipant], tmp_path: Path
) -> None:
    broken = await park_on_close_account(saga, participants, "old-one")
    participants["cards"].scripts.clear()
    v2 = four_step_definition("onboard")
    v2.update(version=2, description="Onboarding, second edition")
    v2_file = write_yaml(tmp_path / "onboard-v2.yaml", v2)

    created = await saga("definitions", "apply", str(v2_file))
    assert created.returncode == 0, created.stderr
    assert created.stdout.startswith("created onboard v2")
    unchanged = await saga("definitions", "apply", str(v2_file))
    assert unchanged.returncode == 0, unchanged.stderr
    assert unchanged.stdout.startswith("unchanged: onboard v2")
    applied = await saga.json("definitions", "apply", str(v2_file))
    assert (applied["created"], applied["version"]) == (False, 2)

    conflicting = write_yaml(tmp_path / "conflict.yaml", {**v2, "description": "other"})
    conflict = await saga("definitions", "apply", str(conflicting))
    assert conflict.returncode == 1
    assert "ALREADY_EXISTS DEFINITION_VERSION_EXISTS" in conflict.stderr
    invalid = write_yaml(tmp_path / "invalid.yaml", {**v2, "version": 3, "steps": []})
    refused = await saga("definitions", "apply", str(invalid))
    assert refused.returncode == 2
    assert "steps" in refused.stderr
    unreadable = await saga("definitions", "apply", str(tmp_path / "missing.yaml"))
    assert unreadable.returncode == 2
    assert "cannot read" in unreadable.stderr

    shown = await saga.json("definitions", "show", "onboard")
    assert shown["definition"]["version"] == 2
    assert shown["definition"]["description"] == "Onboarding, second edition"
    assert [(v["version"], v["unfinished_sagas"]) for v in shown["versions"]] == [(1, 1), (2, 0)]
    first = await saga.json("definitions", "show", "onboard@1")
    assert first["definition"]["version"] == 1
    assert [s["compensation"] for s in first["definition"]["steps"]][:2] == [
        "DeactivateUser",
        "CloseAccount",
    ]
    table = await saga("definitions", "show", "onboard")
    assert table.returncode == 0
    assert "Onboarding, second edition" in table.stdout
    assert "CancelCard" in table.stdout
    rows = [line.split() for line in table.stdout.splitlines() if line.startswith("onboard ")]
    assert rows[0][:4] == ["onboard", "v1", "4", "1"]  # version, steps, unfinished sagas
    assert rows[1][:5] == ["onboard", "v2", "*", "4", "0"]  # * marks the version shown

    listed = await saga.json("definitions", "list")
    assert [(d["name"], [v["version"] for v in d["versions"]]) for d in listed] == [
        ("onboard", [1, 2]),
        ("ship", [1]),
    ]
    only = await saga.json("definitions", "list", "ship")
    assert [d["name"] for d in only] == ["ship"]
    listing = await saga("definitions", "list")
    assert listing.returncode == 0
    assert "Onboarding, second edition" in listing.stdout

    # New sagas take the newest version; the parked one keeps its own.
    new = await saga("start", "onboard", "--id", "new-one", "--wait", "--json")
    assert new.returncode == 0, new.stderr
    assert json.loads(new.stdout)["definition_version"] == 2
    assert (await saga.json("get", "old-one"))["definition_version"] == 1
    assert [
        s["saga_id"] for s in await saga.json("list", "--definition", "onboard", "--version", "1")
    ] == ["old-one"]
    broken[0] = False
    assert (await saga("resume", "old-one", "--reason", "ledger is back")).returncode == 0
    assert (await saga.settled("old-one"))["state"] == "COMPENSATED"
    after = await saga.json("definitions", "show", "onboard")
    assert [v["unfinished_sagas"] for v in after["versions"]] == [0, 0]

    missing = await saga("definitions", "show", "ghost")
    assert missing.returncode == 3
    assert "NOT_FOUND DEFINITION_NOT_FOUND" in missing.stderr
    no_version = await saga("definitions", "show", "onboard@7")
    assert no_version.returncode == 3
    bad_name = await saga("definitions", "show", "onboard@latest")
    assert bad_name.returncode == 2


async def test_graph_draws_the_steps_the_pivot_and_the_compensations_backwards(
    saga: Saga,
) -> None:
    result = await saga("definitions", "graph", "ship")
    assert result.returncode == 0, result.stderr
    chart = result.stdout.splitlines()
    assert chart[0] == "flowchart LR"
    assert '    s1["reserve<br/>identity: Reserve"]' in chart
    assert '    s2{{"charge<br/>billing: Charge<br/>pivot<br/>max 2 attempts"}}' in chart
    assert any(line.startswith('    s3(["notify<br/>cards: Notify<br/>retriable') for line in chart)
    assert [line for line in chart if "-->" in line and "-.->" not in line] == [
        "    start --> s1",
        "    s1 --> s2",
        "    s2 --> s3",
        "    s3 --> succeeded",
    ]
    assert '    s1 -.->|"Release"| compensated' in chart
    assert '    s2 -.->|"rejected"| s1' in chart
    assert "    class s2 pivot" in chart
    assert "    class s3 retriable" in chart

    onboard = (await saga("definitions", "graph", "onboard@1")).stdout.splitlines()
    backwards = [line for line in onboard if "-.->" in line]
    assert backwards == [
        '    s1 -.->|"DeactivateUser"| compensated',
        '    s2 -.->|"CloseAccount"| s1',
        '    s3 -.->|"CancelCard"| s2',
        '    s4 -.->|"CancelSubscription"| s3',
    ]
    as_json = await saga.json("definitions", "graph", "onboard")
    assert as_json["mermaid"].startswith("flowchart LR")
    assert (await saga("definitions", "graph", "ghost")).returncode == 3


def test_lint_checks_files_offline_as_the_coordinator_does(tmp_path: Path) -> None:
    good = four_step_definition("onboard")
    good["steps"][0]["timeout"] = "2s"
    good_file = write_yaml(tmp_path / "good.yaml", good)
    bare = write_yaml(
        tmp_path / "bare.yaml",
        {
            "name": "bare",
            "version": 1,
            "steps": [
                {"name": "a", "participant": "identity", "action": "A", "compensation": "U"},
                {"name": "b", "participant": "billing", "action": "B", "kind": "pivot"},
            ],
        },
    )
    broken = write_yaml(
        tmp_path / "broken.yaml",
        {
            "name": "broken",
            "version": 1,
            "steps": [{"name": "a", "participant": "identity", "action": "A"}],
        },
    )
    config = tmp_path / "saga.yaml"
    config.write_text(yaml.safe_dump({"participants": {"identity": "127.0.0.1:1"}}))

    linted = run("definitions", "lint", str(good_file), str(bare))
    assert linted.returncode == 0, linted.stderr
    out = linted.stdout
    assert f"{good_file}: valid (onboard v1)" in out
    assert "steps[1] open-account: no timeout" in out
    assert "steps[0] create-user: no timeout" not in out
    assert "bare.yaml: valid (bare v1)" in out
    assert "steps[0] a: no retry policy" in out
    assert "steps[0] a: no compensation retry policy" in out
    assert "steps[1] b: pivot step without max_attempts" in out
    assert "participants not checked (give --config FILE)" in out

    invalid = run("definitions", "lint", str(broken))
    assert invalid.returncode == 2
    assert "broken.yaml: invalid" in invalid.stdout
    assert "steps[0].compensation: a compensatable step needs a compensation action" in (
        invalid.stdout
    )

    checked = run("definitions", "lint", str(good_file), "--config", str(config), "--json")
    assert checked.returncode == 2
    (report,) = json.loads(checked.stdout)
    assert report["valid"] is False
    assert {e["field"] for e in report["errors"]} == {
        "steps[1].participant",
        "steps[2].participant",
        "steps[3].participant",
    }
    assert "unknown participant 'accounts'" in json.dumps(report)

    reports = json.loads(run("definitions", "lint", str(bare), "-o", "json").stdout)
    assert reports[0]["participants_checked"] is False
    assert {w["field"] for w in reports[0]["warnings"]} == {"steps[0] a", "steps[1] b"}

    not_yaml = tmp_path / "x.yaml"
    not_yaml.write_text("name: [unclosed\n")
    assert run("definitions", "lint", str(not_yaml)).returncode == 2
    graph = run("definitions", "graph", str(bare), "--target", "127.0.0.1:1")
    assert graph.returncode == 0, graph.stderr  # a file is drawn offline
    assert '    s2{{"b<br/>billing: B<br/>pivot"}}' in graph.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_prune_counts_then_removes_ended_sagas_and_never_parked_ones(
    saga: Saga, participants: dict[str, ScriptedParticipant], tmp_path: Path
) -> None:
    for saga_id in ("done-1", "done-2"):
        assert (await saga("start", "onboard", "--id", saga_id, "--wait")).returncode == 0
    await park_on_close_account(saga, participants, "parked")

    too_soon = await saga.json("prune", "--older-than", "1m", "--dry-run")
    assert (too_soon["sagas"], too_soon["dry_run"]) == (0, True)
    too_short = await saga("prune", "--older-than", "30s")
    assert too_short.returncode == 2
    assert "older_than" in too_short.stderr
    not_a_duration = await saga("prune", "--older-than", "a month")
    assert not_a_duration.returncode == 2
    assert "expected a duration like 90s, 15m, 12h or 30d" in not_a_duration.stderr

    # The coordinator's minimum age is one minute: make the two sagas' endings that old (in
    # the store's file, as a minute would; microseconds since the epoch).
    aged = sqlite3.connect(tmp_path / "saga.db", timeout=10)
    with contextlib.closing(aged), aged:
        moved = aged.execute(
            "UPDATE sagas SET ended_at = ended_at - 120000000 WHERE saga_id IN (?, ?)",
            ("done-1", "done-2"),
        ).rowcount
    assert moved == 2

    dry = await saga("prune", "--older-than", "1m", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("would prune 2 sagas (")
    assert (await saga("get", "done-1")).returncode == 0  # a dry run removes nothing
    pruned = await saga.json("prune", "--older-than", "1m")
    assert (pruned["sagas"], pruned["dry_run"]) == (2, False)
    assert pruned["events"] >= 2 * 5
    assert pruned["cutoff"] is not None

    gone = await saga("get", "done-1")
    assert gone.returncode == 3
    assert "NOT_FOUND" in gone.stderr
    assert (await saga("events", "done-2")).returncode == 3
    assert (await saga.json("get", "parked"))["state"] == "NEEDS_ATTENTION"
    assert [s["saga_id"] for s in await saga.json("list")] == ["parked"]
    nothing_left = await saga("prune", "--older-than", "1m")
    assert nothing_left.stdout.startswith("pruned 0 sagas")


def test_an_unreachable_coordinator_exits_4() -> None:
    target = f"127.0.0.1:{free_port()}"
    for args in (("get", "x"), ("list",), ("definitions", "list"), ("retry", "x", "--reason", "r")):
        result = run(*args, "--target", target)
        assert result.returncode == 4, (args, result.stderr)
        assert "UNAVAILABLE" in result.stderr
        assert f"is the coordinator running at {target}?" in result.stderr


def test_help_documents_the_exit_codes() -> None:
    result = run("--help")

    assert result.returncode == 0
    for line in (
        "0  done",
        "1  refused by the coordinator",
        "2  bad usage or invalid input",
        "3  not found",
        "4  the coordinator is unreachable",
    ):
        assert line in result.stdout
    assert "SAGA_ACTOR" in run("retry", "--help").stdout
