"""A real coordinator, real participants, `saga console` and one headless Chromium, shared by
the console's browser tests."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from saga.v1 import participant_service_pb2 as pb

from saga_sdk.client import SagaClient
from tests.support.coordinator import NAMES, four_step_definition, write_definitions
from tests.support.participants import Answer, ScriptedParticipant, error, reject
from tests.support.processes import CoordinatorProcess, running_console

_T = TypeVar("_T")

SCREENSHOTS = "SAGA_CONSOLE_SCREENSHOTS"
"""A directory: when set, the tests save screenshots of the pages there."""
TRACE_URL = "http://jaeger.example:16686/search?service=saga-coordinator&tags={saga_id}"


class LoopThread:
    """An asyncio loop in a thread of its own, for the participants' gRPC servers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, _T], timeout: float = 30) -> _T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@dataclass
class Switches:
    """What the test changes in its participants' behaviour while they run."""

    ledger_locked: bool = True
    """Accounts answers UNAVAILABLE to CloseAccount while this holds (a lock held on its ledger)."""
    refusal_message: str = "no card for this client"


@dataclass
class Stack:
    """The coordinator, its participants and the console, all running."""

    url: str
    client: SagaClient
    switches: Switches
    shots: Path | None = None


def _rules(switches: Switches, participants: dict[str, ScriptedParticipant]) -> None:
    def cards(request: pb.ExecuteRequest | pb.CompensateRequest) -> Answer | None:
        if request.action == "IssueCard":
            return reject("CARD_REFUSED", switches.refusal_message)
        return None

    def accounts(request: pb.ExecuteRequest | pb.CompensateRequest) -> Answer | None:
        if request.action == "CloseAccount" and switches.ledger_locked:
            return error(grpc.StatusCode.UNAVAILABLE, "the ledger is locked for the nightly close")
        return None

    participants["cards"].rule = cards
    participants["accounts"].rule = accounts


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`saga serve` on SQLite, four scripted participants, and `saga console` against it."""
    tmp = tmp_path_factory.mktemp("console")
    loop = LoopThread()
    participants: dict[str, ScriptedParticipant] = {}
    coordinator: CoordinatorProcess | None = None
    try:
        for name in NAMES:
            participants[name] = ScriptedParticipant(name)
            loop.run(participants[name].start())
        switches = Switches()
        _rules(switches, participants)
        write_definitions(tmp / "definitions", [four_step_definition("onboard")])
        coordinator = CoordinatorProcess.configure(tmp / "saga.yaml", tmp / "saga.db", participants)
        loop.run(coordinator.start())
        shots = os.environ.get(SCREENSHOTS)
        # Whatever a page did, the console itself never fails on a request.
        with (
            running_console(
                coordinator.target,
                tmp / "console.log",
                *("--trace-url", TRACE_URL, "--actor", "ops-console"),
            ) as url,
            SagaClient(coordinator.target) as client,
        ):
            yield Stack(url, client, switches, Path(shots) if shots else None)
    finally:
        if coordinator is not None and coordinator.process is not None:
            loop.run(coordinator.stop())
        for participant in participants.values():
            loop.run(participant.stop())
        loop.close()


@pytest.fixture(scope="module")
def chrome() -> Iterator[Any]:
    """One headless Chromium (Debian's chromium and chromium-driver) for the module."""
    browser = shutil.which("chromium")
    driver_path = shutil.which("chromedriver")
    if browser is None or driver_path is None:
        pytest.skip(
            "Chromium is not installed: as root, apt-get install chromium chromium-driver "
            "fonts-dejavu-core (make install does it)"
        )
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not look for a browser online
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def browser(chrome: Any) -> Iterator[Any]:
    """The module's browser; the test fails if any page logged an error to the console."""
    chrome.set_window_size(1280, 900)
    chrome.get_log("browser")  # what an earlier test left
    yield chrome
    errors = [entry for entry in chrome.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == [], errors
