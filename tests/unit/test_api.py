"""The triage API: permissions, filters, pagination, retry/discard, clear 4xx errors."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.utils import timezone
from rest_framework.test import APIClient

from reliable_events.models import DeadLetter, OutboxMessage
from tests.support.deadletter_factory import dead_letter, many_dead_letters, outbox_row, staff_user

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("triage_consumers")]

BASE = "/api/events/"
LIST = BASE + "dead-letters/"
ALL_PERMS = ("view_deadletter", "retry_deadletter", "discard_deadletter")


def api(user: User | None = None) -> APIClient:
    client = APIClient()
    if user is not None:
        client.force_authenticate(user)
    return client


@pytest.fixture
def oncall() -> APIClient:
    return api(staff_user("oncall", *ALL_PERMS))


def post(client: APIClient, url: str, body: dict[str, Any] | None = None) -> Any:
    return client.post(url, body or {}, format="json")


# -- permissions ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("get", LIST),
        ("get", LIST + "1/"),
        ("get", LIST + "groups/"),
        ("post", LIST + "1/retry/"),
        ("post", LIST + "1/discard/"),
        ("post", LIST + "retry/"),
        ("post", LIST + "discard/"),
        ("get", BASE + "outbox/stats/"),
        ("post", BASE + "outbox/retry-dead/"),
    ],
)
def test_anonymous_is_refused(method: str, url: str) -> None:
    letter = dead_letter()
    response = getattr(api(), method)(url.replace("/1/", f"/{letter.pk}/"), {}, format="json")
    assert response.status_code in (401, 403)
    letter.refresh_from_db()
    assert letter.status == "open"


def test_staff_without_permission_gets_403() -> None:
    client = api(staff_user("staff"))
    letter = dead_letter()
    assert client.get(LIST).status_code == 403
    response = post(client, f"{LIST}{letter.pk}/retry/")
    assert response.status_code == 403
    assert "reliable_events.retry_deadletter" in response.json()["detail"]
    assert client.get(BASE + "outbox/stats/").status_code == 403


def test_each_action_needs_its_own_permission() -> None:
    letter = dead_letter()
    viewer = api(staff_user("viewer", "view_deadletter"))
    assert viewer.get(LIST).status_code == 200
    assert viewer.get(f"{LIST}{letter.pk}/").status_code == 200
    assert post(viewer, f"{LIST}{letter.pk}/retry/").status_code == 403
    assert post(viewer, f"{LIST}retry/", {"all": True}).status_code == 403
    assert post(viewer, f"{LIST}{letter.pk}/discard/", {"note": "x"}).status_code == 403
    retrier = api(staff_user("retrier", "retry_deadletter"))
    assert post(retrier, f"{LIST}{letter.pk}/discard/", {"note": "x"}).status_code == 403
    assert post(retrier, f"{LIST}discard/", {"all": True, "note": "x"}).status_code == 403
    letter.refresh_from_db()
    assert letter.status == "open"
    assert post(retrier, f"{LIST}{letter.pk}/retry/").status_code == 200


def test_session_authenticated_staff_with_permission(client: Any) -> None:
    staff_user("viewer", "view_deadletter")
    assert client.login(username="viewer", password="pw")
    dead_letter()
    response = client.get(LIST)
    assert response.status_code == 200
    assert response.json()["count"] == 1


# -- list, filters, pagination ------------------------------------------------------------
def test_list_is_paginated_and_light(oncall: APIClient, django_assert_max_num_queries: Any) -> None:
    many_dead_letters(120)
    # Permissions (user + group), the count, the page: whatever the number of rows.
    with django_assert_max_num_queries(4):
        response = oncall.get(LIST)
    body = response.json()
    assert response.status_code == 200
    assert body["count"] == 120
    assert len(body["results"]) == 50
    assert body["next"].endswith("page=2")
    assert "traceback" not in body["results"][0]
    assert "payload" not in body["results"][0]
    assert [r["id"] for r in body["results"]] == sorted(
        (r["id"] for r in body["results"]), reverse=True
    )
    page3 = oncall.get(LIST, {"page": 3}).json()
    assert len(page3["results"]) == 20
    assert page3["next"] is None
    assert len(oncall.get(LIST, {"page_size": 500}).json()["results"]) == 120


def test_list_filters(oncall: APIClient, use_tz: bool) -> None:
    a = dead_letter(consumer="billing.charge", error_message="gateway down", key="k-1")
    b = dead_letter(
        consumer="mail.send", topic="users.created", fingerprint="fp-mail", reason="permanent-error"
    )
    c = dead_letter(
        consumer="mail.send", status=DeadLetter.Status.DISCARDED, error_type="smtplib.SMTPError"
    )
    old = dead_letter(last_failed_at=timezone.now() - timedelta(days=3))

    def ids(**params: Any) -> set[int]:
        response = oncall.get(LIST, params)
        assert response.status_code == 200, response.json()
        return {row["id"] for row in response.json()["results"]}

    assert ids() == {a.pk, b.pk, c.pk, old.pk}
    assert ids(status="open") == {a.pk, b.pk, old.pk}
    assert ids(status="discarded") == {c.pk}
    assert ids(status="all", consumer="mail.send") == {b.pk, c.pk}
    assert ids(topic="users.created") == {b.pk}
    assert ids(error_type="smtplib.SMTPError") == {c.pk}
    assert ids(reason="permanent-error") == {b.pk}
    assert ids(fingerprint="fp-mail") == {b.pk}
    assert ids(q="gateway down") == {a.pk}
    assert ids(q=a.message_id) == {a.pk}
    assert ids(q="k-1") == {a.pk}
    yesterday = (timezone.now() - timedelta(days=1)).date().isoformat()
    assert old.pk not in ids(failed_after=yesterday)
    assert ids(failed_before=yesterday) == {old.pk}
    assert (
        next(r["id"] for r in oncall.get(LIST, {"ordering": "last_failed_at"}).json()["results"])
        == old.pk
    )


@pytest.mark.parametrize(
    ("params", "field", "text"),
    [
        ({"status": "broken"}, "status", "is not a status"),
        ({"failed_after": "yesterday"}, "failed_after", "is not a date"),
        ({"failed_before": "2024-13-45"}, "failed_before", "is not a date"),
        ({"ordering": "password"}, "ordering", "is not an ordering"),
        ({"page": "0"}, "page", "not a positive integer"),
        ({"page": "abc"}, "page", "not a positive integer"),
        ({"page_size": "9999"}, "page_size", "at most 500"),
        ({"consumr": "typo"}, "detail", "unknown filter(s): consumr"),
    ],
)
def test_bad_filters_get_400_with_a_message(
    oncall: APIClient, params: dict[str, str], field: str, text: str
) -> None:
    response = oncall.get(LIST, params)
    assert response.status_code == 400
    assert text in response.json()[field][0]


def test_retrieve_shows_everything(oncall: APIClient) -> None:
    letter = dead_letter()
    body = oncall.get(f"{LIST}{letter.pk}/").json()
    assert body["payload"] == letter.payload
    assert body["headers"] == {"source": "shop"}
    assert "GatewayDown" in body["traceback"]
    assert len(body["history"]) == 3


@pytest.mark.parametrize(
    ("lookup", "text"),
    [("abc", "is not a dead-letter id"), ("99999", "No dead letter with id 99999")],
)
def test_bad_ids_get_404_with_a_message(oncall: APIClient, lookup: str, text: str) -> None:
    for response in (
        oncall.get(f"{LIST}{lookup}/"),
        post(oncall, f"{LIST}{lookup}/retry/"),
        post(oncall, f"{LIST}{lookup}/discard/", {"note": "x"}),
    ):
        assert response.status_code == 404
        assert text in response.json()["detail"]


def test_groups(oncall: APIClient) -> None:
    many_dead_letters(3, consumer="a", fingerprint="f1", error_type="x.E1")
    many_dead_letters(1, consumer="b", fingerprint="f2", error_type="x.E2")
    body = oncall.get(LIST + "groups/").json()
    assert [(g["consumer"], g["fingerprint"], g["count"]) for g in body["results"]] == [
        ("a", "f1", 3),
        ("b", "f2", 1),
    ]
    assert oncall.get(LIST + "groups/", {"limit": "0"}).status_code == 400
    assert oncall.get(LIST + "groups/", {"limt": "5"}).status_code == 400


# -- retry / discard one -----------------------------------------------------------------
def test_retry_one_changes_state_and_reports(oncall: APIClient) -> None:
    letter = dead_letter()
    response = post(oncall, f"{LIST}{letter.pk}/retry/", {"note": "fixed"})
    assert response.status_code == 200
    row = OutboxMessage.objects.get()
    assert response.json() == {
        "action": "retry",
        "dry_run": False,
        "count": 1,
        "done": [letter.pk],
        "skipped": {},
        "outbox_ids": [row.pk],
        "warnings": [],
        "detail": "retried 1 dead letter(s)",
    }
    letter.refresh_from_db()
    assert (letter.status, letter.resolved_by, letter.note) == ("retried", "oncall", "fixed")
    assert (row.message_id, row.queue, row.payload) == (
        letter.message_id,
        "billing.charge",
        letter.payload,
    )
    again = post(oncall, f"{LIST}{letter.pk}/retry/")
    assert again.status_code == 409
    assert again.json()["skipped"] == {str(letter.pk): "it is retried, not open"}
    assert OutboxMessage.objects.count() == 1


def test_discard_one_needs_a_note(oncall: APIClient) -> None:
    letter = dead_letter()
    for body in ({}, {"note": "   "}):
        response = post(oncall, f"{LIST}{letter.pk}/discard/", body)
        assert response.status_code == 400
        assert "note" in response.json()
    letter.refresh_from_db()
    assert letter.status == "open"
    response = post(oncall, f"{LIST}{letter.pk}/discard/", {"note": "duplicate order"})
    assert response.status_code == 200
    assert response.json()["count"] == 1
    letter.refresh_from_db()
    assert (letter.status, letter.note) == ("discarded", "duplicate order")
    assert not OutboxMessage.objects.exists()


def test_an_unretryable_letter_is_a_conflict_with_the_reason(oncall: APIClient) -> None:
    letter = dead_letter(payload=None, raw_body="{not json", reason="poison-body")
    response = post(oncall, f"{LIST}{letter.pk}/retry/")
    assert response.status_code == 409
    assert response.json()["skipped"] == {str(letter.pk): "the body was not valid JSON"}


def test_a_letter_of_a_consumer_not_registered_here_is_retried_only_with_force(
    oncall: APIClient,
) -> None:
    """Its queue may not exist: the broker would return the re-delivery, whose row would
    then hold its key back for every consumer until it is dead (the command's rule)."""
    reason = (
        "no consumer named 'gone.consumer' is registered here, so its queue may not exist "
        "(the broker would return the re-delivery)"
    )
    one, two, three = (dead_letter(consumer="gone.consumer", queue="gone.consumer") for _ in "123")
    known = dead_letter()
    editor = api(staff_user("editor", *ALL_PERMS, "edit_deadletter"))
    response = post(oncall, f"{LIST}{one.pk}/retry/")
    assert response.status_code == 409
    assert response.json()["skipped"] == {str(one.pk): reason}
    edit = post(editor, f"{LIST}{one.pk}/edit-retry/", {"payload": {"n": 1}, "note": "fix"})
    assert (edit.status_code, edit.json()["skipped"]) == (409, {str(one.pk): reason})
    for dry_run in (True, False):
        body = post(oncall, LIST + "retry/", {"ids": [two.pk, known.pk], "dry_run": dry_run})
        assert (body.json()["done"], body.json()["skipped"]) == ([known.pk], {str(two.pk): reason})
    assert list(OutboxMessage.objects.values_list("queue", flat=True)) == ["billing.charge"]
    assert DeadLetter.objects.filter(consumer="gone.consumer", status="open").count() == 3

    assert post(oncall, f"{LIST}{one.pk}/retry/", {"force": True}).status_code == 200
    forced = post(oncall, LIST + "retry/", {"ids": [two.pk], "force": True}).json()
    assert (forced["done"], forced["skipped"]) == ([two.pk], {})
    edited = post(
        editor, f"{LIST}{three.pk}/edit-retry/", {"payload": {"n": 3}, "note": "fix", "force": True}
    )
    assert edited.status_code == 200
    assert OutboxMessage.objects.filter(queue="gone.consumer").count() == 3


# -- bulk -------------------------------------------------------------------------------
def test_bulk_retry_by_ids_reports_unknown_and_closed_ones(oncall: APIClient) -> None:
    a, b = dead_letter(), dead_letter()
    closed = dead_letter(status=DeadLetter.Status.DISCARDED)
    response = post(oncall, LIST + "retry/", {"ids": [a.pk, b.pk, closed.pk, 424242, a.pk]})
    assert response.status_code == 200
    body = response.json()
    assert body["count"] == 2
    assert sorted(body["done"]) == sorted([a.pk, b.pk])
    assert body["skipped"] == {
        str(closed.pk): "it is discarded, not open",
        "424242": "no such dead letter",
    }
    assert OutboxMessage.objects.count() == 2


def test_bulk_retry_by_consumer_fingerprint_and_all(oncall: APIClient) -> None:
    many_dead_letters(3, consumer="a", fingerprint="f1")
    many_dead_letters(2, consumer="a", fingerprint="f2")
    many_dead_letters(4, consumer="b", fingerprint="f1")
    dry = post(oncall, LIST + "retry/", {"consumer": "a", "dry_run": True}).json()
    assert (dry["count"], dry["dry_run"], dry["detail"]) == (
        5,
        True,
        "would have retried 5 dead letter(s)",
    )
    assert not OutboxMessage.objects.exists()
    assert (
        post(oncall, LIST + "retry/", {"consumer": "a", "fingerprint": "f1"}).json()["count"] == 3
    )
    assert post(oncall, LIST + "retry/", {"fingerprint": "f1"}).json()["count"] == 4
    assert post(oncall, LIST + "retry/", {"all": True}).json()["count"] == 2
    assert DeadLetter.objects.filter(status="open").count() == 0
    assert OutboxMessage.objects.count() == 9


def test_bulk_discard(oncall: APIClient) -> None:
    many_dead_letters(3, consumer="a")
    keep = dead_letter(consumer="b")
    assert post(oncall, LIST + "discard/", {"consumer": "a"}).status_code == 400
    response = post(oncall, LIST + "discard/", {"consumer": "a", "note": "test data"})
    assert response.json()["count"] == 3
    assert DeadLetter.objects.filter(status="discarded", note="test data").count() == 3
    keep.refresh_from_db()
    assert keep.status == "open"


@pytest.mark.parametrize(
    ("body", "text"),
    [
        ({}, "say which dead letters"),
        ({"ids": []}, "may not be empty"),
        ({"ids": ["x"]}, "valid integer"),
        ({"ids": [0]}, "greater than or equal to 1"),
        ({"ids": [1], "consumer": "a"}, "give only one of"),
        ({"all": True, "fingerprint": "f"}, "give only one of"),
        ({"ids": "1,2"}, "list"),
    ],
)
def test_bad_bulk_bodies_get_400(oncall: APIClient, body: dict[str, Any], text: str) -> None:
    dead_letter()
    response = post(oncall, LIST + "retry/", body)
    assert response.status_code == 400
    assert text in str(response.json())
    assert not OutboxMessage.objects.exists()


def test_bulk_ids_are_limited(oncall: APIClient) -> None:
    response = post(oncall, LIST + "retry/", {"ids": list(range(1, 10_002))})
    assert response.status_code == 400
    assert "10000" in str(response.json())


# -- outbox -----------------------------------------------------------------------------
def test_outbox_stats(use_tz: bool) -> None:
    client = api(staff_user("viewer", "view_outboxmessage"))
    outbox_row(status="pending")
    outbox_row(status="dead", attempts=10)
    outbox_row(status="sent", sent_at=timezone.now())
    dead_letter()
    body = client.get(BASE + "outbox/stats/").json()
    assert (body["pending"], body["dead"], body["sent"]) == (1, 1, 1)
    assert body["open_dead_letters_by_consumer"] == {"billing.charge": 1}
    assert body["last_24h"] == {"published": 1, "failed": 1, "dead_lettered": 1}
    assert len(body["hourly"]) == 24


def test_outbox_retry_dead() -> None:
    dead = outbox_row(status="dead", attempts=10, last_error="nack")
    other = outbox_row(status="dead", attempts=10)
    viewer = api(staff_user("viewer", "view_outboxmessage"))
    assert post(viewer, BASE + "outbox/retry-dead/", {"all": True}).status_code == 403
    operator = api(staff_user("operator", "change_outboxmessage"))
    assert post(operator, BASE + "outbox/retry-dead/", {}).status_code == 400
    response = post(operator, BASE + "outbox/retry-dead/", {"ids": [dead.pk]})
    assert response.json()["count"] == 1
    dead.refresh_from_db()
    other.refresh_from_db()
    assert (dead.status, other.status) == ("pending", "dead")
    assert post(operator, BASE + "outbox/retry-dead/", {"all": True}).json()["count"] == 1
