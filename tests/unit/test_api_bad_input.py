"""Malformed API input is a 400 (or a 404 for a path id) that says what is wrong, never a 500.

Each case here was a 500 before (issue 14): Unicode digits reached ``int()`` after
``str.isdigit()`` accepted them, ids past 2**63 overflowed SQLite's driver, and a deeply
nested JSON body raised ``RecursionError`` inside DRF's parser.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from rest_framework.test import APIClient

from reliable_events.models import DeadLetter, OutboxMessage
from tests.support.deadletter_factory import EVERY_PERMISSION, api_client, dead_letter, staff_user

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("triage_consumers")]

BASE = "/api/events/"
LIST = BASE + "dead-letters/"
HUGE = 2**63
UNICODE_DIGITS = ("²", "٣", "\uff11", "1²")


@pytest.fixture
def oncall() -> APIClient:
    return api_client(staff_user("oncall", *EVERY_PERMISSION))


@pytest.mark.parametrize("digits", UNICODE_DIGITS)
@pytest.mark.parametrize("name", ["page", "page_size"])
def test_unicode_digits_in_pagination_are_a_400(oncall: APIClient, name: str, digits: str) -> None:
    response = oncall.get(LIST, {name: digits})
    assert response.status_code == 400, response.content[:300]
    assert "is not a positive integer" in response.json()[name][0]


@pytest.mark.parametrize("digits", [*UNICODE_DIGITS, str(HUGE)])
def test_bad_groups_limit_is_a_400(oncall: APIClient, digits: str) -> None:
    response = oncall.get(LIST + "groups/", {"limit": digits})
    assert response.status_code == 400
    assert "must be an integer from 1 to" in response.json()["limit"][0]


@pytest.mark.parametrize("lookup", [*UNICODE_DIGITS, str(HUGE), "9" * 40])
def test_bad_path_ids_are_a_404_that_says_why(oncall: APIClient, lookup: str) -> None:
    dead_letter()
    for response in (
        oncall.get(f"{LIST}{lookup}/"),
        oncall.post(f"{LIST}{lookup}/retry/", {}, format="json"),
        oncall.post(f"{LIST}{lookup}/discard/", {"note": "x"}, format="json"),
    ):
        assert response.status_code == 404, response.content[:300]
        assert "is not a dead-letter id" in response.json()["detail"]


@pytest.mark.parametrize("url", [LIST + "retry/", LIST + "discard/", BASE + "outbox/retry-dead/"])
def test_ids_past_64_bits_are_a_400(oncall: APIClient, url: str) -> None:
    letter = dead_letter()
    body: dict[str, Any] = {"ids": [letter.pk, HUGE]}
    if "outbox" not in url:
        body["note"] = "n"
    response = oncall.post(url, body, format="json")
    assert response.status_code == 400, response.content[:300]
    assert "less than or equal to 9223372036854775807" in str(response.json())
    letter.refresh_from_db()
    assert letter.status == "open"
    assert not OutboxMessage.objects.exists()


@pytest.mark.parametrize(
    "url",
    [
        LIST + "retry/",
        LIST + "discard/",
        LIST + "{id}/retry/",
        LIST + "{id}/discard/",
        LIST + "{id}/edit-retry/",
        BASE + "outbox/retry-dead/",
    ],
)
@pytest.mark.parametrize("depth", [40, 100_000])
def test_deeply_nested_json_is_a_400(oncall: APIClient, url: str, depth: int) -> None:
    letter = dead_letter()
    body = "[" * depth + "]" * depth
    response = oncall.post(url.format(id=letter.pk), body, content_type="application/json")
    assert response.status_code == 400, response.content[:300]
    assert "nested" in response.json()["detail"]


def test_nested_json_below_the_limit_still_parses(oncall: APIClient) -> None:
    letter = dead_letter()
    body: Any = {"ids": [letter.pk], "note": "ok", "extra": [[[[1]]]]}
    response = oncall.post(LIST + "retry/", json.dumps(body), content_type="application/json")
    assert response.status_code == 400  # parsed, then refused for its unknown key
    assert response.json() == {
        "non_field_errors": [
            "unknown field(s): extra; allowed: ids, consumer, fingerprint, all, upto, dry_run, "
            "note, force."
        ]
    }
    assert DeadLetter.objects.get(pk=letter.pk).status == "open"
    del body["extra"]
    response = oncall.post(LIST + "retry/", json.dumps(body), content_type="application/json")
    assert response.status_code == 200
    assert DeadLetter.objects.get(pk=letter.pk).status == "retried"


@pytest.mark.parametrize("where", ["consumer", "q", "topic"])
def test_nul_in_a_filter_is_a_400(oncall: APIClient, where: str) -> None:
    response = oncall.get(LIST, {where: "a\x00b"})
    assert response.status_code == 400
    assert "NUL" in str(response.json())


@pytest.mark.parametrize(
    ("path", "body", "unknown"),
    [
        ("outbox/retry-dead/", {"ids": [1], "bogus": 1}, "bogus"),
        ("dead-letters/retry/", {"all": True, "dryrun": True}, "dryrun"),  # typo of dry_run
        ("dead-letters/{id}/retry/", {"notes": "x"}, "notes"),
        ("dead-letters/{id}/discard/", {"note": "x", "Force": True}, "Force"),
    ],
)
def test_a_body_with_a_key_it_does_not_know_is_a_400_and_does_nothing(
    oncall: APIClient, path: str, body: dict[str, Any], unknown: str
) -> None:
    letter = dead_letter()
    url = "/api/events/" + path.format(id=letter.pk)
    response = oncall.post(url, body, format="json")
    assert response.status_code == 400, response.content[:300]
    assert f"unknown field(s): {unknown};" in str(response.json())
    assert DeadLetter.objects.get(pk=letter.pk).status == "open"
    assert not OutboxMessage.objects.exists()


@pytest.mark.parametrize("value", ["yes", "no", "true", "N", 1, 0, 1.0, [True]])
def test_a_yes_no_field_in_a_json_body_takes_true_or_false_only(
    oncall: APIClient, value: Any
) -> None:
    letter = dead_letter()
    response = oncall.post(LIST + "retry/", {"all": value, "dry_run": False}, format="json")
    assert response.status_code == 400, response.content[:300]
    assert response.json() == {"all": ["Must be true or false."]}
    assert DeadLetter.objects.get(pk=letter.pk).status == "open"


@pytest.mark.parametrize(("value", "retried"), [("true", True), ("on", True), ("0", False)])
def test_a_form_gives_a_yes_no_field_by_its_usual_spellings(
    oncall: APIClient, value: str, retried: bool
) -> None:
    letter = dead_letter()
    response = oncall.post(LIST + "retry/", {"ids": [letter.pk], "dry_run": value})
    assert response.status_code == 200, response.content[:300]
    assert DeadLetter.objects.get(pk=letter.pk).status == ("open" if retried else "retried")
    assert oncall.post(LIST + "retry/", {"all": "yes"}).json() == {
        "all": ["Must be true or false."]
    }
