"""publish_event(): every InvalidEvent case writes nothing; idempotency, delay and lanes.

DB-agnostic: runs on PostgreSQL and on SQLite with the in-process transport.
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection, transaction
from django.utils import timezone

from reliable_events import publish_event
from reliable_events.exceptions import InvalidEvent
from reliable_events.models import OutboxMessage
from reliable_events.outbox import _flush, lane_for, schedule_on_commit

pytestmark = pytest.mark.django_db


class NotJson:
    pass


INVALID_CASES: list[tuple[str, dict[str, Any], str]] = [
    # (id, publish_event keyword arguments, a word the message must contain)
    ("object payload", {"payload": NotJson()}, "JSON"),
    ("set payload", {"payload": {1, 2}}, "JSON"),
    ("bytes payload", {"payload": b"raw"}, "JSON"),
    ("tuple dict key", {"payload": {(1, 2): "x"}}, "JSON"),
    ("NaN payload", {"payload": {"v": math.nan}}, "JSON"),
    ("infinite payload", {"payload": [math.inf]}, "JSON"),
    ("circular payload", {"payload": "circular"}, "JSON"),
    ("NUL in payload", {"payload": {"v": "a\x00b"}}, "NUL"),
    ("empty topic", {"topic": ""}, "topic"),
    ("None topic", {"topic": None}, "topic"),
    ("int topic", {"topic": 7}, "topic"),
    ("empty word", {"topic": "a..b"}, "malformed"),
    ("star wildcard", {"topic": "a.*"}, "malformed"),
    ("hash wildcard", {"topic": "orders.#"}, "malformed"),
    ("leading space", {"topic": " a"}, "malformed"),
    ("leading dot", {"topic": ".a"}, "malformed"),
    ("trailing dot", {"topic": "a."}, "malformed"),
    ("inner space", {"topic": "a b"}, "malformed"),
    ("too long topic", {"topic": "a" * 256}, "longer"),
    ("int header value", {"headers": {"tenant": 1}}, "string"),
    ("None header value", {"headers": {"tenant": None}}, "string"),
    ("bytes header value", {"headers": {"tenant": b"a"}}, "string"),
    ("int header name", {"headers": {1: "a"}}, "header names"),
    ("empty header name", {"headers": {"": "a"}}, "header names"),
    ("headers not a mapping", {"headers": [("a", "b")]}, "mapping"),
    ("reserved x-event-key", {"headers": {"x-event-key": "k"}}, "reserved"),
    ("reserved X-Death", {"headers": {"X-Death": "1"}}, "reserved"),
    ("NUL header value", {"headers": {"h": "\x00"}}, "NUL"),
    ("empty key", {"key": ""}, "key"),
    ("key with spaces", {"key": " k"}, "key"),
    ("key with newline", {"key": "k\n"}, "key"),
    ("key not a string", {"key": 7}, "key"),
    ("too long key", {"key": "k" * 256}, "key"),
    ("empty message_id", {"message_id": ""}, "message_id"),
    ("message_id with spaces", {"message_id": " id "}, "message_id"),
    ("message_id with control", {"message_id": "a\x01b"}, "message_id"),
    ("message_id not a string", {"message_id": 5}, "message_id"),
    ("too long message_id", {"message_id": "i" * 256}, "message_id"),
    ("negative delay", {"delay": -1}, "delay"),
    ("negative timedelta", {"delay": timedelta(seconds=-1)}, "delay"),
    ("string delay", {"delay": "5"}, "delay"),
    ("bool delay", {"delay": True}, "delay"),
    ("NaN delay", {"delay": math.nan}, "delay"),
    ("infinite delay", {"delay": math.inf}, "delay"),
    ("delay too large for a float", {"delay": 10**400}, "delay"),
    ("delay over a year", {"delay": timedelta(days=400)}, "delay"),
]


def _call(overrides: dict[str, Any]) -> OutboxMessage:
    kwargs: dict[str, Any] = {"topic": "orders.created", "payload": {"order_id": 1}}
    kwargs.update(overrides)
    if kwargs["payload"] == "circular":
        loop: list[Any] = []
        loop.append(loop)
        kwargs["payload"] = loop
    topic = kwargs.pop("topic")
    payload = kwargs.pop("payload")
    return publish_event(topic, payload, **kwargs)


@pytest.mark.parametrize(
    ("overrides", "word"), [c[1:] for c in INVALID_CASES], ids=[c[0] for c in INVALID_CASES]
)
def test_invalid_event_writes_nothing(overrides, word):
    with transaction.atomic():
        with pytest.raises(InvalidEvent) as info:
            _call(overrides)
        # the caller's transaction is still usable, and nothing was written in it
        assert OutboxMessage.objects.count() == 0
    assert word.lower() in str(info.value).lower()
    assert isinstance(info.value, ValueError)
    assert OutboxMessage.objects.count() == 0


@pytest.mark.parametrize(
    "overrides",
    [
        {"message_id": "é" * 200},  # 200 characters, 400 bytes: over AMQP's 255-byte limit
        {"headers": {"ü" * 200: "v"}},  # header name over 255 bytes
        {"headers": {"big": "v" * 200_000}},  # would not fit a frame: broker FRAME_ERROR
        {"payload": {"v": "\ud800"}},  # lone surrogate: not encodable as UTF-8
        {"headers": {"h": "\udcff"}},
        {"key": "\ud800"},
        {"message_id": "\ud800"},
    ],
    ids=[
        "message_id bytes",
        "header name bytes",
        "headers size",
        "surrogate payload",
        "surrogate header",
        "surrogate key",
        "surrogate message_id",
    ],
)
def test_events_the_broker_would_reject_are_invalid(overrides):
    """Each of these, once stored, would fail every publish (and the batch with it)."""
    with transaction.atomic(), pytest.raises(InvalidEvent):
        _call(overrides)
    assert OutboxMessage.objects.count() == 0


def test_payload_cap_is_configurable(re_settings):
    re_settings(MAX_PAYLOAD_BYTES=100)
    publish_event("a.b", "x" * 98)  # 100 bytes of JSON with the quotes
    with pytest.raises(InvalidEvent, match="MAX_PAYLOAD_BYTES"):
        publish_event("a.b", "x" * 99)
    assert OutboxMessage.objects.count() == 1


def test_payload_cap_counts_utf8_bytes(re_settings):
    re_settings(MAX_PAYLOAD_BYTES=10)
    publish_event("a.b", "éééé")  # 6 characters of JSON, 10 bytes
    with pytest.raises(InvalidEvent, match="MAX_PAYLOAD_BYTES"):
        publish_event("a.b", "ééééé")  # 7 characters, 12 bytes
    assert OutboxMessage.objects.count() == 1


def test_valid_event_is_stored_pending_with_its_fields():
    row = publish_event(
        "orders.created", {"order_id": 7, "tags": ("a", "b")}, key="7", headers={"tenant": "a"}
    )
    stored = OutboxMessage.objects.get(pk=row.pk)
    assert stored.status == OutboxMessage.Status.PENDING
    assert stored.attempts == 0
    assert stored.topic == "orders.created"
    assert stored.key == "7"
    assert stored.headers == {"tenant": "a"}
    assert stored.payload == {"order_id": 7, "tags": ["a", "b"]}  # as it goes on the wire
    assert stored.queue == ""
    assert len(stored.message_id) == 36  # a UUID
    assert stored.lane == lane_for("7", stored.message_id)
    assert row.payload == stored.payload


def test_json_null_and_scalar_payloads_are_events():
    payloads: list[Any] = [None, 0, "", [], {}]
    for payload in payloads:
        row = publish_event("a.b", payload)
        assert OutboxMessage.objects.get(pk=row.pk).payload == payload


def test_module_level_publish_event_is_the_same_function():
    from reliable_events.publishing import publish_event as inner

    row = publish_event(
        "a.b",
        {"x": 1},
        key="k",
        headers={"h": "v"},
        message_id="m-1",
        delay=timedelta(0),
        using="default",
    )
    assert inner("a.b", {"x": 1}, key="k", headers={"h": "v"}, message_id="m-1").pk == row.pk


# -- idempotency --------------------------------------------------------------------------
def test_same_message_id_twice_stores_one_row():
    first = publish_event("orders.created", {"order_id": 1}, key="1", message_id="order-1")
    second = publish_event("orders.created", {"order_id": 1}, key="1", message_id="order-1")
    assert second.pk == first.pk
    assert OutboxMessage.objects.filter(message_id="order-1").count() == 1


def test_same_message_id_twice_in_separate_transactions():
    with transaction.atomic():
        first = publish_event("a.b", {"n": 1}, message_id="same")
    with transaction.atomic():
        again = publish_event("a.b", {"n": 1}, message_id="same")
    assert again.pk == first.pk
    assert OutboxMessage.objects.count() == 1


@pytest.mark.parametrize(
    "change",
    [
        {"payload": {"order_id": 2}},
        {"topic": "orders.updated"},
        {"key": "other"},
        {"headers": {"tenant": "b"}},
    ],
    ids=["payload", "topic", "key", "headers"],
)
def test_same_message_id_for_a_different_event_is_invalid(change):
    base: dict[str, Any] = {
        "topic": "orders.created",
        "payload": {"order_id": 1},
        "key": "1",
        "headers": {"tenant": "a"},
    }
    publish_event(base.pop("topic"), base.pop("payload"), message_id="dup", **base)
    other: dict[str, Any] = {
        "topic": "orders.created",
        "payload": {"order_id": 1},
        "key": "1",
        "headers": {"tenant": "a"},
        **change,
    }
    with transaction.atomic(), pytest.raises(InvalidEvent, match="already used"):
        publish_event(other.pop("topic"), other.pop("payload"), message_id="dup", **other)
    assert OutboxMessage.objects.filter(message_id="dup").count() == 1


def test_message_id_of_a_direct_retry_row_does_not_block_a_new_event():
    """Rows addressed to one consumer queue (dead-letter retries) reuse ids freely."""
    OutboxMessage.objects.create(
        message_id="m", topic="a.b", queue="consumer-q", payload={}, next_attempt_at=timezone.now()
    )
    row = publish_event("a.b", {}, message_id="m")
    assert row.queue == ""
    assert OutboxMessage.objects.filter(message_id="m").count() == 2


# -- delay ----------------------------------------------------------------------------------
def test_delay_holds_the_event_and_registers_no_on_commit_publish(
    django_capture_on_commit_callbacks,
):
    before = timezone.now()
    with django_capture_on_commit_callbacks() as callbacks:
        row = publish_event("a.b", {}, delay=30)
        timed = publish_event("a.b", {}, delay=timedelta(minutes=2))
    assert callbacks == []
    assert row.next_attempt_at >= before + timedelta(seconds=30)
    assert timed.next_attempt_at >= before + timedelta(minutes=2)
    assert OutboxMessage.objects.due().count() == 0


def test_undelayed_event_is_due_for_the_on_commit_hook(
    re_settings, django_capture_on_commit_callbacks
):
    """PostgreSQL: due at once on the database clock (lane locks keep the hook and the
    relay apart, a missed row must not wait).  SQLite: reserved for the grace period."""
    re_settings(ON_COMMIT_GRACE_SECONDS=20)
    before = timezone.now()
    with django_capture_on_commit_callbacks() as callbacks:
        row = publish_event("a.b", {})
    assert len(callbacks) == 1
    stored = OutboxMessage.objects.get(pk=row.pk)
    assert stored.next_attempt_at == row.next_attempt_at
    if connection.vendor == "postgresql":
        assert row.next_attempt_at == stored.created_at
        assert OutboxMessage.objects.due().filter(pk=row.pk).exists()
    else:
        assert row.next_attempt_at >= before + timedelta(seconds=20)
        assert not OutboxMessage.objects.due().filter(pk=row.pk).exists()


def test_without_publish_on_commit_the_event_is_due_at_once(
    re_settings, django_capture_on_commit_callbacks
):
    re_settings(PUBLISH_ON_COMMIT=False)
    with django_capture_on_commit_callbacks() as callbacks:
        row = publish_event("a.b", {})
    assert callbacks == []
    assert row.next_attempt_at <= timezone.now()
    assert OutboxMessage.objects.due().filter(pk=row.pk).exists()


# -- lanes --------------------------------------------------------------------------------
def test_key_fixes_the_lane(re_settings):
    re_settings(LANES=8)
    rows = [publish_event("a.b", {"n": n}, key="customer-42") for n in range(5)]
    assert len({row.lane for row in rows}) == 1
    assert all(0 <= row.lane < 8 for row in rows)
    keyless = [publish_event("a.b", {"n": n}) for n in range(40)]
    assert all(row.lane == lane_for(None, row.message_id) for row in keyless)
    assert len({row.lane for row in keyless}) > 1  # spread over the lanes


def test_lane_for_is_stable_and_bounded(re_settings):
    re_settings(LANES=16)
    lanes = {lane_for(f"k{n}", "ignored") for n in range(500)}
    assert lanes == set(range(16))
    assert lane_for("k1", "a") == lane_for("k1", "b")
    re_settings(LANES=1)
    assert lane_for("anything", "x") == 0


# -- on-commit tracking -------------------------------------------------------------------
def test_flush_without_tracked_ids_does_nothing():
    _flush("default")  # nothing tracked: returns without touching the broker


def test_tracked_ids_are_bounded(monkeypatch):
    import reliable_events.outbox as outbox

    monkeypatch.setattr(outbox, "_MAX_TRACKED_IDS", 3)
    outbox._tracker.ids.pop("default", None)
    with transaction.atomic():
        for pk in range(1, 6):
            schedule_on_commit(pk, "default")
        assert outbox._tracker.ids["default"] == [3, 4, 5]
        transaction.set_rollback(True)
    outbox._tracker.ids.pop("default", None)
