"""Issue 14 in the admin: group actions act on what was seen, no retry button for letters
that cannot be retried, an audit trail on every triage action, URL lookups restricted."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from reliable_events.models import DeadLetter, OutboxMessage, TriageEntry
from tests.support.consumer_support import make_consumer
from tests.support.deadletter_factory import (
    admin_client,
    dead_letter,
    many_dead_letters,
    outbox_row,
    staff_user,
)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("triage_consumers")]

ONCALL = ("view_deadletter", "retry_deadletter", "discard_deadletter")
GROUPS = "admin:reliable_events_deadletter_groups"
GROUP_ACTION = "admin:reliable_events_deadletter_group_action"


def messages_after(client: Client, response: Any) -> list[str]:
    assert response.status_code == 302, response.content[:300]
    return [str(m) for m in client.get(response["Location"]).context["messages"]]


def group_form(page: Any, consumer: str, fingerprint: str) -> dict[str, Any]:
    """The hidden fields of a group's form, as the page rendered them."""
    html = page.content.decode()
    for row in page.context["groups"]:
        group = row["group"]
        if (group.consumer, group.fingerprint) == (consumer, fingerprint):
            assert f'name="upto" value="{group.last_id}"' in html
            assert f'name="seen" value="{group.count}"' in html
            return {
                "consumer": consumer,
                "fingerprint": fingerprint,
                "upto": group.last_id,
                "seen": group.count,
            }
    raise AssertionError(f"no group {consumer}/{fingerprint} on the page")


# -- group actions act on exactly the letters the user saw ----------------------------------
@pytest.mark.parametrize("op", ["retry", "discard"])
def test_letters_arriving_between_view_and_click_are_not_touched(op: str) -> None:
    client = admin_client(staff_user("oncall", *ONCALL))
    seen = many_dead_letters(14, consumer="mail.send", fingerprint="fp-bounce")
    page = client.get(reverse(GROUPS))
    assert f"{op.capitalize()} 14" in page.content.decode()
    form = group_form(page, "mail.send", "fp-bounce")
    # Three bounces arrive while the user reads the page.
    late = many_dead_letters(3, consumer="mail.send", fingerprint="fp-bounce")
    response = client.post(reverse(GROUP_ACTION), {**form, "op": op, "note": "known outage"})
    texts = messages_after(client, response)
    verb = "Retried" if op == "retry" else "Discarded"
    assert any(f"{verb} 14 dead letter(s)" in t for t in texts), texts
    assert any("3 newer letter(s) arrived meanwhile and were not touched" in t for t in texts)
    assert set(
        DeadLetter.objects.filter(fingerprint="fp-bounce")
        .exclude(status="open")
        .values_list("pk", flat=True)
    ) == {letter.pk for letter in seen}
    assert set(DeadLetter.objects.open().values_list("pk", flat=True)) == {
        letter.pk for letter in late
    }
    assert OutboxMessage.objects.count() == (14 if op == "retry" else 0)


def listed(client: Client, query: str = "") -> dict[str, Any]:
    """The hidden snapshot fields of the changelist form, as the page rendered them."""
    page = client.get(reverse("admin:reliable_events_deadletter_changelist") + query)
    upto, seen = page.context["re_upto"], page.context["cl"].result_count
    html = page.content.decode()
    assert f'name="re_upto" value="{upto}"' in html
    assert f'name="re_seen" value="{seen}"' in html
    return {"re_upto": upto, "re_seen": seen}


@pytest.mark.parametrize("action", ["retry_selected", "discard_selected"])
def test_select_all_acts_only_on_the_letters_listed(action: str) -> None:
    client = admin_client(staff_user("oncall", *ONCALL))
    seen = many_dead_letters(5, consumer="mail.send")
    snapshot = listed(client, "?consumer=mail.send")
    late = many_dead_letters(2, consumer="mail.send")
    body = {
        "action": action,
        "select_across": "1",
        "_selected_action": [seen[0].pk],
        "confirm": "yes",
        "note": "bounces",
        **snapshot,
    }
    response = client.post(
        reverse("admin:reliable_events_deadletter_changelist") + "?consumer=mail.send", body
    )
    texts = messages_after(client, response)
    assert any("2 dead letter(s) matching the filters arrived" in t for t in texts), texts
    assert set(DeadLetter.objects.open().values_list("pk", flat=True)) == {x.pk for x in late}


