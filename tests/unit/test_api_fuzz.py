"""Property: no query string, path id or JSON body makes any API endpoint answer 500.

Hypothesis throws arbitrary text (Unicode digits, NUL, huge numbers, deep nesting) at
every endpoint as a user holding every permission, so the requests get past the
permission checks into the parsing and the queries.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rest_framework.test import APIClient

from tests.support.deadletter_factory import EVERY_PERMISSION, dead_letter, staff_user

pytestmark = pytest.mark.django_db

BASE = "/api/events/"
LIST = BASE + "dead-letters/"
GET_URLS = (LIST, LIST + "groups/", LIST + "{id}/", BASE + "outbox/stats/", LIST + "timeline/")
POST_URLS = (
    LIST + "retry/",
    LIST + "discard/",
    LIST + "{id}/retry/",
    LIST + "{id}/discard/",
    LIST + "{id}/edit-retry/",
    BASE + "outbox/retry-dead/",
)
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

#: Names the endpoints read, plus junk: the interesting values go to real parameters.
names = st.sampled_from(
    [
        "page",
        "page_size",
        "limit",
        "status",
        "consumer",
        "q",
        "failed_after",
        "failed_before",
        "ordering",
        "message_id",
        "payload",
        "payload__contains",
        "format",
    ]
) | st.text(max_size=12)
tricky_text = st.sampled_from(
    ["²", "٣", "\uff11", "0", "-1", str(2**63), str(2**64), "9" * 30, "\x00", "1e400", "all", ""]
) | st.text(max_size=40)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | tricky_text
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
bodies = st.dictionaries(
    st.sampled_from(["ids", "note", "consumer", "fingerprint", "all", "dry_run", "payload", "upto"])
    | st.text(max_size=8),
    json_values,
    max_size=5,
)


@pytest.fixture
def every_permission() -> APIClient:
    client = APIClient()
    client.force_authenticate(staff_user("fuzzer", *EVERY_PERMISSION))
    return client


def _url(template: str, path_id: str) -> str:
    return template.format(id=quote(path_id, safe="") or "x")


@FUZZ
@given(
    template=st.sampled_from(GET_URLS),
    path_id=tricky_text,
    params=st.lists(st.tuples(names, tricky_text), max_size=4),
)
def test_no_query_string_is_a_500(
    every_permission: APIClient, template: str, path_id: str, params: list[tuple[str, str]]
) -> None:
    dead_letter()
    query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in params)
    response = every_permission.get(_url(template, path_id) + ("?" + query if query else ""))
    assert response.status_code < 500, (template, params, response.content[:300])


@FUZZ
@given(template=st.sampled_from(POST_URLS), path_id=tricky_text, body=bodies)
def test_no_json_body_is_a_500(
    every_permission: APIClient, template: str, path_id: str, body: dict[str, Any]
) -> None:
    letter = dead_letter()
    url = _url(template, str(letter.pk) if path_id == "" else path_id)
    response = every_permission.post(url, json.dumps(body), content_type="application/json")
    assert response.status_code < 500, (url, body, response.content[:300])
