"""Admin triage: bounded queries, permission-gated actions, groups, detail, overview."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from reliable_events.models import DeadLetter, OutboxMessage, ProcessedMessage
from tests.support.deadletter_factory import (
    admin_client,
    dead_letter,
    many_dead_letters,
    outbox_row,
    staff_user,
)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("triage_consumers")]

CHANGELIST = "admin:reliable_events_deadletter_changelist"
ACTION_CHECKBOX = "_selected_action"


def changelist_url() -> str:
    return reverse(CHANGELIST)


def action_names(response: Any) -> list[str]:
    form = response.context["action_form"]
    return [name for name, _ in form.fields["action"].choices if name]


def messages_of(response: Any) -> list[str]:
    return [str(m) for m in response.context["messages"]] if response.context else []


def follow_messages(client: Client, response: Any) -> list[str]:
    assert response.status_code == 302, getattr(response, "content", b"")[:500]
    page = client.get(response["Location"])
    return [str(m) for m in page.context["messages"]]


# -- changelist -----------------------------------------------------------------------
def _changelist_queries(client: Client) -> int:
    with CaptureQueriesContext(connection) as ctx:
        response = client.get(changelist_url())
    assert response.status_code == 200
    return len(ctx.captured_queries)


def test_changelist_query_count_does_not_grow_with_rows(
    admin_client: Client, django_assert_max_num_queries: Any
) -> None:
    many_dead_letters(5)
    small = _changelist_queries(admin_client)
    many_dead_letters(400)
    with django_assert_max_num_queries(small):
        response = admin_client.get(changelist_url())
    assert response.status_code == 200
    # 50 rows per page shown, all 405 open ones counted.
    assert len(response.context["cl"].result_list) == 50
    assert response.context["cl"].result_count == 405
    # The bounded figure itself: session, user, filters, groups, counts, the page.
    assert small <= 20


def test_changelist_defers_heavy_columns(admin_client: Client) -> None:
    dead_letter()
    with CaptureQueriesContext(connection) as ctx:
        admin_client.get(changelist_url())
    page_query = [
        q["sql"]
        for q in ctx.captured_queries
        if "LIMIT" in q["sql"].upper() and '"traceback"' not in q["sql"]
    ]
    assert page_query, "the page query must not select the traceback column"
    assert not any(
        '"reliable_events_deadletter"."traceback"' in q["sql"] for q in ctx.captured_queries
    )


def test_changelist_shows_open_by_default_and_filters(admin_client: Client) -> None:
    open_one = dead_letter(consumer="billing.charge", error_message="gateway down")
    dead_letter(consumer="billing.charge", status=DeadLetter.Status.DISCARDED)
    other = dead_letter(consumer="mail.send", topic="users.created", error_type="smtplib.SMTPError")
    response = admin_client.get(changelist_url())
    assert {o.pk for o in response.context["cl"].result_list} == {open_one.pk, other.pk}
    response = admin_client.get(changelist_url(), {"status": "all"})
    assert response.context["cl"].result_count == 3
    response = admin_client.get(changelist_url(), {"consumer": "mail.send"})
    assert [o.pk for o in response.context["cl"].result_list] == [other.pk]
    response = admin_client.get(changelist_url(), {"topic": "users.created"})
    assert [o.pk for o in response.context["cl"].result_list] == [other.pk]
    response = admin_client.get(changelist_url(), {"error_type": "smtplib.SMTPError"})
    assert [o.pk for o in response.context["cl"].result_list] == [other.pk]
    response = admin_client.get(changelist_url(), {"q": open_one.message_id})
    assert [o.pk for o in response.context["cl"].result_list] == [open_one.pk]
    response = admin_client.get(changelist_url(), {"q": "gateway down"})
    assert [o.pk for o in response.context["cl"].result_list] == [open_one.pk]


def test_changelist_shows_groups_with_counts(admin_client: Client) -> None:
    many_dead_letters(3, consumer="billing.charge", fingerprint="fp-a", error_type="x.Timeout")
    many_dead_letters(2, consumer="billing.charge", fingerprint="fp-b", error_type="x.KeyError")
    dead_letter(consumer="billing.charge", fingerprint="fp-a", status=DeadLetter.Status.RETRIED)
    response = admin_client.get(changelist_url())
    groups = response.context["top_groups"]
    assert [(g.fingerprint, g.count) for g in groups] == [("fp-a", 3), ("fp-b", 2)]
    content = response.content.decode()
    assert "x.Timeout" in content
    assert "Largest open failure groups" in content
    response = admin_client.get(changelist_url(), {"fingerprint": "fp-b"})
    assert response.context["cl"].result_count == 2


# -- actions --------------------------------------------------------------------------
def test_viewer_sees_no_triage_actions_and_cannot_post_them() -> None:
    letter = dead_letter()
    viewer = admin_client(staff_user("viewer", "view_deadletter"))
    response = viewer.get(changelist_url())
    assert response.status_code == 200
    assert "retry_selected" not in response.content.decode()
    response = viewer.post(
        changelist_url(), {"action": "retry_selected", ACTION_CHECKBOX: [letter.pk]}
    )
    letter.refresh_from_db()
    assert letter.status == DeadLetter.Status.OPEN
    assert not OutboxMessage.objects.exists()
    # The detail page shows no retry/discard buttons either.
    detail = viewer.get(reverse("admin:reliable_events_deadletter_change", args=[letter.pk]))
    assert 'value="retry"' not in detail.content.decode()
    # Nor does the triage URL accept it.
    triage = reverse("admin:reliable_events_deadletter_triage", args=[letter.pk])
    assert viewer.post(triage, {"op": "retry"}).status_code == 403
    letter.refresh_from_db()
    assert letter.status == DeadLetter.Status.OPEN


def test_action_permissions_are_separate() -> None:
    retrier = admin_client(staff_user("retrier", "view_deadletter", "retry_deadletter"))
    discarder = admin_client(staff_user("discarder", "view_deadletter", "discard_deadletter"))
    dead_letter()
    assert action_names(retrier.get(changelist_url())) == ["retry_selected"]
    assert action_names(discarder.get(changelist_url())) == ["discard_selected"]


def test_retry_action_calls_the_service_and_reports() -> None:
    user = staff_user("retrier", "view_deadletter", "retry_deadletter")
    client = admin_client(user)
    first, second = dead_letter(), dead_letter(consumer="mail.send", queue="mail.send")
    done = dead_letter(status=DeadLetter.Status.DISCARDED)
    gone = dead_letter(consumer="gone.consumer", queue="gone.consumer")
    response = client.post(
        changelist_url() + "?status=all",
        {"action": "retry_selected", ACTION_CHECKBOX: [first.pk, second.pk, done.pk, gone.pk]},
    )
    texts = follow_messages(client, response)
    assert any(
        "Retried 2 dead letter(s)" in t
        and f"#{done.pk}: it is discarded" in t
        and f"#{gone.pk}: no consumer named 'gone.consumer' is registered here" in t
        for t in texts
    )
    gone.refresh_from_db()
    assert gone.status == DeadLetter.Status.OPEN
    for letter in (first, second):
        letter.refresh_from_db()
        assert letter.status == DeadLetter.Status.RETRIED
        assert letter.resolved_by == "retrier"
    rows = OutboxMessage.objects.order_by("id")
    assert [(r.message_id, r.queue) for r in rows] == [
        (first.message_id, "billing.charge"),
        (second.message_id, "mail.send"),
    ]
    done.refresh_from_db()
    assert done.status == DeadLetter.Status.DISCARDED


def test_discard_action_asks_for_a_note_then_discards() -> None:
    client = admin_client(staff_user("discarder", "view_deadletter", "discard_deadletter"))
    letters = [dead_letter(), dead_letter()]
    ids = [letter.pk for letter in letters]
    first = client.post(changelist_url(), {"action": "discard_selected", ACTION_CHECKBOX: ids})
    assert first.status_code == 200
    assert "Note (required)" in first.content.decode()
    assert DeadLetter.objects.filter(status=DeadLetter.Status.OPEN).count() == 2
    # Confirming without a note discards nothing.
    empty = client.post(
        changelist_url(),
        {"action": "discard_selected", ACTION_CHECKBOX: ids, "confirm": "yes", "note": "  "},
    )
    assert empty.status_code == 200
    assert any("note is required" in t for t in messages_of(empty))
    assert DeadLetter.objects.filter(status=DeadLetter.Status.OPEN).count() == 2
    done = client.post(
        changelist_url(),
        {
            "action": "discard_selected",
            ACTION_CHECKBOX: ids,
            "confirm": "yes",
            "note": "test orders",
        },
    )
    assert any("Discarded 2 dead letter(s)" in t for t in follow_messages(client, done))
    assert list(
        DeadLetter.objects.order_by().values_list("status", "note", "resolved_by").distinct()
    ) == [("discarded", "test orders", "discarder")]


def test_select_across_acts_on_the_filtered_set() -> None:
    client = admin_client(staff_user("retrier", "view_deadletter", "retry_deadletter"))
    many_dead_letters(60, consumer="billing.charge", fingerprint="fp-a")
    other = dead_letter(consumer="mail.send", fingerprint="fp-a")
    page = client.get(changelist_url() + "?consumer=billing.charge")
    snapshot = {"re_upto": page.context["re_upto"], "re_seen": page.context["cl"].result_count}
    response = client.post(
        changelist_url() + "?consumer=billing.charge",
        {"action": "retry_selected", "select_across": "1", ACTION_CHECKBOX: ["1"], **snapshot},
    )
    assert any("Retried 60 dead letter(s)" in t for t in follow_messages(client, response))
    other.refresh_from_db()
    assert other.status == DeadLetter.Status.OPEN


# -- groups ---------------------------------------------------------------------------
def test_group_page_and_group_actions() -> None:
    client = admin_client(
        staff_user("oncall", "view_deadletter", "retry_deadletter", "discard_deadletter")
    )
    many_dead_letters(4, consumer="billing.charge", fingerprint="fp-a", error_type="x.Timeout")
    many_dead_letters(2, consumer="mail.send", fingerprint="fp-a", error_type="x.Timeout")
    many_dead_letters(3, consumer="billing.charge", fingerprint="fp-b", error_type="x.Bug")
    page = client.get(reverse("admin:reliable_events_deadletter_groups"))
    assert page.status_code == 200
    rows = [
        (r["group"].consumer, r["group"].fingerprint, r["group"].count)
        for r in page.context["groups"]
    ]
    assert rows == [
        ("billing.charge", "fp-a", 4),
        ("billing.charge", "fp-b", 3),
        ("mail.send", "fp-a", 2),
    ]
    assert "Retry 4" in page.content.decode()

    act = reverse("admin:reliable_events_deadletter_group_action")
    shown = {
        (r["group"].consumer, r["group"].fingerprint): r["group"] for r in page.context["groups"]
    }

    def snapshot(consumer: str, fingerprint: str) -> dict[str, Any]:
        group = shown[(consumer, fingerprint)]
        return {
            "consumer": consumer,
            "fingerprint": fingerprint,
            "upto": group.last_id,
            "seen": group.count,
        }

    response = client.post(act, {**snapshot("billing.charge", "fp-a"), "op": "retry"})
    assert any("Retried 4 dead letter(s)" in t for t in follow_messages(client, response))
    assert DeadLetter.objects.filter(status="retried").count() == 4
    assert OutboxMessage.objects.count() == 4
    # The same fingerprint under another consumer is another group: untouched.
    assert DeadLetter.objects.filter(consumer="mail.send", status="open").count() == 2

    response = client.post(act, {**snapshot("billing.charge", "fp-b"), "op": "discard"})
    assert any("note is required" in t for t in follow_messages(client, response))
    assert DeadLetter.objects.filter(fingerprint="fp-b", status="open").count() == 3
    response = client.post(
        act,
        {**snapshot("billing.charge", "fp-b"), "op": "discard", "note": "bug #12"},
    )
    assert any("Discarded 3 dead letter(s)" in t for t in follow_messages(client, response))
    assert (
        DeadLetter.objects.filter(fingerprint="fp-b", status="discarded", note="bug #12").count()
        == 3
    )


def test_group_actions_need_the_permissions() -> None:
    viewer = admin_client(staff_user("viewer", "view_deadletter"))
    many_dead_letters(2, consumer="billing.charge", fingerprint="fp-a")
    page = viewer.get(reverse("admin:reliable_events_deadletter_groups"))
    assert "Retry 2" not in page.content.decode()
    act = reverse("admin:reliable_events_deadletter_group_action")
    for op in ("retry", "discard"):
        response = viewer.post(
            act, {"consumer": "billing.charge", "fingerprint": "fp-a", "op": op, "note": "x"}
        )
        assert response.status_code == 403
    assert DeadLetter.objects.filter(status="open").count() == 2
    assert viewer.get(act).status_code == 405


# -- detail page ----------------------------------------------------------------------
def test_detail_page_pretty_prints_and_escapes(admin_client: Client) -> None:
    letter = dead_letter(
        payload={"order_id": 7, "comment": "<script>alert(1)</script>", "lines": [1, 2]},
        headers={"source": "shop"},
    )
    response = admin_client.get(
        reverse("admin:reliable_events_deadletter_change", args=[letter.pk])
    )
    assert response.status_code == 200
    html = response.content.decode()
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    # Indented, key-sorted JSON inside a <pre>.
    assert re.search(r'<pre class="re-pre re-json">\{\n  &quot;comment&quot;', html)
    assert "&quot;lines&quot;: [\n    1,\n    2\n  ]" in html
    assert "billing.gateway.GatewayDown: card gateway timed out after 5s" in html
    assert 'class="re-history"' in html
    assert "<thead><tr><th>attempt</th><th>at</th><th>error</th></tr></thead>" in html
    assert html.count("<td>GatewayDown</td>") == 3
    assert 'value="retry"' in html
    assert 'value="discard"' in html
    # Read-only: no save button, no editable inputs for system fields.
    assert 'name="_save"' not in html
    assert 'name="consumer"' not in html


def test_detail_page_of_a_poison_message_shows_the_raw_body(admin_client: Client) -> None:
    letter = dead_letter(payload=None, raw_body="not json {", reason="poison-body", history=["odd"])
    response = admin_client.get(
        reverse("admin:reliable_events_deadletter_change", args=[letter.pk])
    )
    html = response.content.decode()
    assert "not JSON: see the raw body" in html
    assert "not json {" in html
    assert "<tr><th>#</th><th>entry</th></tr>" in html
    assert "<tr><td>1</td><td>odd</td></tr>" in html


def test_detail_page_triage_buttons() -> None:
    client = admin_client(
        staff_user("oncall", "view_deadletter", "retry_deadletter", "discard_deadletter")
    )
    letter = dead_letter()
    triage = reverse("admin:reliable_events_deadletter_triage", args=[letter.pk])
    response = client.post(triage, {"op": "discard", "note": ""})
    assert any("note is required" in t for t in follow_messages(client, response))
    response = client.post(triage, {"op": "retry", "note": "fixed in 1.2.3"})
    assert any("Retried 1 dead letter(s)" in t for t in follow_messages(client, response))
    letter.refresh_from_db()
    assert (letter.status, letter.note) == ("retried", "fixed in 1.2.3")
    response = client.post(triage, {"op": "retry"})
    assert any("it is retried, not open" in t for t in follow_messages(client, response))
    assert OutboxMessage.objects.count() == 1
    assert (
        client.post(
            reverse("admin:reliable_events_deadletter_triage", args=["abc"]), {"op": "retry"}
        ).status_code
        == 404
    )
    assert (
        client.post(
            reverse("admin:reliable_events_deadletter_triage", args=[99999]), {"op": "retry"}
        ).status_code
        == 404
    )


def test_dead_letters_cannot_be_added_changed_or_deleted(admin_client: Client) -> None:
    letter = dead_letter()
    assert admin_client.get(reverse("admin:reliable_events_deadletter_add")).status_code == 403
    assert (
        admin_client.get(
            reverse("admin:reliable_events_deadletter_delete", args=[letter.pk])
        ).status_code
        == 403
    )
    response = admin_client.post(
        reverse("admin:reliable_events_deadletter_change", args=[letter.pk]),
        {"consumer": "hacked", "status": "discarded"},
    )
    assert response.status_code == 403
    letter.refresh_from_db()
    assert (letter.consumer, letter.status) == ("billing.charge", "open")


# -- overview ---------------------------------------------------------------------------
def test_overview_page_renders_figures(
    admin_client: Client, django_assert_max_num_queries: Any, use_tz: bool
) -> None:
    outbox_row(status="pending")
    outbox_row(status="dead", attempts=10, last_error="nack")
    outbox_row(status="sent", sent_at=timezone.now())
    many_dead_letters(3, consumer="billing.charge")
    dead_letter(consumer="mail.send")
    url = reverse("admin:reliable_events_overview")
    with django_assert_max_num_queries(15):
        response = admin_client.get(url)
    assert response.status_code == 200
    html = response.content.decode()
    data = response.context["data"]
    assert (data.status.pending, data.status.dead, data.status.open_dead_letters) == (1, 1, 4)
    assert response.context["by_consumer"][0][:2] == ("billing.charge", 3)
    assert '<svg class="re-chart"' in html
    assert re.search(r'<rect class="re-published" [^>]*><title>\d\d:00 UTC: 1 published', html)
    assert re.search(r'<rect class="re-dead" [^>]*><title>\d\d:00 UTC: 4 dead-lettered', html)
    assert "reliable_events/admin.css" in html
    external = re.findall(r'(?:src|href)="((?:https?:)?//[^"]*)"', html)
    assert external == []  # no asset from a CDN or any other host
    assert data.totals == {"published": 1, "failed": 1, "dead_lettered": 4}


def test_overview_needs_view_permission() -> None:
    nobody = admin_client(staff_user("nobody"))
    assert nobody.get(reverse("admin:reliable_events_overview")).status_code == 403
    outbox_viewer = admin_client(staff_user("outbox-viewer", "view_outboxmessage"))
    assert outbox_viewer.get(reverse("admin:reliable_events_overview")).status_code == 200
    assert Client().get(reverse("admin:reliable_events_overview")).status_code == 302  # to login


def test_app_index_links_the_overview(admin_client: Client) -> None:
    response = admin_client.get(reverse("admin:app_list", args=["reliable_events"]))
    assert reverse("admin:reliable_events_overview") in response.content.decode()


# -- outbox and processed messages ------------------------------------------------------------
def test_outbox_changelist_bounded_and_shows_backlog(
    admin_client: Client, django_assert_max_num_queries: Any
) -> None:
    for _ in range(120):
        outbox_row(status="pending", attempts=1, last_error="ConnectionRefusedError")
    outbox_row(status="dead", attempts=10)
    with django_assert_max_num_queries(15):
        response = admin_client.get(reverse("admin:reliable_events_outboxmessage_changelist"))
    html = response.content.decode()
    assert response.context["outbox_status"].pending == 120
    assert "120</strong> pending" in html
    response = admin_client.get(
        reverse("admin:reliable_events_outboxmessage_changelist"), {"status__exact": "dead"}
    )
    assert len(response.context["cl"].result_list) == 1


def test_outbox_changelist_shows_ages_in_their_two_largest_units(admin_client: Client) -> None:
    now = timezone.now()
    for age in (
        timedelta(days=2, hours=3, minutes=4),
        timedelta(hours=3, minutes=5, seconds=6),
        timedelta(minutes=7, seconds=8),
    ):
        row = outbox_row(status="pending", attempts=0)
        OutboxMessage.objects.filter(pk=row.pk).update(created_at=now - age)
    html = admin_client.get(reverse("admin:reliable_events_outboxmessage_changelist")).content
    text = html.decode()
    assert re.search(r">2d 3h</span>", text)
    assert re.search(r">3h 5m</span>", text)
    assert re.search(r">7m (8|9|10)s</span>", text)  # the page is built a moment later


def test_outbox_retry_dead_action() -> None:
    dead = outbox_row(status="dead", attempts=10, last_error="nack")
    sent = outbox_row(status="sent")
    viewer = admin_client(staff_user("viewer", "view_outboxmessage"))
    url = reverse("admin:reliable_events_outboxmessage_changelist")
    assert "retry_dead_selected" not in viewer.get(url).content.decode()
    viewer.post(url, {"action": "retry_dead_selected", ACTION_CHECKBOX: [dead.pk]})
    dead.refresh_from_db()
    assert dead.status == "dead"

    operator = admin_client(staff_user("operator", "view_outboxmessage", "change_outboxmessage"))
    response = operator.post(
        url, {"action": "retry_dead_selected", ACTION_CHECKBOX: [dead.pk, sent.pk]}
    )
    texts = follow_messages(operator, response)
    assert any(
        "Made 1 dead outbox message(s) pending again" in t and "Skipped 1" in t for t in texts
    )
    dead.refresh_from_db()
    sent.refresh_from_db()
    assert (dead.status, dead.attempts, dead.last_error) == ("pending", 0, "")
    assert sent.status == "sent"


def test_outbox_detail_is_read_only(admin_client: Client) -> None:
    row = outbox_row(payload={"b": 1, "a": [1]})
    response = admin_client.get(
        reverse("admin:reliable_events_outboxmessage_change", args=[row.pk])
    )
    html = response.content.decode()
    assert "&quot;a&quot;: [\n    1\n  ],\n  &quot;b&quot;: 1" in html
    assert 'name="_save"' not in html
    assert admin_client.get(reverse("admin:reliable_events_outboxmessage_add")).status_code == 403


def test_outbox_rows_held_behind_a_failing_row_of_their_key_say_so(admin_client: Client) -> None:
    from reliable_events.relay.claims import claim_due

    later = timezone.now() + timedelta(minutes=3)
    failing = outbox_row(key="k", attempts=2, last_error="nack", next_attempt_at=later)
    held = outbox_row(key="k")
    other_key = outbox_row(key="other")
    keyless = outbox_row()
    outbox_row(key="k", status="sent")
    # What the relay's claim leaves alone is what the page calls held.
    claimed = {row.id for row in claim_due("default", list(range(1024)), 100)}
    assert claimed == {other_key.pk, keyless.pk}

    response = admin_client.get(reverse("admin:reliable_events_outboxmessage_changelist"))
    rows = {row.pk: row for row in response.context["cl"].result_list}
    assert rows[held.pk].held_behind_id == failing.pk
    assert {rows[pk].held_behind_id for pk in (failing.pk, other_key.pk, keyless.pk)} == {None}
    html = response.content.decode()
    link = reverse("admin:reliable_events_outboxmessage_change", args=[failing.pk])
    assert html.count("held behind <a") == 1
    assert 'due, <span class="re-held"' in html
    assert f'<a href="{link}">#{failing.pk}</a>' in html

    # Asked for the page's rows only: the query that pages (OFFSET) has no subquery, so a
    # deep page of a large backlog costs the page, not the rows skipped.
    for n in range(60):
        outbox_row(key="k", next_attempt_at=later if n % 2 else timezone.now())
    with CaptureQueriesContext(connection) as queries:
        page = admin_client.get(reverse("admin:reliable_events_outboxmessage_changelist"), {"p": 2})
    assert page.status_code == 200
    paging = [q["sql"] for q in queries.captured_queries if "OFFSET" in q["sql"]]
    assert paging
    assert all(sql.count("SELECT") == 1 for sql in paging), paging
    (asked,) = [q["sql"] for q in queries.captured_queries if '"behind"' in q["sql"]]
    assert '"id" IN (' in asked
    shown = page.context["cl"].result_list
    assert len(shown) == 15
    behind = {row.pk: row.held_behind_id for row in shown if row.key == "k"}
    assert behind.pop(failing.pk) is None
    assert set(behind.values()) == {failing.pk, None}  # None: the sent row
    assert [pk for pk, row in behind.items() if row is None] == [
        pk for pk in behind if OutboxMessage.objects.get(pk=pk).status == "sent"
    ]

    detail = admin_client.get(reverse("admin:reliable_events_outboxmessage_change", args=[held.pk]))
    assert f'<a href="{link}">#{failing.pk}</a>' in detail.content.decode()


def test_outbox_search_is_exact_and_compares_the_columns_themselves(admin_client: Client) -> None:
    by_key = outbox_row(key="Order 7", topic="orders.paid", status="sent")
    by_id = outbox_row(message_id="Msg-1", topic="billing.charged", status="sent")
    by_topic = outbox_row(key="order 7", topic="orders.created.eu", status="sent")
    url = reverse("admin:reliable_events_outboxmessage_changelist")

    def found(term: str) -> set[int]:
        response = admin_client.get(url, {"q": term})
        assert response.status_code == 200
        return {row.pk for row in response.context["cl"].result_list}

    assert found("Order 7") == {by_key.pk}  # the whole term: not the words "Order" and "7"
    assert found("order 7") == {by_topic.pk}  # case-sensitive, as keys are
    assert found("Msg-1") == {by_id.pk}
    assert found("orders.") == {by_key.pk, by_topic.pk}  # the start of a topic
    assert found("orders.created") == {by_topic.pk}
    assert found("  Msg-1 ") == {by_id.pk}
    assert found("%") == set()  # LIKE's wildcard is a character here
    with CaptureQueriesContext(connection) as queries:
        found("Msg-1")
    searches = [q["sql"] for q in queries.captured_queries if "Msg-1" in q["sql"]]
    assert searches, "the search's query"
    assert not any("UPPER(" in sql for sql in searches)  # no index answers UPPER(column)


def test_dead_letter_search_keeps_words_for_the_error_message(admin_client: Client) -> None:
    both = dead_letter(error_message="Gateway went down at noon", key="k-1")
    dead_letter(error_message="gateway timeout", key="k-2")
    url = changelist_url()
    response = admin_client.get(url, {"q": "down gateway", "status": "all"})
    assert [o.pk for o in response.context["cl"].result_list] == [both.pk]
    response = admin_client.get(url, {"q": '"went down"', "status": "all"})
    assert [o.pk for o in response.context["cl"].result_list] == [both.pk]
    response = admin_client.get(url, {"q": "k-1", "status": "all"})
    assert [o.pk for o in response.context["cl"].result_list] == [both.pk]


def test_processed_messages_searchable_and_read_only(admin_client: Client) -> None:
    ProcessedMessage.objects.create(
        consumer="billing.charge", message_id="m-1", topic="orders.created"
    )
    ProcessedMessage.objects.create(consumer="mail.send", message_id="m-2", topic="users.created")
    url = reverse("admin:reliable_events_processedmessage_changelist")
    response = admin_client.get(url, {"q": "m-2"})
    assert [p.message_id for p in response.context["cl"].result_list] == ["m-2"]
    response = admin_client.get(url, {"q": "billing.charge"})
    assert [p.message_id for p in response.context["cl"].result_list] == ["m-1"]
    assert (
        admin_client.get(reverse("admin:reliable_events_processedmessage_add")).status_code == 403
    )
    assert "delete_selected" not in admin_client.get(url).content.decode()


def test_parked_events_filter_by_consumer_and_key_and_refuse_a_nul(admin_client: Client) -> None:
    from reliable_events.models import ParkedEvent

    for consumer, key in (("c1", "a"), ("c1", "b"), ("c2", "a")):
        ParkedEvent.objects.create(
            consumer=consumer, key=key, message_id=f"{consumer}-{key}", topic="t", payload={}
        )
    url = reverse("admin:reliable_events_parkedevent_changelist")
    response = admin_client.get(url, {"consumer": "c1", "key": "a"})
    assert [p.message_id for p in response.context["cl"].result_list] == ["c1-a"]
    response = admin_client.get(url, {"key": "a"})
    assert sorted(p.message_id for p in response.context["cl"].result_list) == ["c1-a", "c2-a"]
    for bad in ({"key": "\x00"}, {"consumer": "\x00"}, {"message_id": "c1-a"}):
        assert admin_client.get(url, bad).status_code == 400, bad
