"""Settings are read lazily (override_settings works); capture_events() records events."""

from __future__ import annotations

import pytest
from django.db import transaction
from django.test import override_settings

from reliable_events import publish_event
from reliable_events.conf import EMBEDDED_BROKER_URL, AppSettings, app_settings
from reliable_events.models import OutboxMessage
from reliable_events.testing import capture_events


# -- conf ---------------------------------------------------------------------------------
def test_defaults_apply_when_not_set():
    with override_settings(RELIABLE_EVENTS={}):
        assert app_settings.EXCHANGE == "events"
        assert app_settings.MAX_ATTEMPTS == 10
        assert app_settings.PUBLISH_ON_COMMIT is True


def test_override_settings_is_seen_at_once():
    with override_settings(RELIABLE_EVENTS={"EXCHANGE": "first"}):
        assert app_settings.EXCHANGE == "first"
        with override_settings(RELIABLE_EVENTS={"EXCHANGE": "second", "MAX_ATTEMPTS": 2}):
            assert app_settings.EXCHANGE == "second"
            assert app_settings.MAX_ATTEMPTS == 2
        assert app_settings.EXCHANGE == "first"
        assert app_settings.MAX_ATTEMPTS == 10


def test_broker_url_falls_back_to_celery_then_to_the_embedded_transport():
    with override_settings(RELIABLE_EVENTS={}, CELERY_BROKER_URL="amqp://celery//"):
        assert app_settings.BROKER_URL == "amqp://celery//"
    with override_settings(RELIABLE_EVENTS={"BROKER_URL": None}, CELERY_BROKER_URL="amqp://c//"):
        assert app_settings.BROKER_URL == "amqp://c//"
    with override_settings(RELIABLE_EVENTS={}, CELERY_BROKER_URL=None):
        assert app_settings.BROKER_URL == EMBEDDED_BROKER_URL == "db://"
    with override_settings(RELIABLE_EVENTS={"BROKER_URL": "amqp://own//"}):
        assert app_settings.BROKER_URL == "amqp://own//"


def test_settings_that_are_not_a_dict_are_ignored_by_the_reader():
    with override_settings(RELIABLE_EVENTS="nonsense"):
        assert app_settings.EXCHANGE == "events"
        assert app_settings.unknown() == []


def test_names_and_unknown():
    names = AppSettings.names()
    assert names[0] == "BROKER_URL"
    assert {"EXCHANGE", "MAX_ATTEMPTS", "LANES", "ON_COMMIT_GRACE_SECONDS"} <= set(names)
    with override_settings(RELIABLE_EVENTS={"EXCHANGE": "x", "EXCHANGES": "y", "lower": 1}):
        assert app_settings.unknown() == ["EXCHANGES", "lower"]


def test_every_setting_is_documented():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "settings.md").read_text()
    missing = [name for name in AppSettings.names() if f"`{name}`" not in doc]
    assert missing == []


# -- capture_events -----------------------------------------------------------------------
@pytest.mark.django_db
def test_capture_events_records_what_publish_event_stores():
    publish_event("before.block", {})
    with capture_events() as events:
        first = publish_event("orders.created", {"order_id": 1}, key="1", headers={"t": "a"})
        publish_event("orders.paid", {"order_id": 1})
        publish_event("orders.created", {"order_id": 2})
    publish_event("after.block", {})

    assert len(events) == 3
    assert events.topics() == ["orders.created", "orders.paid", "orders.created"]
    assert [e.payload for e in events.for_topic("orders.created")] == [
        {"order_id": 1},
        {"order_id": 2},
    ]
    captured = events[0]
    assert captured.id == first.pk
    assert captured.message_id == first.message_id
    assert captured.key == "1"
    assert captured.headers == {"t": "a"}
    assert captured.using == "default"
    assert [e.topic for e in events] == events.topics()


@pytest.mark.django_db
def test_capture_events_records_inside_a_rolled_back_transaction_and_committed_filters():
    with capture_events() as events:
        with transaction.atomic():
            publish_event("kept", {})
        with transaction.atomic():
            publish_event("rolled.back", {})
            transaction.set_rollback(True)
    assert events.topics() == ["kept", "rolled.back"]
    assert [e.topic for e in events.committed()] == ["kept"]


@pytest.mark.django_db
def test_an_idempotent_repeat_is_not_captured_twice():
    with capture_events() as events:
        publish_event("a.b", {}, message_id="once")
        publish_event("a.b", {}, message_id="once")
    assert len(events) == 1


@pytest.mark.django_db
def test_invalid_events_are_not_captured_and_capture_stops_after_the_block():
    with capture_events() as events, pytest.raises(ValueError):
        publish_event("a..b", {})
    assert len(events) == 0
    publish_event("a.b", {})
    assert len(events) == 0
    assert OutboxMessage.objects.count() == 1