def test_discard_confirmation_keeps_the_snapshot() -> None:
    client = admin_client(staff_user("oncall", *ONCALL))
    many_dead_letters(3, consumer="mail.send")
    snapshot = listed(client)
    page = client.post(
        reverse("admin:reliable_events_deadletter_changelist"),
        {"action": "discard_selected", "select_across": "1", "_selected_action": ["1"], **snapshot},
    )
    html = page.content.decode()
    assert f'name="re_upto" value="{snapshot["re_upto"]}"' in html
    assert f'name="re_seen" value="{snapshot["re_seen"]}"' in html


def test_select_all_without_a_snapshot_or_with_a_late_commit_does_nothing() -> None:
    client = admin_client(staff_user("oncall", *ONCALL))
    many_dead_letters(3, consumer="mail.send")
    url = reverse("admin:reliable_events_deadletter_changelist")
    body = {"action": "retry_selected", "select_across": "1", "_selected_action": ["1"]}
    texts = messages_after(client, client.post(url, body))
    assert any("snapshot" in t for t in texts), texts
    snapshot = listed(client)
    late = {**snapshot, "re_seen": snapshot["re_seen"] - 1}
    texts = messages_after(client, client.post(url, {**body, **late}))
    assert any("The list changed since you looked" in t for t in texts), texts
    assert DeadLetter.objects.open().count() == 3


def test_a_late_commit_below_the_snapshot_stops_the_action() -> None:
    """More open letters up to ``upto`` than were shown: one committed late; do nothing."""
    client = admin_client(staff_user("oncall", *ONCALL))
    many_dead_letters(5, consumer="mail.send", fingerprint="fp-bounce")
    form = group_form(client.get(reverse(GROUPS)), "mail.send", "fp-bounce")
    response = client.post(
        reverse(GROUP_ACTION), {**form, "seen": form["seen"] - 1, "op": "discard", "note": "x"}
    )
    texts = messages_after(client, response)
    assert any("The group changed since you looked" in t and "Nothing was done" in t for t in texts)
    assert DeadLetter.objects.open().count() == 5


def test_letters_resolved_meanwhile_are_reported() -> None:
    client = admin_client(staff_user("oncall", *ONCALL))
    letters = many_dead_letters(4, consumer="mail.send", fingerprint="fp-bounce")
    form = group_form(client.get(reverse(GROUPS)), "mail.send", "fp-bounce")
    DeadLetter.objects.filter(pk=letters[0].pk).update(status="discarded")
    response = client.post(reverse(GROUP_ACTION), {**form, "op": "retry"})
    texts = messages_after(client, response)
    assert any("Retried 3 dead letter(s)" in t for t in texts), texts
    assert any("you saw 4, 3 were acted on" in t for t in texts), texts


def test_a_group_action_without_a_snapshot_does_nothing() -> None:
    client = admin_client(staff_user("oncall", *ONCALL))
    many_dead_letters(2, consumer="mail.send", fingerprint="fp-bounce")
    response = client.post(
        reverse(GROUP_ACTION), {"consumer": "mail.send", "fingerprint": "fp-bounce", "op": "retry"}
    )
    assert any("snapshot" in t for t in messages_after(client, response))
    assert DeadLetter.objects.open().count() == 2


def test_api_group_selection_acts_only_up_to_the_listed_letters() -> None:
    client = APIClient()
    client.force_authenticate(staff_user("oncall", *ONCALL))
    seen = many_dead_letters(3, consumer="mail.send", fingerprint="fp-bounce")
    (group,) = client.get("/api/events/dead-letters/groups/").json()["results"]
    assert (group["count"], group["last_id"]) == (3, max(letter.pk for letter in seen))
    late = dead_letter(consumer="mail.send", queue="mail.send", fingerprint="fp-bounce")
    response = client.post(
        "/api/events/dead-letters/discard/",
        {
            "consumer": "mail.send",
            "fingerprint": "fp-bounce",
            "upto": group["last_id"],
            "note": "x",
        },
        format="json",
    )
    assert response.json()["done"] == [letter.pk for letter in seen]
    late.refresh_from_db()
    assert late.status == "open"


