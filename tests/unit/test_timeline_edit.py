"""A message's timeline (admin and API) and edit-and-retry (service, admin, API)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.db import connection, transaction
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone
from django.utils.html import escape

from reliable_events import deadletters
from reliable_events.models import DeadLetter, OutboxMessage, ProcessedMessage, TriageEntry
from reliable_events.timeline import timeline
from tests.support.consumer_support import make_consumer
from tests.support.deadletter_factory import (
    admin_client,
    api_client,
    dead_letter,
    outbox_row,
    staff_user,
)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("triage_consumers")]

ONCALL = ("view_deadletter", "retry_deadletter", "discard_deadletter")
TIMELINE = "/api/events/dead-letters/timeline/"


@pytest.fixture(autouse=True)
def mail_consumer(clean_registry: Any) -> None:
    """``mail.send`` is registered here: the timeline asks the known consumers."""
    make_consumer(clean_registry, name="mail.send")


def a_message_with_history() -> tuple[str, DeadLetter]:
    """Published, processed by one consumer, dead-lettered by another."""
    original = outbox_row(status="sent", sent_at=timezone.now(), attempts=2, last_error="nack")
    ProcessedMessage.objects.create(consumer="mail.send", message_id=original.message_id)
    letter = dead_letter(message_id=original.message_id)
    return original.message_id, letter


# -- timeline ---------------------------------------------------------------------------------
def test_timeline_follows_retries_and_edited_copies() -> None:
    message_id, letter = a_message_with_history()
    deadletters.retry([letter], user="alice", note="gateway back", source="admin")
    again = dead_letter(message_id=message_id)  # the retry failed too
    result = deadletters.edit_and_retry(
        again, {"order_id": 43}, user="bob", note="fix order id", source="admin"
    )
    copy_id = result.copies[again.pk]
    ProcessedMessage.objects.create(consumer="billing.charge", message_id=copy_id)

    data = timeline(message_id)
    kinds = [event.kind for event in data.events]
    assert kinds.count("outbox") == 1
    assert kinds.count("redelivery") == 2  # the plain retry, and the edited copy
    assert kinds.count("dead-letter") == 2
    assert kinds.count("triage") == 2
    assert kinds.count("processed") == 2  # mail.send the original, billing.charge the copy
    assert data.copies == [copy_id]
    assert data.retry_counts() == {"billing.charge": 2}
    outbox = next(e for e in data.events if e.kind == "outbox")
    assert outbox.details["attempts"] == 2
    assert outbox.details["last_error"] == "nack"
    assert outbox.details["sent_at"] is not None
    # From the copy, the way back to the original.
    assert timeline(copy_id).copy_of == message_id


def test_timeline_is_bounded_in_queries(django_assert_max_num_queries: Any) -> None:
    message_id, letter = a_message_with_history()
    deadletters.retry([letter], user="alice")
    with django_assert_max_num_queries(7):
        timeline(message_id)


def test_admin_timeline_page_is_linked_from_every_list() -> None:
    message_id, letter = a_message_with_history()
    deadletters.retry([letter], user="alice", note="gateway back")
    client = admin_client(
        staff_user("viewer", "view_deadletter", "view_outboxmessage", "view_processedmessage")
    )
    url = reverse("admin:reliable_events_timeline") + f"?message_id={message_id}"
    for model in ("deadletter", "outboxmessage", "processedmessage"):
        page = client.get(
            reverse(f"admin:reliable_events_{model}_changelist"),
            {"status": "all"} if model == "deadletter" else {},
        )
        assert url in page.content.decode().replace("&amp;", "&"), model
    detail = client.get(reverse("admin:reliable_events_deadletter_change", args=[letter.pk]))
    assert 'id="re-timeline"' in detail.content.decode()
    page = client.get(url)
    html = page.content.decode()
    assert page.status_code == 200
    for text in (
        "processed by mail.send",
        "dead-lettered by billing.charge",
        "alice retried",
        "gateway back",
        "re-delivery to queue billing.charge",
    ):
        assert text in html, text


def test_admin_timeline_needs_a_view_permission() -> None:
    client = admin_client(staff_user("nobody"))
    assert client.get(reverse("admin:reliable_events_timeline")).status_code == 403


def test_api_timeline() -> None:
    message_id, _ = a_message_with_history()
    client = api_client(staff_user("viewer", "view_deadletter"))
    body = client.get(TIMELINE, {"message_id": message_id}).json()
    assert body["message_id"] == message_id
    assert {e["kind"] for e in body["events"]} == {"outbox", "processed", "dead-letter"}
    assert client.get(TIMELINE).status_code == 400
    assert client.get(TIMELINE, {"message_id": "x", "extra": "1"}).status_code == 400
    twice = client.get(TIMELINE, {"message_id": ["a", "b"]})  # not silently the last one
    assert twice.status_code == 400
    assert twice.json() == {"message_id": ["give one message id."]}
    assert api_client(staff_user("other")).get(TIMELINE, {"message_id": "x"}).status_code == 403


# -- edit and retry -------------------------------------------------------------------------
def test_edit_and_retry_publishes_a_copy_with_a_new_id_and_records_it() -> None:
    letter = dead_letter(payload={"order_id": "forty-two"}, headers={"source": "shop"})
    result = deadletters.edit_and_retry(
        letter, {"order_id": 42}, user="alice", note="order id must be a number"
    )
    copy_id = result.copies[letter.pk]
    assert copy_id != letter.message_id
    row = OutboxMessage.objects.get(pk=result.outbox_ids[0])
    assert (row.message_id, row.queue, row.payload) == (copy_id, letter.queue, {"order_id": 42})
    assert row.headers == {"source": "shop", "re-copy-of": letter.message_id}
    letter.refresh_from_db()
    assert (letter.status, letter.resolved_by) == ("retried", "alice")
    entry = TriageEntry.objects.get(dead_letter_id=letter.pk)
    assert (entry.action, entry.user, entry.note) == (
        "edit-retry",
        "alice",
        "order id must be a number",
    )
    assert entry.copy_message_id == copy_id
    assert entry.changes == {
        "before": {"order_id": "forty-two"},
        "after": {"order_id": 42},
        "changed": ["order_id"],
    }
    (triage,) = [e for e in timeline(letter.message_id).events if e.kind == "triage"]
    assert "changing order_id" in triage.summary
    # Only once: the letter is no longer open.
    assert deadletters.edit_and_retry(letter, {}, user="alice").skipped


def test_triage_of_a_letter_deleted_meanwhile_or_of_no_letter_changes_nothing() -> None:
    letter = dead_letter(payload={"order_id": 1})
    DeadLetter.objects.filter(pk=letter.pk).delete()  # purged by another operator
    result = deadletters.edit_and_retry(letter, {"order_id": 2}, user="alice")
    assert result.skipped == {letter.pk: "no such dead letter"}
    assert (result.done, result.outbox_ids) == ([], [])
    assert not OutboxMessage.objects.exists()
    assert not TriageEntry.objects.exists()
    nothing = deadletters.discard([], user="alice", note="nothing selected")
    assert (nothing.done, nothing.skipped) == ([], {})
    assert not TriageEntry.objects.exists()


def test_edit_and_retry_fixes_a_body_that_was_not_json() -> None:
    letter = dead_letter(payload=None, raw_body="{order_id: 42", reason="not-json")
    assert deadletters.retry_block_reason(letter) is not None
    result = deadletters.edit_and_retry(letter, {"order_id": 42}, user="alice", note="typo")
    assert result.done == [letter.pk]


def test_admin_edit_and_retry_is_permission_gated_and_audited() -> None:
    letter = dead_letter(payload={"order_id": "x"})
    url = reverse("admin:reliable_events_deadletter_edit", args=[letter.pk])
    change = reverse("admin:reliable_events_deadletter_change", args=[letter.pk])
    retrier = admin_client(staff_user("retrier", *ONCALL))
    assert 'id="re-edit"' not in retrier.get(change).content.decode()
    assert retrier.get(url).status_code == 403
    assert retrier.post(url, {"payload": "{}", "note": "x"}).status_code == 403

    editor = admin_client(staff_user("editor", *ONCALL, "edit_deadletter"))
    assert 'id="re-edit"' in editor.get(change).content.decode()
    form = editor.get(url)
    assert "&quot;order_id&quot;: &quot;x&quot;" in form.content.decode()
    bad = editor.post(url, {"payload": "{not json", "note": "fix"})
    assert bad.status_code == 200
    assert "Not valid JSON" in bad.content.decode()
    assert editor.post(url, {"payload": "{}", "note": ""}).status_code == 200  # note required
    done = editor.post(url, {"payload": '{"order_id": 7}', "note": "fix the id"})
    assert done.status_code == 302
    assert done["Location"].startswith(reverse("admin:reliable_events_timeline"))
    entry = TriageEntry.objects.get(dead_letter_id=letter.pk)
    assert (entry.user, entry.source, entry.changes["after"]) == (
        "editor",
        "admin",
        {"order_id": 7},
    )
    page = editor.get(done["Location"])
    assert "editor edited and retried" in page.content.decode()


def test_api_edit_and_retry() -> None:
    letter = dead_letter(payload={"order_id": "x"})
    url = f"/api/events/dead-letters/{letter.pk}/edit-retry/"
    body = {"payload": {"order_id": 7}, "note": "fix"}
    assert api_client(staff_user("r", *ONCALL)).post(url, body, format="json").status_code == 403
    client = api_client(staff_user("editor", "edit_deadletter"))
    assert client.post(url, {"payload": {}}, format="json").status_code == 400  # no note
    response = client.post(url, body, format="json")
    assert response.status_code == 200, response.content
    copy_id = response.json()["copies"][str(letter.pk)]
    assert OutboxMessage.objects.get(message_id=copy_id).payload == {"order_id": 7}
    assert client.post(url, body, format="json").status_code == 409


def test_timeline_and_history_escape_what_they_show(admin_client: Client) -> None:
    evil = "<script>alert(1)</script>"
    letter = dead_letter(error_message=evil, payload={"x": evil})
    deadletters.edit_and_retry(letter, {"x": evil}, user="alice", note=evil)
    for url in (
        reverse("admin:reliable_events_timeline") + f"?message_id={letter.message_id}",
        reverse("admin:reliable_events_deadletter_history", args=[letter.pk]),
        reverse("admin:reliable_events_deadletter_change", args=[letter.pk]),
    ):
        html = admin_client.get(url).content.decode()
        assert evil not in html, url
        assert "&lt;script&gt;" in html, url


#: Table -> the indexes a timeline query on it must use (found by message id).
TIMELINE_INDEXES = {
    "reliable_events_deadletter": ("re_deadletter_message_id",),
    "reliable_events_triageentry": ("re_triage_message_id", "re_triage_copy_id"),
    "reliable_events_outboxmessage": ("re_outbox_unique_message_id", "re_outbox_redelivery_id"),
    "reliable_events_processedmessage": ("re_processed_unique",),
}


@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's plans")
def test_every_timeline_query_finds_its_rows_through_an_index() -> None:
    """Not a scan of the table nor of a whole index: the outbox and the processed records
    hold every message ever sent and applied."""
    message_id, letter = a_message_with_history()
    deadletters.edit_and_retry(letter, {"order_id": 1}, user="alice", note="fix")
    with CaptureQueriesContext(connection) as ctx:
        timeline(message_id)
    assert len(ctx.captured_queries) == 7
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
        for query in ctx.captured_queries:
            table = query["sql"].split(" FROM ", 1)[1].split()[0].strip('"')
            cursor.execute("EXPLAIN " + query["sql"])
            plan = "\n".join(row[0] for row in cursor.fetchall())
            assert any(name in plan for name in TIMELINE_INDEXES[table]), (query["sql"], plan)
            conditions = [line for line in plan.splitlines() if "Cond:" in line]
            # The lookup keys are the index's leading column(s), not a filter on its rows.
            leading = "consumer" if table.endswith("processedmessage") else "message_id"
            assert any(leading in line for line in conditions), plan


def _messages(client: Client, response: Any) -> list[str]:
    assert response.status_code == 302, response.content[:300]
    return [str(m) for m in client.get(response["Location"]).context["messages"]]


def test_admin_edit_refuses_what_it_cannot_edit(re_settings: Any) -> None:
    editor = admin_client(staff_user("editor", *ONCALL, "edit_deadletter"))
    missing = reverse("admin:reliable_events_deadletter_edit", args=[10**9])
    assert editor.get(missing).status_code == 404

    gone = dead_letter(status=DeadLetter.Status.DISCARDED)
    response = editor.get(reverse("admin:reliable_events_deadletter_edit", args=[gone.pk]))
    assert response["Location"] == reverse(
        "admin:reliable_events_deadletter_change", args=[gone.pk]
    )
    assert f"Dead letter #{gone.pk} is discarded: nothing to edit." in _messages(editor, response)

    nowhere = dead_letter(queue="", consumer="")
    url = reverse("admin:reliable_events_deadletter_edit", args=[nowhere.pk])
    response = editor.post(url, {"payload": '{"order_id": 7}', "note": "fix"})
    assert "Not retried: the consumer queue is unknown." in _messages(editor, response)
    nowhere.refresh_from_db()
    assert nowhere.status == DeadLetter.Status.OPEN
    assert not OutboxMessage.objects.exists()

    re_settings(MAX_PAYLOAD_BYTES=40)
    letter = dead_letter()
    url = reverse("admin:reliable_events_deadletter_edit", args=[letter.pk])
    big = editor.post(url, {"payload": '{"text": "' + "x" * 40 + '"}', "note": "fix"})
    assert big.status_code == 200
    assert "The payload is over MAX_PAYLOAD_BYTES (40 bytes)." in big.content.decode()
    assert not OutboxMessage.objects.exists()


def test_admin_edit_starts_from_the_raw_body_of_a_letter_that_was_not_json() -> None:
    letter = dead_letter(payload=None, raw_body='{"order_id": 42,', reason="not-json")
    editor = admin_client(staff_user("editor", *ONCALL, "edit_deadletter"))
    form = editor.get(reverse("admin:reliable_events_deadletter_edit", args=[letter.pk]))
    assert form.context["form"].initial["payload"] == '{"order_id": 42,'


@pytest.mark.parametrize("message_id", ["a%00b", "x" * 256])
def test_admin_timeline_of_an_impossible_message_id_is_a_404(message_id: str) -> None:
    client = admin_client(staff_user("viewer", "view_deadletter"))
    url = reverse("admin:reliable_events_timeline") + f"?message_id={message_id}"
    assert client.get(url).status_code == 404


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        ('{"x": "\\ud800"}', "payload is not valid Unicode (it has a lone surrogate)"),
        ('"\\u0000"', "payload contains a NUL character (\\u0000), which cannot be stored"),
    ],
)
def test_an_edited_payload_publish_event_would_refuse_is_refused_everywhere(
    payload: str, why: str
) -> None:
    """A trial: a lone surrogate was accepted by edit-and-retry (API and admin), and then
    the copy's dead letter, its outbox row and its admin pages answered 500
    (UnicodeEncodeError); a NUL became a letter whose payload read ``null`` and could not
    be retried ("not valid JSON")."""
    letter = dead_letter()
    value = json.loads(payload)
    service = deadletters.edit_and_retry(letter, value, user="alice")
    assert service.skipped == {letter.pk: why}
    oncall = api_client(staff_user("oncall", *ONCALL, "edit_deadletter"))
    api = oncall.post(
        f"/api/events/dead-letters/{letter.pk}/edit-retry/",
        '{"note": "fix", "payload": ' + payload + "}",
        content_type="application/json",
    )
    assert api.status_code == 400
    assert api.json() == {"payload": [f"{why}."]}
    editor = admin_client(staff_user("editor", *ONCALL, "edit_deadletter"))
    url = reverse("admin:reliable_events_deadletter_edit", args=[letter.pk])
    page = editor.post(url, {"payload": payload, "note": "fix"})
    assert page.status_code == 200
    assert escape(f"Not publishable: {why}.") in page.content.decode()
    letter.refresh_from_db()
    assert letter.status == DeadLetter.Status.OPEN
    assert not OutboxMessage.objects.exists()
