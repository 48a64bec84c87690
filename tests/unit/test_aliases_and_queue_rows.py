"""Which database (``reliable_events.db``) and the ``db://`` transport's row encoding
(``broker/queue_rows.py``): bad input gives a clear error or a safe value, never a crash.

DB-agnostic: runs on PostgreSQL and on SQLite.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from reliable_events import deadletters
from reliable_events.broker.queue_rows import load_headers, queue_row
from reliable_events.broker_url import is_database_url, safe_url
from reliable_events.db import queue_alias, read_alias, write_alias
from reliable_events.exceptions import ConfigurationError
from reliable_events.models import OutboxMessage
from reliable_events.relay.breaker import BrokerBreaker
from reliable_events.sanitize import json_safe
from reliable_events.timeline import timeline
from tests.support.deadletter_factory import dead_letter, outbox_row


def test_a_db_url_names_its_database_or_says_which_alias_is_missing() -> None:
    assert queue_alias("db://") == "default"
    assert queue_alias("db://default") == "default"
    with pytest.raises(ConfigurationError, match="no database alias 'nowhere' in DATABASES"):
        queue_alias("db://nowhere")
    assert is_database_url("DB://default")
    assert not is_database_url("amqp://guest:guest@localhost//")
    assert safe_url("db://default") == "db://default"  # nothing to hide, shown as given


def test_using_wins_over_the_routers() -> None:
    assert write_alias(OutboxMessage) == read_alias(OutboxMessage) == "default"
    assert write_alias(OutboxMessage, "other") == read_alias(OutboxMessage, "other") == "other"


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        ({"a": "1"}, {"a": "1"}),
        ('{"a": "1"}', {"a": "1"}),
        ("not json", {}),
        ("[1, 2]", {}),
        (None, {}),
        ("", {}),
    ],
)
def test_stored_headers_that_are_not_an_object_read_as_empty(
    stored: object, expected: dict[str, Any]
) -> None:
    assert load_headers(stored) == expected


def test_a_queue_row_survives_odd_headers_and_timestamps() -> None:
    values: dict[str, Any] = {"message_id": "m-1", "topic": None, "body": b"{}"}
    row = queue_row(
        "q", headers={"x-event-attempt": "²", "x-event-key": 7}, published_at=0, **values
    )
    _queue, _id, topic, key, _headers, _body, attempt, stamp = row
    assert (topic, key, attempt) == ("", None, 1)  # the consumer dead-letters the attempt
    assert stamp == datetime(1970, 1, 1, tzinfo=UTC)
    row = queue_row("q", headers=None, published_at=True, **values)
    assert row[7] is None  # a bool is not a timestamp
    row = queue_row("q", headers={"x-event-key": "k"}, published_at="2026", **values)
    assert (row[3], row[7]) == ("k", None)


@pytest.mark.django_db
def test_a_selection_without_criteria_selects_nothing() -> None:
    dead_letter()
    assert not deadletters.select().exists()
    assert deadletters.select(everything=True).count() == 1


@pytest.mark.django_db
def test_a_letter_without_queue_or_consumer_cannot_be_retried() -> None:
    letter = dead_letter(save=False, queue="", consumer="")
    assert deadletters.retry_block_reason(letter) == "the consumer queue is unknown"


def test_json_too_deep_for_postgresql_is_kept_as_bounded_text() -> None:
    deep: object = "leaf"
    for _ in range(30):
        deep = [deep]
    safe = json_safe({"h": deep})
    while isinstance(safe, dict | list):
        safe = safe["h"] if isinstance(safe, dict) else safe[0]
    assert isinstance(safe, str)
    assert "leaf" in safe
    assert len(safe) <= 1000


@pytest.mark.django_db
def test_a_dead_outbox_row_shows_in_the_message_timeline() -> None:
    row = outbox_row(status=OutboxMessage.Status.DEAD, last_error="refused")
    found = timeline(row.message_id)
    assert found.found
    assert any("dead in the outbox" in event.summary for event in found.events)
    assert not timeline("no-such-id").found


def test_a_long_broker_outage_is_logged_again_while_it_lasts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    breaker = BrokerBreaker()
    breaker.trip("connection refused")
    breaker._logged -= BrokerBreaker.LOG_EVERY  # the first warning is that old now
    with caplog.at_level("WARNING", logger="reliable_events.relay.breaker"):
        breaker.trip("connection refused")
    assert "broker still unavailable after" in caplog.text
    assert "connection refused" in caplog.text
