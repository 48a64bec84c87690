"""Property: no query string makes a triage admin page answer 500.

Hypothesis sends arbitrary parameters (documented filter names with junk values, NUL,
Unicode digits, undocumented lookups) to the changelists, the groups page, the timeline
and the overview as a superuser.  Refused lookups are a 400, bad values a redirect or an
empty list, never a server error.
"""

from __future__ import annotations

from urllib.parse import quote

import pytest
from django.test import Client
from django.urls import reverse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.deadletter_factory import dead_letter, outbox_row

pytestmark = pytest.mark.django_db

PAGES = (
    "admin:reliable_events_deadletter_changelist",
    "admin:reliable_events_outboxmessage_changelist",
    "admin:reliable_events_processedmessage_changelist",
    "admin:reliable_events_deadletter_groups",
    "admin:reliable_events_timeline",
    "admin:reliable_events_overview",
)
names = st.sampled_from(
    [
        "status",
        "status__exact",
        "consumer",
        "consumer__exact",
        "fingerprint",
        "payload",
        "q",
        "o",
        "p",
        "e",
        "range",
        "refresh",
        "message_id",
        "pending_for",
        "last_failed_at__gte",
        "created_at__year",
        "created_at__month",
        "payload__contains",
        "traceback__icontains",
    ]
) | st.text(max_size=10)
values = st.sampled_from(
    ["\x00", "a\x00", "²", "١٢", str(2**63), "-1", "all", "open", "2026", "13", "order_id=42", "{"]
) | st.text(max_size=30)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(page=st.sampled_from(PAGES), params=st.lists(st.tuples(names, values), max_size=4))
def test_no_query_string_makes_an_admin_page_fail(
    admin_client: Client, page: str, params: list[tuple[str, str]]
) -> None:
    dead_letter()
    outbox_row()
    query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in params)
    response = admin_client.get(reverse(page) + ("?" + query if query else ""))
    assert response.status_code < 500, (page, params)