# -- no "Retry now" on letters that can never be retried ------------------------------------
@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        ({"payload": None, "raw_body": "<xml/>", "reason": "not-json"}, "not valid JSON"),
        ({"payload": None, "raw_body": "", "reason": "not-json"}, "not valid JSON"),
        (
            {"payload": None, "raw_body": '{"a": 1}', "reason": "wrong-content-type"},
            "not valid JSON",
        ),
        ({"message_id": ""}, "the message had no id"),
    ],
)
def test_no_retry_button_on_a_letter_that_cannot_be_retried(
    overrides: dict[str, Any], why: str
) -> None:
    client = admin_client(staff_user("oncall", *ONCALL))
    letter = dead_letter(**overrides)
    page = client.get(reverse("admin:reliable_events_deadletter_change", args=[letter.pk]))
    html = page.content.decode()
    assert 'id="re-retry"' not in html
    assert why in html
    assert 'id="re-discard"' in html  # discarding stays possible
    good = dead_letter()
    page = client.get(reverse("admin:reliable_events_deadletter_change", args=[good.pk]))
    assert 'id="re-retry"' in page.content.decode()


# -- audit trail ---------------------------------------------------------------------------
def test_every_triage_action_leaves_an_audit_entry_shown_on_the_history_page(
    triage_consumers: Any,
) -> None:
    for n in range(5):
        make_consumer(triage_consumers, name=f"c{n}")
    user = staff_user("alice", *ONCALL)
    client = admin_client(user)
    by_detail, by_action, by_group, by_api, by_command = (
        dead_letter(consumer=f"c{n}", queue=f"c{n}", fingerprint=f"fp{n}") for n in range(5)
    )
    client.post(
        reverse("admin:reliable_events_deadletter_triage", args=[by_detail.pk]),
        {"op": "retry", "note": "gateway back"},
    )
    client.post(
        reverse("admin:reliable_events_deadletter_changelist"),
        {
            "action": "discard_selected",
            "_selected_action": [by_action.pk],
            "confirm": "yes",
            "note": "test order",
        },
    )
    form = group_form(client.get(reverse(GROUPS)), "c2", "fp2")
    client.post(reverse(GROUP_ACTION), {**form, "op": "retry", "note": "deploy 41"})
    api = APIClient()
    api.force_authenticate(user)
    api.post(f"/api/events/dead-letters/{by_api.pk}/discard/", {"note": "dup"}, format="json")
    call_command("retry_dead_letters", "--id", str(by_command.pk), "--force", stdout=None)

    entries = {e.dead_letter_id: e for e in TriageEntry.objects.all()}
    assert len(entries) == 5
    expected = {
        by_detail.pk: ("retry", "alice", "admin", "gateway back"),
        by_action.pk: ("discard", "alice", "admin", "test order"),
        by_group.pk: ("retry", "alice", "admin group", "deploy 41"),
        by_api.pk: ("discard", "alice", "api", "dup"),
        by_command.pk: ("retry", "retry_dead_letters", "command", ""),
    }
    for pk, (action, who, source, note) in expected.items():
        entry = entries[pk]
        assert (entry.action, entry.user, entry.source, entry.note) == (action, who, source, note)
        assert entry.at is not None
        assert entry.message_id == DeadLetter.objects.get(pk=pk).message_id
        if action == "retry":
            assert entry.outbox_id is not None
            assert OutboxMessage.objects.filter(pk=entry.outbox_id, queue=entry.consumer).exists()
    history = client.get(reverse("admin:reliable_events_deadletter_history", args=[by_detail.pk]))
    html = history.content.decode()
    assert 'id="re-triage-history"' in html
    for text in ("alice", "gateway back", "retry", "admin"):
        assert text in html


def test_history_page_of_an_untouched_letter_says_so(admin_client: Client) -> None:
    letter = dead_letter()
    page = admin_client.get(reverse("admin:reliable_events_deadletter_history", args=[letter.pk]))
    assert "Nobody has retried or discarded this dead letter yet." in page.content.decode()


