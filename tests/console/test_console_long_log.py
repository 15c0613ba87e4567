"""Sagas with long logs in the console: a log longer than two reads is drawn from its two ends,
with the stretch between them named, and its end (where the saga got stuck) always shown.

A real `saga serve` on a SQLite file holding the sagas' rows, and a real `saga console`.
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from coordinator.store import open_store
from tests.console.conftest import SCREENSHOTS
from tests.support.long_saga import write_long_saga
from tests.support.processes import CoordinatorProcess, running_console

pytestmark = pytest.mark.timeout(120)

LONG = 2600
"""Events of the long saga: more than the console's two reads of 1,000."""
MIDDLING = 1500
"""Events of a saga read whole in two reads that overlap."""


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The console's base URL, on a coordinator whose store holds the two sagas."""
    tmp = tmp_path_factory.mktemp("long-log")
    database = tmp / "saga.db"

    async def migrate() -> None:
        await (await open_store(f"sqlite:///{database}")).close()

    asyncio.run(migrate())
    began = datetime.now(UTC) - timedelta(hours=2)
    write_long_saga(database, "long-1", LONG, at=began, labels={"tenant": "<b>t</b>"})
    write_long_saga(database, "middling-1", MIDDLING, at=began + timedelta(minutes=1))
    (tmp / "definitions").mkdir()
    coordinator = CoordinatorProcess.configure(
        tmp / "saga.yaml",
        database,
        {"accounts": "127.0.0.1:9", "cards": "127.0.0.1:9"},  # parked sagas call no one
    )
    try:
        asyncio.run(coordinator.start())
        with running_console(coordinator.target, tmp / "console.log") as url:
            yield url
    finally:
        if coordinator.process is not None:
            asyncio.run(coordinator.stop())


def _parts(url: str, saga_id: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/saga/parts?id={saga_id}", timeout=30) as answer:
        assert answer.status == 200
        parts: dict[str, Any] = json.loads(answer.read())
    return parts


def test_a_long_log_is_drawn_from_its_two_ends_and_names_what_lies_between(console: str) -> None:
    parts = _parts(console, "long-1")
    timeline, steps = parts["html"]["timeline"], parts["html"]["steps"]
    assert parts["version"] == LONG

    unread = LONG - 2000
    assert f'data-unread="{unread}"' in timeline
    assert f"The {unread} events between them (#1,001 to #1,600)" in timeline
    assert f"the {unread} between them are in the event log" in steps
    # The start and the end of the log are both there: the first attempt, and the refusal of
    # charge and the failed compensation (its refund) that parked the saga.
    assert 'href="#event-2"' in timeline
    assert f'href="#event-{LONG - 1}"' in timeline
    assert f'href="#event-{LONG}"' in timeline
    assert f'id="event-{LONG}"' in steps
    assert "compensation failed" in steps
    # Each step's counts are the coordinator's, whole.
    assert f"{LONG - 3} forward / 0 compensation attempt(s)" in steps
    assert "1 forward / 1 compensation attempt(s)" in steps


def test_a_log_of_up_to_two_reads_is_drawn_whole(console: str) -> None:
    parts = _parts(console, "middling-1")
    timeline, steps = parts["html"]["timeline"], parts["html"]["steps"]
    assert "data-unread" not in timeline
    assert "between them" not in timeline + steps
    assert f'href="#event-{MIDDLING}"' in timeline
    # Every attempt of the retried step (all but the first and the last two events) but the
    # 240 drawn is in its band: none is missing.
    assert f"{MIDDLING - 3 - 240:,} more attempts" in timeline


def test_the_page_of_a_long_saga_fills_in_its_timeline_in_the_browser(
    console: str, browser: Any
) -> None:
    browser.get(f"{console}/saga?id=long-1")
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-status") == "200"
    gap = WebDriverWait(browser, 20, poll_frequency=0.1).until(
        lambda driver: driver.find_elements(By.CSS_SELECTOR, "svg.timeline-svg rect.gap")
    )[0]
    assert gap.get_attribute("data-unread") == str(LONG - 2000)
    assert browser.find_elements(By.CSS_SELECTOR, f'a[href="#event-{LONG}"] rect.bar.failed')
    note = browser.find_element(By.CSS_SELECTOR, "section.timeline .gap-note").text
    assert "Drawn from the two ends of a long log" in note
    shots = os.environ.get(SCREENSHOTS)
    if shots:
        browser.execute_script("document.querySelector('section.timeline').scrollIntoView()")
        Path(shots).mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(Path(shots) / "9-long-log.png"))
