"""Payload search (admin and API, SQLite and PostgreSQL), retry counts, overview range."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.urls import reverse
from django.utils.html import escape
from rest_framework.test import APIClient

from reliable_events import deadletters, payload_search
from reliable_events.models import DeadLetter
from tests.support.deadletter_factory import dead_letter, staff_user

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("triage_consumers")]

LIST = "/api/events/dead-letters/"


@pytest.fixture
def letters() -> dict[str, DeadLetter]:
    return {
        "a": dead_letter(payload={"order_id": 42, "customer": {"id": "c-7", "vip": True}}),
        "b": dead_letter(payload={"order_id": 43, "customer": {"id": "c-7", "vip": False}}),
        "c": dead_letter(payload={"order_id": "42", "note": None}),
        "d": dead_letter(payload=None, raw_body="<xml/>", reason="not-json"),
    }


def api() -> APIClient:
    client = APIClient()
    client.force_authenticate(staff_user("viewer", "view_deadletter"))
    return client


@pytest.mark.parametrize(
    ("search", "expected"),
    [
        ("order_id=42", {"a"}),
        ('order_id="42"', {"c"}),
        ('{"order_id": 42}', {"a"}),
        ("customer.id=c-7", {"a", "b"}),
        ('{"customer": {"id": "c-7", "vip": false}}', {"b"}),
        ("note=null", {"c"}),
        ("order_id=1", set()),
    ],
)
def test_api_payload_search(
    letters: dict[str, DeadLetter], search: str, expected: set[str]
) -> None:
    response = api().get(LIST, {"payload": search})
    assert response.status_code == 200, response.content
    found = {r["id"] for r in response.json()["results"]}
    assert found == {letters[name].pk for name in expected}


@pytest.mark.parametrize(
    ("search", "text"),
    [
        ("", "empty"),
        ("order_id", "key=value"),
        ("{not json", "not a JSON object"),
        ("[1, 2]", "key=value"),
        ('{"a": [1]}', "strings, numbers"),
        ("a__regex=.*", "not a searchable key"),
        ("0=1", "not a searchable key"),
        ("a.b.c.d.e=1", "at most 4 levels"),
        ('{"a":1,"b":1,"c":1,"d":1,"e":1,"f":1,"g":1,"h":1,"i":1}', "at most 8 keys"),
        ("x" * 1001, "over 1000 characters"),
    ],
)
def test_bad_payload_searches_are_a_400(search: str, text: str) -> None:
    response = api().get(LIST, {"payload": search})
    assert response.status_code == 400
    assert text in response.json()["payload"][0]


def test_admin_payload_search(letters: dict[str, DeadLetter], admin_client: Client) -> None:
    url = reverse("admin:reliable_events_deadletter_changelist")
    page = admin_client.get(url, {"payload": "customer.id=c-7"})
    assert page.status_code == 200
    assert {o.pk for o in page.context["cl"].result_list} == {letters["a"].pk, letters["b"].pk}
    assert 'id="re-payload-search"' in page.content.decode()
    page = admin_client.get(url, {"payload": "a__regex=.*"})
    assert page.status_code == 200
    assert list(page.context["cl"].result_list) == []
    assert any("not a searchable key" in str(m) for m in page.context["messages"])


@pytest.mark.skipif(connection.vendor != "postgresql", reason="the GIN index is PostgreSQL's")
def test_postgresql_search_uses_the_gin_index(letters: dict[str, DeadLetter]) -> None:
    query = payload_search.search(DeadLetter.objects.all(), {"order_id": 42})
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
        plan = query.explain()
    assert "re_deadletter_payload_gin" in plan, plan


# -- retry counts ---------------------------------------------------------------------------
def test_retry_count_per_letter_in_admin_and_api(admin_client: Client) -> None:
    first = dead_letter()
    deadletters.retry([first], user="a")
    second = dead_letter(message_id=first.message_id)
    deadletters.retry([second], user="a")
    third = dead_letter(message_id=first.message_id)
    fresh = dead_letter()
    page = admin_client.get(reverse("admin:reliable_events_deadletter_changelist"))
    counts = {o.pk: o.retry_count for o in page.context["cl"].result_list}
    assert counts == {third.pk: 2, fresh.pk: 0}
    detail = admin_client.get(
        reverse("admin:reliable_events_deadletter_change", args=[third.pk])
    ).content.decode()
    assert "retried 2 times before" in detail
    body = api().get(LIST, {"status": "all"}).json()
    assert {r["id"]: r["retries"] for r in body["results"]} == {
        first.pk: 2,
        second.pk: 2,
        third.pk: 2,
        fresh.pk: 0,
    }


# -- overview range and refresh -------------------------------------------------------------
@pytest.mark.parametrize(
    ("params", "bars"), [({}, 24), ({"range": "1h"}, 1), ({"range": "7d"}, 168)]
)
def test_overview_time_range(
    admin_client: Client, params: dict[str, str], bars: int, use_tz: bool
) -> None:
    page = admin_client.get(reverse("admin:reliable_events_overview"), params)
    assert page.status_code == 200
    assert len(page.context["data"].hours) == bars
    assert 'http-equiv="refresh"' not in page.content.decode()


def test_overview_auto_refresh_without_scripts(admin_client: Client) -> None:
    url = reverse("admin:reliable_events_overview")
    page = admin_client.get(url, {"range": "1h", "refresh": "30"})
    html = page.content.decode()
    assert '<meta http-equiv="refresh" content="30">' in html
    assert "?range=1h" in html.replace("&amp;", "&")  # switching refresh keeps the range
    links: Any = page.context["refresh_links"]
    assert [label for label, _, selected in links if selected] == ["30 s"]
    body = html.split("<body", 1)[1]
    assert "<script>" not in body.replace('<script src="', "")  # nothing inline added
    for junk, warning in (
        ({"range": "2y"}, "Unknown range '2y' (one of 1h, 24h, 7d): showing 24h."),
        ({"refresh": "1"}, "Unknown refresh '1' (seconds: one of 0, 10, 30, 60)"),
        ({"refresh": "²"}, "Unknown refresh '²'"),
        ({"range": "<b>x</b>"}, "Unknown range '<b>x</b>'"),  # escaped, as any message
    ):
        page = admin_client.get(url, junk)
        assert page.status_code == 200
        assert 'http-equiv="refresh"' not in page.content.decode()
        assert len(page.context["data"].hours) == 24
        assert escape(warning) in page.content.decode()
    assert "Unknown" not in admin_client.get(url, {"range": "7d"}).content.decode()


def test_api_stats_time_range(use_tz: bool) -> None:
    client = APIClient()
    client.force_authenticate(staff_user("viewer", "view_outboxmessage"))
    dead_letter()
    default = client.get("/api/events/outbox/stats/").json()
    assert (default["range"], len(default["hourly"])) == ("24h", 24)
    assert (
        default["totals"]
        == default["last_24h"]
        == {
            "published": 0,
            "failed": 0,
            "dead_lettered": 1,
        }
    )
    week = client.get("/api/events/outbox/stats/", {"range": "7d"}).json()
    assert len(week["hourly"]) == 168
    assert week["last_24h"]["dead_lettered"] == 1
    assert len(client.get("/api/events/outbox/stats/", {"range": "1h"}).json()["hourly"]) == 1
    for bad in ({"range": "2y"}, {"range": "\x00"}, {"hours": "3"}):
        assert client.get("/api/events/outbox/stats/", bad).status_code == 400