def test_a_second_retry_keeps_the_first_in_the_trail(admin_client: Client) -> None:
    """The letter keeps only its last resolution; the trail keeps all of them."""
    first = dead_letter()
    admin_client.post(
        reverse("admin:reliable_events_deadletter_triage", args=[first.pk]),
        {"op": "retry", "note": "one"},
    )
    again = dead_letter(message_id=first.message_id)  # failed again after the retry
    admin_client.post(
        reverse("admin:reliable_events_deadletter_triage", args=[again.pk]),
        {"op": "discard", "note": "two"},
    )
    trail = list(
        TriageEntry.objects.filter(message_id=first.message_id).values_list("action", "note")
    )
    assert trail == [("retry", "one"), ("discard", "two")]


# -- URL lookups restricted to the documented filters ----------------------------------------
@pytest.mark.parametrize(
    ("model", "params"),
    [
        ("deadletter", {"payload__contains": "x"}),
        ("deadletter", {"consumer__regex": ".*"}),
        ("deadletter", {"traceback__icontains": "Error"}),
        ("deadletter", {"raw_body__startswith": "a"}),
        ("deadletter", {"id__gt": "1"}),
        ("outboxmessage", {"payload__contains": "x"}),
        ("outboxmessage", {"last_error__icontains": "x"}),
        ("processedmessage", {"message_id__regex": ".*"}),
        # date-hierarchy values past what a date holds: Django's datetime() overflows
        ("deadletter", {"created_at__year": str(2**63)}),
        ("deadletter", {"created_at__year": "2026", "created_at__month": "99999999999999999999"}),
        ("deadletter", {"created_at__year": "\u0662\u0660\u0662\u0666"}),
        ("deadletter", {"created_at__year": "0"}),
    ],
)
def test_undocumented_url_lookups_are_refused(
    admin_client: Client, model: str, params: dict[str, str]
) -> None:
    dead_letter()
    outbox_row()
    response = admin_client.get(reverse(f"admin:reliable_events_{model}_changelist"), params)
    assert response.status_code == 400


@pytest.mark.parametrize(
    ("model", "params"),
    [
        ("deadletter", {"status": "all", "consumer__exact": "billing.charge"}),
        ("deadletter", {"consumer": "billing.charge", "fingerprint": "fp-gateway"}),
        ("deadletter", {"topic__exact": "orders.created", "reason__exact": "retries-exhausted"}),
        ("deadletter", {"error_type__exact": "x", "last_failed_at__gte": "2020-01-01 00:00+00:00"}),
        ("deadletter", {"created_at__year": "2026", "created_at__month": "1"}),
        ("deadletter", {"q": "gateway", "o": "1", "p": "1"}),
        ("outboxmessage", {"status__exact": "pending", "pending_for": "1h"}),
        ("processedmessage", {"q": "abc"}),
    ],
)
def test_documented_filters_still_work(
    admin_client: Client, model: str, params: dict[str, str]
) -> None:
    dead_letter()
    response = admin_client.get(reverse(f"admin:reliable_events_{model}_changelist"), params)
    assert response.status_code == 200, response.content[:300]


def test_without_use_tz_a_date_filter_takes_naive_datetimes_and_refuses_an_offset(
    admin_client: Client, settings: Any
) -> None:
    settings.USE_TZ = False
    dead_letter()
    url = reverse("admin:reliable_events_deadletter_changelist")
    naive = admin_client.get(url, {"last_failed_at__gte": "2020-01-01 00:00:00"})
    assert naive.status_code == 200, naive.content[:300]
    assert naive.context["cl"].result_count == 1
    # An aware value is what SQLite refuses outright under USE_TZ = False: a 400.
    aware = admin_client.get(url, {"last_failed_at__gte": "2020-01-01 00:00+00:00"})
    assert aware.status_code == 400


# -- odd ids in admin URLs -------------------------------------------------------------------
@pytest.mark.parametrize("odd", ["\u00b2", "\u0661\u0662", str(2**63), "9" * 30, "-1", "abc"])
@pytest.mark.parametrize("view", ["change", "history", "edit", "triage"])
def test_odd_ids_in_admin_urls_are_never_a_500(admin_client: Client, view: str, odd: str) -> None:
    dead_letter()
    url = f"/admin/reliable_events/deadletter/{odd}/{view}/"
    response = (
        admin_client.post(url, {"op": "retry"}) if view == "triage" else admin_client.get(url)
    )
    assert response.status_code in (302, 404), (url, response.status_code)


