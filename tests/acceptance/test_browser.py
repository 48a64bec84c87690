"""A real browser (headless Chromium) triages a dead letter in the admin.

A consumer fails permanently on an event (a real dead letter, written by the consume
loop), its cause is fixed, and an on-call user logs into the admin, finds the dead
letter and retries it with two clicks.  The retry goes out through the outbox and the
broker (``memory://``: the live server runs in this process), the consumer processes it,
and the admin then shows it processed.  A user without ``retry_deadletter`` sees no
retry action and no retry button.

Set ``RE_SCREENSHOT_DIR`` to keep PNG screenshots of every page visited.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import pytest
from django.conf import settings
from django.db import transaction
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from reliable_events import publish_event
from reliable_events.consumer import Event, EventConsumer
from reliable_events.consuming import Worker
from reliable_events.exceptions import PermanentError
from reliable_events.models import DeadLetter, ProcessedMessage
from tests.settings import CSP_MIDDLEWARE
from tests.support.deadletter_factory import staff_user
from tests.testapp.models import Effect

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

CHROME_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
)


def _binary(*names: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(
        f"none of {', '.join(names)} is installed: "
        "apt-get install -y chromium chromium-driver (the CI script does)"
    )


def csp_violations(driver: Any) -> list[str]:
    """Content Security Policy violations Chromium logged to the console since last asked."""
    return [
        str(entry["message"])
        for entry in driver.get_log("browser")
        if "Content Security Policy" in str(entry.get("message", ""))
    ]


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium; the test fails if a page broke the Content Security Policy (on the
    Django 6.1 lane every response carries the suite's strict policy, RE_TEST_CSP=1)."""
    options = webdriver.ChromeOptions()
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    options.add_argument(f"--user-data-dir={tmp_path / 'chrome-profile'}")
    options.binary_location = _binary("chromium", "chromium-browser", "google-chrome")
    service = webdriver.ChromeService(executable_path=_binary("chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(60)
    try:
        yield driver
        assert csp_violations(driver) == []
    finally:
        driver.quit()


class Pages:
    """The few things the tests do in the admin, with optional screenshots."""

    def __init__(self, driver: Any, base_url: str) -> None:
        self.driver = driver
        self.base_url = base_url
        folder = os.environ.get("RE_SCREENSHOT_DIR")
        self.shots = Path(folder) if folder else None
        if self.shots is not None:
            self.shots.mkdir(parents=True, exist_ok=True)

    def shot(self, name: str) -> None:
        if self.shots is not None:
            self.driver.save_screenshot(str(self.shots / f"{name}.png"))

    def open(self, path: str, shot: str | None = None) -> None:
        self.driver.get(self.base_url + path)
        if shot:
            self.shot(shot)

    def login(self, username: str, password: str = "pw") -> None:
        self.open("/admin/login/")
        self.driver.find_element(By.NAME, "username").send_keys(username)
        self.driver.find_element(By.NAME, "password").send_keys(password)
        self.driver.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
        WebDriverWait(self.driver, 20).until(lambda d: "/admin/login/" not in d.current_url)

    def text(self) -> str:
        return str(self.driver.find_element(By.TAG_NAME, "body").text)


def make_flaky_consumer() -> tuple[type[EventConsumer], dict[str, bool]]:
    """A consumer that fails permanently while ``state["broken"]`` is set."""
    state = {"broken": True}

    class FlakyConsumer(EventConsumer):
        name = f"browser.flaky-{uuid.uuid4().hex[:8]}"
        topics = ["browser.tested"]
        max_retries = 0

        def handle(self, event: Event) -> None:
            if state["broken"]:
                raise PermanentError("the pricing service said 503")
            Effect.objects.create(consumer=self.name, message_id=event.id, payload=event.payload)

    return FlakyConsumer, state


def consume(consumer: type[EventConsumer]) -> None:
    Worker([consumer]).run(until_idle=1.5)


def test_on_call_retries_a_dead_letter_in_the_browser(
    live_server: Any, browser: Any, clean_registry: Any
) -> None:
    consumer, state = make_flaky_consumer()
    with transaction.atomic():
        message = publish_event("browser.tested", {"order_id": 7, "total": "19.90"})
    consume(consumer)
    letter = DeadLetter.objects.get(consumer=consumer.name)
    assert (letter.status, letter.message_id, letter.reason) == (
        DeadLetter.Status.OPEN,
        message.message_id,
        "permanent-error",
    )
    assert not Effect.objects.exists()

    state["broken"] = False  # the cause is fixed; now someone has to retry
    staff_user("oncall", "view_deadletter", "retry_deadletter", "view_processedmessage")
    pages = Pages(browser, live_server.url)
    pages.login("oncall")
    pages.open("/admin/reliable_events/deadletter/", shot="deadletter-changelist")
    assert "the pricing service said 503" in pages.text()
    assert "Largest open failure groups" in pages.text()

    browser.find_element(By.CSS_SELECTOR, f'input.action-select[value="{letter.pk}"]').click()
    Select(browser.find_element(By.NAME, "action")).select_by_value("retry_selected")
    browser.find_element(By.CSS_SELECTOR, 'button[name="index"]').click()
    WebDriverWait(browser, 20).until(lambda d: "Retried 1 dead letter(s)" in d.page_source)
    pages.shot("deadletter-retried")

    letter.refresh_from_db()
    assert (letter.status, letter.resolved_by) == (DeadLetter.Status.RETRIED, "oncall")
    consume(consumer)  # the retry was published on commit; the consumer now succeeds
    assert ProcessedMessage.objects.filter(
        consumer=consumer.name, message_id=message.message_id
    ).exists()
    assert list(Effect.objects.values_list("consumer", "message_id")) == [
        (consumer.name, message.message_id)
    ]

    # The admin shows it: the letter is resolved, the message processed.
    pages.open(f"/admin/reliable_events/deadletter/{letter.pk}/change/", shot="deadletter-detail")
    assert "Resolved" in pages.text()
    assert "by oncall" in pages.text()
    pages.open(f"/admin/reliable_events/processedmessage/?q={message.message_id}")
    assert consumer.name in pages.text()
    pages.open("/admin/reliable_events/deadletter/overview/", shot="overview")
    assert "open dead letters" in pages.text()


def test_a_viewer_sees_no_retry(live_server: Any, browser: Any) -> None:
    from tests.support.deadletter_factory import dead_letter

    letter = dead_letter()
    staff_user("viewer", "view_deadletter")
    pages = Pages(browser, live_server.url)
    pages.login("viewer")
    pages.open("/admin/reliable_events/deadletter/", shot="deadletter-changelist-viewer")
    assert "card gateway timed out" in pages.text()
    options = [
        o.get_attribute("value")
        for o in browser.find_elements(By.CSS_SELECTOR, "select[name=action] option")
    ]
    assert "retry_selected" not in options
    assert "discard_selected" not in options
    pages.open(f"/admin/reliable_events/deadletter/{letter.pk}/change/")
    assert browser.find_elements(By.ID, "re-retry") == []
    assert "ask for the retry_deadletter" in pages.text()
    letter.refresh_from_db()
    assert letter.status == DeadLetter.Status.OPEN


@pytest.mark.skipif(
    CSP_MIDDLEWARE not in settings.MIDDLEWARE,
    reason="Django's CSP middleware is on with RE_TEST_CSP=1 (Django 6; the django61 lane)",
)
def test_the_admin_is_served_under_the_strict_policy(live_server: Any, browser: Any) -> None:
    with urlopen(f"{live_server.url}/admin/login/") as response:
        header = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in header
    assert "style-src 'self'" in header
    staff_user("viewer", "view_deadletter")
    pages = Pages(browser, live_server.url)
    pages.login("viewer")
    pages.open("/admin/reliable_events/deadletter/overview/")
    assert csp_violations(browser) == []
    # The policy is enforced: an inline script added to the page does not run, and
    # Chromium reports it (what the fixture checks after every browser test).
    browser.execute_script(
        "const s = document.createElement('script');"
        "s.textContent = 'window.reInlineRan = true;';"
        "document.body.appendChild(s);"
    )
    assert browser.execute_script("return window.reInlineRan === true") is False
    violations = csp_violations(browser)
    assert len(violations) == 1
    assert "script-src 'self'" in violations[0]
