"""The web console in a real headless Chromium, against a real coordinator and participants.

An operator finds a parked saga through the filters, reads why it is parked, fixes the
participant, resumes the saga with a reason from the keyboard, watches it reach COMPENSATED
without reloading the page, and finds the audit entry. Untrusted text renders as text, and an
action posted from another site is refused.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from saga_sdk.model import Saga, SagaState
from tests.console.conftest import Stack

pytestmark = pytest.mark.timeout(90)

HOSTILE = '<script>alert("x")</script>"><img src=x onerror=alert(1)>'


def _shot(stack: Stack, browser: Any, name: str) -> None:
    if stack.shots is None:
        return
    stack.shots.mkdir(parents=True, exist_ok=True)
    size = browser.get_window_size()
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(size["width"], min(max(height, size["height"]), 2400))
    browser.save_screenshot(str(stack.shots / f"{name}.png"))
    browser.set_window_size(size["width"], size["height"])


def _open(browser: Any, url: str, status: int = 200) -> None:
    """Load a page and check its status: never a server error."""
    browser.get(url)
    shown = browser.find_element(By.TAG_NAME, "body").get_attribute("data-status")
    assert shown == str(status), browser.find_element(By.TAG_NAME, "main").text
    assert int(shown) < 500
    if status >= 400:
        # Chromium logs a page answered with 4xx as an error: that one is expected, no other.
        expected = f"the server responded with a status of {status}"
        logged = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert [e for e in logged if expected not in e["message"]] == [], logged


def _until(browser: Any, condition: Callable[[Any], Any], timeout: float = 20) -> Any:
    # A live page replaces its sections as the saga moves: an element read may go stale.
    wait = WebDriverWait(
        browser, timeout, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException]
    )
    return wait.until(condition)


def _settled(stack: Stack, saga_id: str) -> Saga:
    return stack.client.wait(saga_id, timeout=30)


@pytest.fixture(scope="module")
def parked(stack: Stack) -> Saga:
    """A saga parked on the compensation of open-account: Accounts' ledger is locked."""
    stack.switches.ledger_locked = True
    stack.client.create(
        "onboard", {"company": "Initech"}, saga_id="initech-1", labels={"customer": "c-1042"}
    )
    stack.client.create(
        "onboard", {"company": "Hooli"}, saga_id="hooli-7", labels={"customer": "c-2001"}
    )
    saga = _settled(stack, "initech-1")
    _settled(stack, "hooli-7")
    assert saga.state is SagaState.NEEDS_ATTENTION, saga
    return saga


