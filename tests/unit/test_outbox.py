"""reliable_events.outbox, the one writer of outbox rows: the hold (on-commit reservation
or delay), the row it builds, and the hand-over of inserted rows to the on-commit hook.

DB-agnostic: runs on PostgreSQL and on SQLite.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from django.db import connection, transaction
from django.db.models.functions import Now
from django.utils import timezone

from reliable_events import outbox
from reliable_events.models import OutboxMessage

pytestmark = pytest.mark.django_db


def test_the_hold_reserves_a_row_for_the_hook_only_without_a_delay(re_settings: Any) -> None:
    re_settings(PUBLISH_ON_COMMIT=True, ON_COMMIT_GRACE_SECONDS=30)
    before = timezone.now()
    hook = outbox.hold("default")
    assert hook.on_commit
    if connection.vendor == "postgresql":
        assert isinstance(hook.due, Now)  # due at once, on the database's clock
    else:
        assert isinstance(hook.due, datetime)
        assert hook.due >= before + timedelta(seconds=30)  # the relay waits out the grace

    delayed = outbox.hold("default", delay=timedelta(minutes=5))
    assert not delayed.on_commit
    assert isinstance(delayed.due, datetime)
    assert delayed.due >= before + timedelta(minutes=5)

    relay_only = outbox.hold("default", on_commit=False)
    assert not relay_only.on_commit
    assert isinstance(relay_only.due, Now)  # due at once, on the database's clock

    re_settings(PUBLISH_ON_COMMIT=False)
    assert not outbox.hold("default").on_commit


def test_a_new_row_takes_its_lane_from_its_key_and_owns_its_headers(re_settings: Any) -> None:
    re_settings(LANES=16)
    headers = {"h": "v"}
    keyed = outbox.new_row(topic="a.b", payload={}, due=timezone.now(), key="k1", headers=headers)
    headers["h"] = "changed"
    assert keyed.headers == {"h": "v"}
    assert keyed.lane == outbox.lane_for("k1", "anything")
    assert keyed.message_id  # a new id when none is given

    keyless = outbox.new_row(topic="a.b", payload={}, due=timezone.now())
    assert keyless.lane == outbox.lane_for(None, keyless.message_id)
    assert keyless.queue == ""
    assert keyless.message_id != keyed.message_id


def test_a_none_payload_is_stored_as_json_null_and_read_back_as_none() -> None:
    row = outbox.new_row(topic="a.b", payload=None, due=timezone.now(), queue="q.one")
    stored = outbox.insert(row, "default", on_commit=False)
    assert stored.payload is None  # a plain value again on the returned row
    assert isinstance(stored.next_attempt_at, datetime)
    assert OutboxMessage.objects.get(pk=stored.pk).payload is None
    assert OutboxMessage.objects.filter(pk=stored.pk, payload__isnull=True).count() == 0


def test_inserted_rows_are_handed_to_the_hook_only_when_asked(monkeypatch: Any) -> None:
    monkeypatch.setattr(outbox, "_tracker", type(outbox._tracker)())
    with transaction.atomic():
        due = timezone.now()
        rows = outbox.insert_many(
            [outbox.new_row(topic="a.b", payload={"n": n}, due=due) for n in range(3)],
            "default",
            on_commit=True,
        )
        quiet = outbox.insert_many(
            [outbox.new_row(topic="a.b", payload=None, due=due)], "default", on_commit=False
        )
        assert outbox._tracker.ids["default"] == [row.pk for row in rows]
        assert quiet[0].payload is None
        transaction.set_rollback(True)
    assert not OutboxMessage.objects.exists()
