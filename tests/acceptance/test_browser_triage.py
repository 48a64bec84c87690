"""A real browser (headless Chromium) follows a dead letter to its timeline, fixes its
payload, retries the copy and sees the consumer process it and the audit entry.

A consumer rejects an event whose ``order_id`` is not a number (a real dead letter,
written by the consume loop).  The on-call user opens the timeline from the dead-letter
list, goes to the letter, edits the payload and publishes the copy (a new message id:
the consumer would drop the original id as a duplicate); the consumer processes the
copy; the timeline shows the copy processed and who edited what; the History page shows
the audit entry.  A view-only user sees no button on any of these pages.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from django.db import transaction
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from reliable_events import publish_event
from reliable_events.consumer import Event, EventConsumer
from reliable_events.exceptions import PermanentError
from reliable_events.models import DeadLetter, ProcessedMessage, TriageEntry
from tests.acceptance.test_browser import Pages, consume
from tests.acceptance.test_browser import browser as browser  # the fixture
from tests.support.deadletter_factory import dead_letter, many_dead_letters, staff_user
from tests.testapp.models import Effect

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def make_strict_consumer() -> type[EventConsumer]:
    class StrictConsumer(EventConsumer):
        name = f"browser.strict-{uuid.uuid4().hex[:8]}"
        topics = ["browser.ordered"]
        max_retries = 0

        def handle(self, event: Event) -> None:
            if not isinstance(event.payload.get("order_id"), int):
                raise PermanentError(f"order_id {event.payload.get('order_id')!r} is not a number")
            Effect.objects.create(consumer=self.name, message_id=event.id, payload=event.payload)

    return StrictConsumer


def wait_for(driver: Any, text: str) -> None:
    # The page may be replaced between finding its body and reading it: look again.
    WebDriverWait(driver, 20, ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda d: text in d.find_element(By.TAG_NAME, "body").text
    )


def test_edit_and_retry_from_the_timeline_in_the_browser(
    live_server: Any,
    browser: Any,
    clean_registry: Any,
) -> None:
    consumer = make_strict_consumer()
    with transaction.atomic():
        message = publish_event("browser.ordered", {"order_id": "seven", "total": "19.90"})
    consume(consumer)
    letter = DeadLetter.objects.get(consumer=consumer.name)
    assert letter.message_id == message.message_id

    staff_user(
        "oncall",
        "view_deadletter",
        "retry_deadletter",
        "discard_deadletter",
        "edit_deadletter",
        "view_outboxmessage",
        "view_processedmessage",
    )
    pages = Pages(browser, live_server.url)
    pages.login("oncall")

    # From the dead-letter list to the message's timeline.
    pages.open("/admin/reliable_events/deadletter/", shot="triage-changelist")
    row = browser.find_element(By.CSS_SELECTOR, f'input.action-select[value="{letter.pk}"]')
    row.find_element(By.XPATH, "./ancestor::tr").find_element(By.LINK_TEXT, "timeline").click()
    wait_for(browser, "Message timeline")
    pages.shot("triage-timeline-before")
    assert f"dead-lettered by {consumer.name}" in pages.text()
    assert "published on topic browser.ordered: sent" in pages.text()

    # From the timeline to the letter, and its edit page.
    browser.find_element(By.PARTIAL_LINK_TEXT, f"dead-lettered by {consumer.name}").click()
    wait_for(browser, "is not a number")
    assert browser.find_elements(By.ID, "re-retry")  # a JSON letter may be retried as is
    browser.find_element(By.ID, "re-edit").click()
    wait_for(browser, "Saving publishes the corrected payload as a copy")
    payload = browser.find_element(By.ID, "re-payload")
    assert '"seven"' in payload.get_attribute("value")
    payload.clear()
    payload.send_keys('{"order_id": 7, "total": "19.90"}')
    browser.find_element(By.ID, "re-edit-note").send_keys("order_id must be a number")
    pages.shot("triage-edit")
    browser.find_element(By.ID, "re-edit-submit").click()
    wait_for(browser, "Published an edited copy")
    pages.shot("triage-timeline-after-edit")

    entry = TriageEntry.objects.get(dead_letter_id=letter.pk)
    copy_id = entry.copy_message_id
    assert copy_id
    assert copy_id != message.message_id
    assert (entry.user, entry.action) == ("oncall", "edit-retry")

    # The consumer processes the copy (published on commit through the broker).
    consume(consumer)
    assert list(Effect.objects.values_list("message_id", "payload")) == [
        (copy_id, {"order_id": 7, "total": "19.90"})
    ]
    assert ProcessedMessage.objects.filter(consumer=consumer.name, message_id=copy_id).exists()

    browser.refresh()
    wait_for(browser, f"processed by {consumer.name}")
    text = pages.text()
    assert "oncall edited and retried" in text
    assert "order_id must be a number" in text
    assert copy_id in text
    pages.shot("triage-timeline-processed")

    # The audit entry on the letter's History page.
    pages.open(f"/admin/reliable_events/deadletter/{letter.pk}/history/", shot="triage-history")
    history = browser.find_element(By.ID, "re-triage-history").text
    assert "oncall" in history
    assert "edit and retry" in history
    assert "order_id must be a number" in history
    letter.refresh_from_db()
    assert (letter.status, letter.resolved_by) == (DeadLetter.Status.RETRIED, "oncall")


def test_a_view_only_user_sees_no_buttons(
    live_server: Any,
    browser: Any,
) -> None:
    letter = dead_letter()
    many_dead_letters(3, consumer="mail.send", fingerprint="fp-bounce")
    staff_user("viewer", "view_deadletter", "view_outboxmessage", "view_processedmessage")
    pages = Pages(browser, live_server.url)
    pages.login("viewer")
    for path in (
        f"/admin/reliable_events/deadletter/{letter.pk}/change/",
        "/admin/reliable_events/deadletter/groups/",
        f"/admin/reliable_events/deadletter/timeline/?message_id={letter.message_id}",
        f"/admin/reliable_events/deadletter/{letter.pk}/history/",
    ):
        pages.open(path)
        buttons = browser.find_elements(
            By.CSS_SELECTOR, "button[name=op], .re-group-form, #re-edit, #re-retry, #re-discard"
        )
        assert buttons == [], path
        assert "Server Error" not in pages.text()
    pages.open(f"/admin/reliable_events/deadletter/{letter.pk}/edit/")
    assert "403" in browser.title or "Forbidden" in pages.text()
    letter.refresh_from_db()
    assert letter.status == DeadLetter.Status.OPEN