def test_an_operator_finds_a_parked_saga_resumes_it_and_sees_it_compensate_live(
    stack: Stack, browser: Any, parked: Saga
) -> None:
    _open(browser, f"{stack.url}/sagas")
    parked_count = _until(
        browser, lambda b: b.find_element(By.CSS_SELECTOR, '[data-count="NEEDS_ATTENTION"]').text
    )
    assert int(parked_count) >= 2
    _shot(stack, browser, "1-sagas")

    # Filter: parked, label customer=c-1042, stuck on the accounts participant.
    browser.find_element(By.CSS_SELECTOR, "details.filters summary").click()
    browser.find_element(By.CSS_SELECTOR, 'input[name="state"][value="NEEDS_ATTENTION"]').click()
    browser.find_element(By.NAME, "label").send_keys("customer=c-1042")
    browser.find_element(By.NAME, "stuck_on").send_keys("accounts")
    browser.find_element(By.CSS_SELECTOR, ".filter-form button[type=submit]").click()
    _until(browser, lambda b: "stuck_on=accounts" in b.current_url)
    _until(browser, lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-status"))
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-status") == "200"
    query = urllib.parse.parse_qs(urllib.parse.urlparse(browser.current_url).query)
    assert query["state"] == ["NEEDS_ATTENTION"]
    assert query["label"] == ["customer=c-1042"]
    rows = browser.find_elements(By.CSS_SELECTOR, "tr[data-saga-id]")
    assert [row.get_attribute("data-saga-id") for row in rows] == ["initech-1"]
    assert "open-account" in rows[0].text  # the step it waits on
    _shot(stack, browser, "2-sagas-filtered")
    shared = browser.current_url  # the query lives in the URL: a link shows the same list
    _open(browser, shared)
    assert len(browser.find_elements(By.CSS_SELECTOR, "tr[data-saga-id]")) == 1

    # Open it and read why it is parked.
    browser.find_element(By.LINK_TEXT, "initech-1").click()
    _until(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "[data-saga-state]"))
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-status") == "200"
    assert browser.find_element(By.CSS_SELECTOR, "[data-saga-state]").text == "NEEDS_ATTENTION"
    why = browser.find_element(By.CSS_SELECTOR, "[data-why]").text
    assert "open-account" in why
    assert "UNAVAILABLE" in why
    assert "the ledger is locked for the nightly close" in why
    labels = browser.find_element(By.CSS_SELECTOR, "[data-labels]").text
    assert "customer=c-1042" in labels
    trace = browser.find_element(By.LINK_TEXT, "open in Jaeger").get_attribute("href")
    assert trace.endswith("tags=initech-1")
    # The timeline marks the refusal and the failed compensation attempts.
    outcomes = [
        bar.get_attribute("data-outcome")
        for bar in browser.find_elements(By.CSS_SELECTOR, "svg.timeline-svg rect.bar")
    ]
    assert "rejected" in outcomes
    assert outcomes.count("failed") == 3
    cancel = browser.find_element(By.CSS_SELECTOR, 'button[data-action="cancel"]')
    assert not cancel.is_enabled()
    assert "parked" in browser.find_element(By.ID, "why-cancel").text
    _shot(stack, browser, "3-saga-parked")

    # The failures-only log shows the refusal and the three failed attempts, nothing else.
    browser.find_element(By.CSS_SELECTOR, "[data-failures-only]").click()
    _until(browser, lambda b: "failures=1" in b.current_url)
    failures = browser.find_elements(By.CSS_SELECTOR, "table.events tbody tr")
    assert len(failures) == 4, [row.text for row in failures]

    # Fix the participant, then resume the saga with a reason, from the keyboard.
    _open(browser, f"{stack.url}/saga?id=initech-1")
    stack.switches.ledger_locked = False
    browser.execute_script("window.stillTheSamePage = true")
    resume = browser.find_element(By.CSS_SELECTOR, 'button[data-action="resume"]')
    assert resume.is_enabled()
    browser.find_element(By.TAG_NAME, "body").click()
    for _ in range(80):
        browser.switch_to.active_element.send_keys(Keys.TAB)
        if browser.switch_to.active_element.get_attribute("data-action") == "resume":
            break
    else:
        pytest.fail("the resume button cannot be reached with the Tab key")
    browser.switch_to.active_element.send_keys(Keys.ENTER)
    dialog = browser.find_element(By.ID, "dialog-resume")
    _until(browser, lambda b: dialog.get_attribute("open") is not None)
    reason = browser.switch_to.active_element
    assert reason.get_attribute("name") == "reason"
    reason.send_keys("ledger unlocked by the night shift")
    _shot(stack, browser, "4-resume-confirmation")
    reason.send_keys(Keys.TAB)
    browser.switch_to.active_element.send_keys(Keys.ENTER)  # Confirm

    _until(
        browser,
        lambda b: b.find_element(By.CSS_SELECTOR, "[data-saga-state]").text == "COMPENSATED",
    )
    assert browser.execute_script("return window.stillTheSamePage === true")
    audit = browser.find_elements(By.CSS_SELECTOR, "[data-audit-entry]")
    assert len(audit) == 1
    assert "resume" in audit[0].text
    assert "ops-console" in audit[0].text
    assert "ledger unlocked by the night shift" in audit[0].text
    for action in ("retry", "resume", "mark-compensated", "complete", "cancel"):
        button = browser.find_element(By.CSS_SELECTOR, f'button[data-action="{action}"]')
        assert not button.is_enabled()
    _shot(stack, browser, "5-saga-compensated")
    assert stack.client.get("initech-1").state is SagaState.COMPENSATED


