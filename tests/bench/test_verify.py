"""The bench's check of each case against the calls the participants counted."""

from __future__ import annotations

import pytest

from coordinator.bench.shape import COMPENSATING, SUCCEEDING, call_key, case_of, saga_id
from coordinator.bench.verify import expected_calls, mismatches


def test_a_succeeding_case_executes_every_step_once_per_saga_and_compensates_nothing() -> None:
    expected = expected_calls(SUCCEEDING, 20)
    executes = {k: n for k, n in expected.items() if k.startswith("execute ")}
    compensates = {k: n for k, n in expected.items() if k.startswith("compensate ")}
    assert executes == {
        "execute identity/step-identity": 20,
        "execute accounts/step-accounts": 20,
        "execute cards/step-cards": 20,
        "execute billing/step-billing": 20,
    }
    assert set(compensates.values()) == {0}


def test_a_compensating_case_compensates_the_refused_step_too_and_never_reaches_step_4() -> None:
    expected = expected_calls(COMPENSATING, 7)
    assert expected == {
        "execute identity/step-identity": 7,
        "compensate identity/step-identity": 7,
        "execute accounts/step-accounts": 7,
        "compensate accounts/step-accounts": 7,
        "execute cards/step-cards": 7,
        "compensate cards/step-cards": 7,
        "execute billing/step-billing": 0,
        "compensate billing/step-billing": 0,
    }


def test_the_right_counts_verify() -> None:
    counted = {k: n for k, n in expected_calls(COMPENSATING, 20).items() if n}
    assert mismatches(COMPENSATING, 20, counted, wrong_endings=0) == []


def test_a_missing_call_is_caught() -> None:
    counted = expected_calls(SUCCEEDING, 20)
    counted[call_key("cards", "step-cards", "execute")] = 19
    assert mismatches(SUCCEEDING, 20, counted, wrong_endings=0) == [
        "execute cards/step-cards: 19 calls, expected 20"
    ]


def test_a_retried_call_is_caught() -> None:
    counted = expected_calls(COMPENSATING, 20)
    counted[call_key("identity", "step-identity", "compensate")] = 21
    assert mismatches(COMPENSATING, 20, counted, wrong_endings=0) == [
        "compensate identity/step-identity: 21 calls, expected 20"
    ]


def test_a_call_that_should_not_have_been_made_is_caught() -> None:
    counted = expected_calls(COMPENSATING, 20)
    counted[call_key("billing", "step-billing", "execute")] = 1
    counted[call_key("billing", "step-other", "execute")] = 3
    assert mismatches(COMPENSATING, 20, counted, wrong_endings=0) == [
        "execute billing/step-billing: 1 calls, expected 0",
        "execute billing/step-other: 3 calls, expected none",
    ]


def test_sagas_that_ended_wrong_are_caught_even_with_the_right_calls() -> None:
    assert mismatches(SUCCEEDING, 20, expected_calls(SUCCEEDING, 20), wrong_endings=2) == [
        "2 of 20 sagas did not end as the variant should"
    ]


def test_the_case_key_is_read_back_from_the_saga_name() -> None:
    key = "r1-c32-compensating-coordinator"
    assert case_of(f"sagas/{saga_id(key, 1999)}") == key
    assert case_of(f"sagas/{saga_id('warmup-' + key, 0)}") == "warmup-" + key


def test_a_mismatch_makes_the_command_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from coordinator.bench import run
    from coordinator.cli import main

    def measured(options: run.Options) -> dict[str, object]:
        return {"cases": [], "verified": False, "mismatches": ["r1-c1-x: 1 of 2 sagas ..."]}

    monkeypatch.setattr(run, "run", measured)
    assert main(["bench", "--sagas", "2", "--output", "json"]) == 1
    assert "MISMATCH r1-c1-x: 1 of 2 sagas" in capsys.readouterr().err