@pytest.mark.parametrize(
    ("model", "param"),
    [
        ("deadletter", "status"),
        ("deadletter", "consumer"),
        ("deadletter", "consumer__exact"),
        ("deadletter", "fingerprint"),
        ("deadletter", "payload"),
        ("outboxmessage", "status"),
        ("outboxmessage", "status__exact"),
    ],
)
def test_nul_in_a_filter_value_is_a_400(admin_client: Client, model: str, param: str) -> None:
    dead_letter()
    response = admin_client.get(
        reverse(f"admin:reliable_events_{model}_changelist") + f"?{param}=a%00b"
    )
    assert response.status_code == 400


@pytest.mark.parametrize(
    ("form", "error"),
    [
        ({"op": "delete", "consumer": "mail.send", "fingerprint": "fp"}, "Unknown operation."),
        ({"op": "retry", "consumer": "mail.send"}, "Pick a group"),
        ({"op": "retry", "consumer": "", "fingerprint": "fp"}, "Pick a group"),
        ({"op": "retry", "consumer": "mail\x00send", "fingerprint": "fp"}, "Pick a group"),
    ],
)
def test_a_group_action_without_a_valid_group_or_operation_does_nothing(
    form: dict[str, str], error: str
) -> None:
    client = admin_client(staff_user("oncall", *ONCALL))
    many_dead_letters(2, consumer="mail.send", fingerprint="fp")
    response = client.post(reverse(GROUP_ACTION), {**form, "upto": 10**9, "seen": 2})
    assert response["Location"] == reverse(GROUPS)
    assert any(error in text for text in messages_after(client, response))
    assert DeadLetter.objects.open().count() == 2
    assert not OutboxMessage.objects.exists()
    assert not TriageEntry.objects.exists()


def test_the_detail_triage_url_takes_only_a_known_post() -> None:
    client = admin_client(staff_user("oncall", *ONCALL))
    letter = dead_letter()
    url = reverse("admin:reliable_events_deadletter_triage", args=[letter.pk])
    assert client.get(url).status_code == 405
    response = client.post(url, {"op": "explode", "note": "x"})
    assert "Unknown operation." in messages_after(client, response)
    letter.refresh_from_db()
    assert letter.status == DeadLetter.Status.OPEN
    assert not TriageEntry.objects.exists()


def test_discarding_a_letter_already_retried_is_skipped_and_said() -> None:
    client = admin_client(staff_user("oncall", *ONCALL))
    letter = dead_letter(status=DeadLetter.Status.RETRIED)
    response = client.post(
        reverse("admin:reliable_events_deadletter_triage", args=[letter.pk]),
        {"op": "discard", "note": "duplicate"},
    )
    assert any("it is retried, not open" in text for text in messages_after(client, response))
    letter.refresh_from_db()
    assert letter.status == DeadLetter.Status.RETRIED
    assert not TriageEntry.objects.exists()


def test_the_groups_page_needs_the_view_permission() -> None:
    assert admin_client(staff_user("nobody")).get(reverse(GROUPS)).status_code == 403


def test_a_letter_without_fingerprint_or_history_shows_neither() -> None:
    client = admin_client(staff_user("viewer", "view_deadletter"))
    grouped = dead_letter(fingerprint="fp-x")
    loose = dead_letter(fingerprint="", history=[])
    listing = client.get(reverse("admin:reliable_events_deadletter_changelist")).content.decode()
    assert listing.count('class="re-group-link"') == 1
    assert "fingerprint=fp-x&amp;consumer=billing.charge" in listing
    html = client.get(
        reverse("admin:reliable_events_deadletter_change", args=[loose.pk])
    ).content.decode()
    history = html.split("Attempt history")[1].split("</fieldset>")[0]
    assert '<div class="readonly">-</div>' in history
    html = client.get(
        reverse("admin:reliable_events_deadletter_change", args=[grouped.pk])
    ).content.decode()
    assert "<th>attempt</th>" in html.split("Attempt history")[1].split("</fieldset>")[0]
