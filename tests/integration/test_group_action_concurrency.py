"""Group actions under concurrent dead-lettering (PostgreSQL, real transactions).

The failure-groups page shows "Discard 14"; bounces keep arriving.  The click must act on
the 14 letters shown: letters committed after the page was drawn, whether they got a
higher id or (a transaction that began earlier and committed late) a lower one, are never
touched.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from django.db import connections, transaction
from django.test import Client
from django.urls import reverse

from reliable_events.models import DeadLetter, TriageEntry
from tests.support.deadletter_factory import dead_letter, many_dead_letters, staff_user

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.postgres]

ONCALL = ("view_deadletter", "retry_deadletter", "discard_deadletter")
GROUP: dict[str, Any] = {"consumer": "mail.send", "fingerprint": "fp-bounce"}


def oncall() -> Client:
    client = Client()
    client.force_login(staff_user("oncall", *ONCALL))
    return client


def snapshot(client: Client) -> dict[str, Any]:
    page = client.get(reverse("admin:reliable_events_deadletter_groups"))
    (group,) = [r["group"] for r in page.context["groups"] if r["group"].consumer == "mail.send"]
    return {**GROUP, "upto": group.last_id, "seen": group.count}


def test_letters_dead_lettered_during_the_click_are_not_touched() -> None:
    client = oncall()
    seen = {letter.pk for letter in many_dead_letters(14, **GROUP)}
    form = snapshot(client)
    stop = threading.Event()
    arrived: list[int] = []
    errors: list[BaseException] = []

    def bounce() -> None:
        try:
            while not stop.is_set() or len(arrived) < 5:
                arrived.append(dead_letter(**GROUP).pk)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    writer = threading.Thread(target=bounce)
    writer.start()
    try:
        response = client.post(
            reverse("admin:reliable_events_deadletter_group_action"),
            {**form, "op": "discard", "note": "mailbox full"},
        )
    finally:
        stop.set()
        writer.join(30)
    assert not errors
    assert response.status_code == 302
    discarded = set(DeadLetter.objects.filter(status="discarded").values_list("pk", flat=True))
    assert discarded == seen
    assert set(DeadLetter.objects.open().values_list("pk", flat=True)) == set(arrived)
    assert set(TriageEntry.objects.values_list("dead_letter_id", flat=True)) == seen


def test_a_letter_committed_late_below_the_snapshot_stops_the_action() -> None:
    """A transaction takes id N, another commits N+1, the page shows N+1; N commits later."""
    client = oncall()
    many_dead_letters(3, **GROUP)
    holding = threading.Event()
    release = threading.Event()
    late: list[int] = []

    def slow_writer() -> None:
        try:
            with transaction.atomic():
                late.append(dead_letter(**GROUP).pk)
                holding.set()
                release.wait(30)
        finally:
            connections.close_all()

    writer = threading.Thread(target=slow_writer)
    writer.start()
    assert holding.wait(30)
    dead_letter(**GROUP)  # committed, with a higher id than the one still in flight
    form = snapshot(client)
    assert form["seen"] == 4
    assert form["upto"] > late[0]
    release.set()
    writer.join(30)

    response = client.post(
        reverse("admin:reliable_events_deadletter_group_action"), {**form, "op": "retry"}
    )
    texts = [str(m) for m in client.get(response["Location"]).context["messages"]]
    assert any("The group changed since you looked" in t for t in texts), texts
    assert DeadLetter.objects.open().count() == 5
    assert not TriageEntry.objects.exists()