def test_needs_attention_groups_parked_sagas_by_definition_step_and_reason(
    stack: Stack, browser: Any, parked: Saga
) -> None:
    stack.client.create("onboard", {"company": "Umbrella"}, saga_id="umbrella-3")
    stack.switches.ledger_locked = True
    assert _settled(stack, "umbrella-3").state is SagaState.NEEDS_ATTENTION
    _open(browser, f"{stack.url}/attention")
    groups = browser.find_elements(By.CSS_SELECTOR, "section.group")
    texts = [group.text for group in groups]
    mine = [text for text in texts if "onboard" in text and "open-account" in text]
    assert len(mine) == 1, texts
    assert "umbrella-3" in mine[0]
    assert "UNAVAILABLE" in mine[0]
    _shot(stack, browser, "6-needs-attention")


def test_the_list_follows_the_change_feed_without_a_reload(stack: Stack, browser: Any) -> None:
    _open(browser, f"{stack.url}/sagas?label=batch%3Dlive-42")
    _until(browser, lambda b: b.find_element(By.CSS_SELECTOR, '[data-count="ALL"]').text == "0")
    # A page shown before its counts were ready asks for them with the same filters.
    with urllib.request.urlopen(f"{stack.url}/sagas/counts?label=batch%3Dlive-42") as answer:
        assert 'data-count="ALL">0<' in json.loads(answer.read())["html"]
    browser.execute_script("window.stillTheSamePage = true")
    time.sleep(0.3)  # the page's stream is open
    stack.switches.ledger_locked = False
    stack.client.create("onboard", {}, saga_id="live-1", labels={"batch": "live-42"})
    _settled(stack, "live-1")
    _until(browser, lambda b: b.find_element(By.CSS_SELECTOR, '[data-count="ALL"]').text == "1")
    _until(
        browser,
        lambda b: b.find_element(By.CSS_SELECTOR, '[data-count="COMPENSATED"]').text == "1",
    )
    assert browser.find_element(By.CSS_SELECTOR, "[data-new-sagas]").is_displayed()
    assert browser.execute_script("return window.stillTheSamePage === true")


def test_untrusted_text_renders_as_text(stack: Stack, browser: Any) -> None:
    stack.switches.ledger_locked = False
    stack.switches.refusal_message = HOSTILE
    try:
        stack.client.create(
            "onboard", {"note": HOSTILE}, saga_id="hostile-1", labels={"note": HOSTILE}
        )
        _settled(stack, "hostile-1")
    finally:
        stack.switches.refusal_message = "no card for this client"
    _open(browser, f"{stack.url}/saga?id=hostile-1")
    assert HOSTILE in browser.find_element(By.CSS_SELECTOR, "[data-labels]").text
    assert HOSTILE in browser.find_element(By.CSS_SELECTOR, "[data-failure-message]").text
    assert '"note": "<script>' in browser.find_element(By.CSS_SELECTOR, ".payload").text
    _open(browser, f"{stack.url}/sagas?label=note%3D{urllib.parse.quote(HOSTILE)}")
    assert HOSTILE in browser.find_element(By.CSS_SELECTOR, "tr[data-saga-id]").text
    # A saga id cannot hold markup (the coordinator refuses it), but one typed in a URL is
    # shown back, as text, in the answer.
    _open(browser, f"{stack.url}/saga?id={urllib.parse.quote(HOSTILE)}", status=400)
    assert HOSTILE in browser.find_element(By.TAG_NAME, "main").text
    assert browser.find_elements(By.CSS_SELECTOR, "main img, main script") == []
    _no_alert(browser)
    _open(browser, f"{stack.url}/sagas?stuck_on={urllib.parse.quote(HOSTILE)}", status=400)
    assert browser.find_element(By.NAME, "stuck_on").get_attribute("value") == HOSTILE
    assert "refused these filters" in browser.find_element(By.CSS_SELECTOR, "[data-problem]").text
    for page in ("/saga?id=hostile-1", "/sagas?label=note%3D" + urllib.parse.quote(HOSTILE)):
        _open(browser, stack.url + page)
        assert browser.find_elements(By.CSS_SELECTOR, "main img, main script") == []
        _no_alert(browser)


def _no_alert(browser: Any) -> None:
    """No script of the page's text ran: an injected alert() would be open now."""
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.accept()


class _Attacker(http.server.BaseHTTPRequestHandler):
    """Another site: a page whose form posts an action to the console."""

    target = ""

    def do_GET(self) -> None:
        page = f"""<!doctype html><html><body>
<form id="f" method="post" action="{self.target}/saga/action">
<input name="saga_id" value="umbrella-3"><input name="action" value="resume">
<input name="reason" value="not me"><input name="csrf_token" value="guessed">
</form><button id="go" form="f">go</button></body></html>"""
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(page.encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def attacker(stack: Stack) -> Iterator[str]:
    _Attacker.target = stack.url
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Attacker)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def _post(url: str, fields: dict[str, str], headers: dict[str, str]) -> int:
    request = urllib.request.Request(
        url, data=urllib.parse.urlencode(fields).encode(), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as refused:
        return refused.code


def test_an_action_posted_from_another_origin_is_refused(
    stack: Stack, chrome: Any, parked: Saga, attacker: str
) -> None:
    before = stack.client.get("umbrella-3")
    assert before.state is SagaState.NEEDS_ATTENTION
    chrome.get(attacker)
    chrome.find_element(By.ID, "go").click()
    _until(chrome, lambda b: b.current_url.startswith(stack.url))
    assert chrome.find_element(By.TAG_NAME, "body").get_attribute("data-status") == "403"
    assert "cross-origin request refused" in chrome.find_element(By.TAG_NAME, "main").text
    chrome.get_log("browser")  # the refused document's 403, expected here

    # Even with the session's own cookie and token, another Origin is refused.
    with urllib.request.urlopen(f"{stack.url}/sagas", timeout=10) as answer:
        cookie = answer.headers["Set-Cookie"].split(";")[0]
        html = answer.read().decode()
    token = html.split('name="csrf-token" content="')[1].split('"')[0]
    fields = {
        "saga_id": "umbrella-3",
        "action": "resume",
        "reason": "forged",
        "csrf_token": token,
    }
    evil = {"Cookie": cookie, "Origin": "http://evil.example"}
    assert _post(f"{stack.url}/saga/action", fields, evil) == 403
    cross_site = {"Cookie": cookie, "Sec-Fetch-Site": "cross-site"}
    assert _post(f"{stack.url}/saga/action", fields, cross_site) == 403
    no_token = {"Cookie": cookie, "Origin": stack.url}
    assert _post(f"{stack.url}/saga/action", {**fields, "csrf_token": "x"}, no_token) == 403
    after = stack.client.get("umbrella-3")
    assert after.version == before.version
    assert after.audit == before.audit


def test_definitions_show_versions_graphs_and_unfinished_sagas(
    stack: Stack, browser: Any, parked: Saga
) -> None:
    _open(browser, f"{stack.url}/definitions")
    graph = browser.find_element(By.CSS_SELECTOR, "svg.graph-svg")
    names = [text.text for text in graph.find_elements(By.CSS_SELECTOR, "text.node-name")]
    assert names == ["create-user", "open-account", "issue-card", "subscribe"]
    assert len(graph.find_elements(By.CSS_SELECTOR, "rect.box.compensation")) == 4
    unfinished = browser.find_element(By.CSS_SELECTOR, "[data-unfinished]").text
    assert int(unfinished) == stack.client.count(definition="onboard")[SagaState.NEEDS_ATTENTION]
    _shot(stack, browser, "7-definitions")


def test_pages_fit_a_phone_width(stack: Stack, browser: Any, parked: Saga) -> None:
    browser.set_window_size(390, 844)
    for page in ("/sagas", "/saga?id=initech-1", "/attention", "/definitions"):
        _open(browser, stack.url + page)
        overflow = browser.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 1, (page, overflow)
    _open(browser, f"{stack.url}/saga?id=initech-1")
    _shot(stack, browser, "8-phone-saga")
