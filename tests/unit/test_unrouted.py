"""Unrouted events are never silent, and a ``delay=`` event is not stuck backlog.

On the embedded ``memory://`` transport the publisher routes an event no queue is bound
for into ``<EXCHANGE>.unrouted`` itself, so the count, the overview card and
``outbox_status --fail-on-unrouted`` are shown here with real (in-process) messages.
The RabbitMQ side is tests/integration/test_topology_heal.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from kombu import Connection

from reliable_events import publish_event
from reliable_events.broker import OutgoingMessage, open_publisher
from reliable_events.conf import app_settings
from reliable_events.exceptions import BrokerError
from reliable_events.models import OutboxMessage
from reliable_events.status import outbox_status
from reliable_events.topology import unrouted_name
from reliable_events.unrouted import (
    cached_unrouted_count,
    clear_cache,
    count_unrouted,
    describe_topics,
    republish_unrouted,
    topic_matches,
)
from tests.support.producer_support import free_port

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def empty_unrouted() -> Iterator[None]:
    """The memory transport is shared by the whole test process: start empty."""

    def purge() -> None:
        with Connection("memory://") as conn:
            channel: Any = conn.default_channel
            channel.queue_declare(unrouted_name())
            channel.queue_purge(unrouted_name())
        clear_cache()

    purge()
    yield
    purge()


def divert(*topics: str) -> None:
    """Publish events no queue is bound for (the publisher of the configured embedded
    transport, ``memory://`` or ``db://``, routes them to unrouted)."""
    publisher = open_publisher()
    try:
        messages = [
            OutgoingMessage(
                ref=index,
                exchange=str(app_settings.EXCHANGE),
                routing_key=topic,
                body=b"{}",
                message_id=f"m-{index}",
                topic=topic,
            )
            for index, topic in enumerate(topics)
        ]
        result = publisher.publish(messages, timeout=5)
        assert set(result.confirmed) == set(range(len(topics)))
    finally:
        publisher.close()


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


# -- counting ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("orders.*", "orders.created", True),
        ("orders.*", "orders.created.eu", False),
        ("orders.#", "orders", True),
        ("orders.#", "orders.created.eu", True),
        ("#", "anything.at.all", True),
        ("*.created", "orders.created", True),
        ("*.created", "created", False),
        ("a.#.z", "a.b.c.z", True),
        ("a.#.z", "a.z", True),
        ("a.#.z", "a.b.c", False),
    ],
)
def test_topic_matching_follows_amqp(pattern: str, topic: str, expected: bool) -> None:
    assert topic_matches(pattern, topic) is expected


def test_describe_topics_names_the_most_frequent_first() -> None:
    from collections import Counter

    topics = Counter({f"t{i}": i + 1 for i in range(12)})
    text = describe_topics(topics)
    assert text.startswith("t11 x12, t10 x11")
    assert text.endswith("and 2 more topic(s)")


@pytest.mark.parametrize("url", ["memory://", "db://"])
def test_the_embedded_transport_counts_what_the_publisher_diverted(
    re_settings: Any, url: str
) -> None:
    re_settings(BROKER_URL=url)
    assert count_unrouted(url).count == 0
    divert("nobody.listens", "nobody.listens", "nor.here")
    count = count_unrouted(url)
    assert count.count == 3
    assert count.queue == unrouted_name()


def test_the_filesystem_transport_counts_from_its_folder(re_settings: Any, tmp_path: Any) -> None:
    folder = tmp_path / "broker"
    folder.mkdir()
    re_settings(
        BROKER_URL="filesystem://",
        BROKER_TRANSPORT_OPTIONS={
            "data_folder_in": str(folder),
            "data_folder_out": str(folder),
            "control_folder": str(tmp_path / "control"),
        },
    )
    publisher = open_publisher()
    try:
        message = OutgoingMessage(
            ref=1,
            exchange=str(app_settings.EXCHANGE),
            routing_key="nobody.listens",
            body=b"{}",
            message_id="fs-1",
            topic="nobody.listens",
        )
        assert publisher.publish([message], timeout=5).confirmed == [1]
    finally:
        publisher.close()
    assert len(list(folder.iterdir())) == 1  # on disk: any process sees it
    assert count_unrouted().count == 1
    assert json.loads(run("outbox_status", "--json"))["unrouted"] == 1


def test_an_unreachable_broker_gives_an_unknown_count_without_its_password() -> None:
    url = f"amqp://guest:s3cret@127.0.0.1:{free_port()}//"
    count = count_unrouted(url, timeout=0.5)
    assert count.count is None
    assert count.error.startswith("cannot count")
    assert "s3cret" not in count.error


def test_pages_reuse_the_count_for_unrouted_cache_seconds(re_settings: Any) -> None:
    re_settings(UNROUTED_CACHE_SECONDS=3600)
    assert cached_unrouted_count().count == 0
    divert("nobody.listens")
    assert cached_unrouted_count().count == 0  # cached
    clear_cache()
    assert cached_unrouted_count().count == 1
    re_settings(UNROUTED_CACHE_SECONDS=0)
    divert("nobody.listens")
    assert cached_unrouted_count().count == 2


# -- outbox_status ------------------------------------------------------------------------
def test_outbox_status_shows_the_unrouted_count_and_fails_on_it_when_asked() -> None:
    assert run("outbox_status", "--fail-on-unrouted").splitlines()[-1] == (
        f"unrouted ({unrouted_name()}): 0"
    )
    divert("nobody.listens", "nobody.listens")
    text = run("outbox_status")  # without the flag: exit 0
    assert f"unrouted ({unrouted_name()}): 2 (no queue was bound" in text
    assert json.loads(run("outbox_status", "--json"))["unrouted"] == 2
    with pytest.raises(CommandError, match="2 event") as info:
        run("outbox_status", "--fail-on-unrouted")
    assert info.value.returncode == 5


def test_outbox_status_fails_on_unrouted_when_the_broker_cannot_be_asked(
    re_settings: Any,
) -> None:
    re_settings(BROKER_URL=f"amqp://guest:guest@127.0.0.1:{free_port()}//", CONNECT_TIMEOUT=0.5)
    assert "unknown, cannot count" in run("outbox_status")  # reported, exit 0
    with pytest.raises(CommandError, match="cannot count") as info:
        run("outbox_status", "--fail-on-unrouted")
    assert info.value.returncode == 5
    with pytest.raises(CommandError, match="needs the broker"):
        run("outbox_status", "--fail-on-unrouted", "--skip-broker")
    assert "unrouted" not in run("outbox_status", "--skip-broker")


def test_the_dead_flag_keeps_its_exit_code_when_unrouted_events_exist_too() -> None:
    OutboxMessage.objects.create(
        message_id="d", topic="a.b", payload={}, status="dead", next_attempt_at=timezone.now()
    )
    divert("nobody.listens")
    with pytest.raises(CommandError) as info:
        run("outbox_status", "--fail-on-dead", "--fail-on-unrouted")
    assert info.value.returncode == 3


def test_republish_needs_an_amqp_broker_or_the_database_transport(re_settings: Any) -> None:
    re_settings(BROKER_URL="memory://")
    with pytest.raises(CommandError, match=r"needs an AMQP broker \(RabbitMQ\) or db://"):
        run("republish_unrouted", "--no-declare")


def test_republish_from_a_broker_that_does_not_answer_says_so_without_its_password(
    re_settings: Any,
) -> None:
    url = f"amqp://guest:s3cret@127.0.0.1:{free_port()}//"
    re_settings(CONNECT_TIMEOUT=0.5)
    with pytest.raises(BrokerError, match=r"stopped after 0 message\(s\)") as info:
        republish_unrouted(url)
    assert "s3cret" not in str(info.value)
    with pytest.raises(CommandError, match="stopped after 0") as command:
        run("republish_unrouted", "--no-declare", "--url", url)
    assert "s3cret" not in str(command.value)


# -- the admin overview -------------------------------------------------------------------
def test_the_overview_shows_the_unrouted_count(admin_client: Client) -> None:
    response = admin_client.get(reverse("admin:reliable_events_overview"))
    page = response.content.decode()
    assert 'id="re-card-unrouted"' in page
    assert "re-unrouted-note" not in page
    divert("nobody.listens", "nobody.listens", "nor.here")
    clear_cache()
    page = admin_client.get(reverse("admin:reliable_events_overview")).content.decode()
    card = page[page.index('id="re-card-unrouted"') - 40 :][:600]
    assert "re-bad" in card
    assert '<span class="re-card-value">3</span>' in card
    assert "3 events were confirmed by the broker but reached no consumer" in page
    assert "republish_unrouted" in page


def test_the_overview_says_when_the_count_is_unknown(
    admin_client: Client, re_settings: Any
) -> None:
    re_settings(BROKER_URL=f"amqp://guest:guest@127.0.0.1:{free_port()}//", CONNECT_TIMEOUT=0.5)
    page = admin_client.get(reverse("admin:reliable_events_overview")).content.decode()
    card = page[page.index('id="re-card-unrouted"') - 40 :][:600]
    assert "re-warn" in card
    assert '<span class="re-card-value">?</span>' in card
    assert "Unrouted events could not be counted" in page


def test_the_api_stats_carry_the_unrouted_count(admin_client: Client) -> None:
    divert("nobody.listens")
    from reliable_events.overview import overview

    data = overview().as_dict()
    assert data["unrouted"] == 1
    assert data["unrouted_error"] == ""


# -- a delay= event is not stuck backlog ----------------------------------------------------
def test_a_delayed_event_not_yet_due_is_scheduled_not_stuck() -> None:
    publish_event("reports.nightly", {}, delay=timedelta(hours=6))
    status = outbox_status()
    assert status.pending == 1
    assert status.scheduled == 1
    assert status.oldest_pending_age_seconds is None
    run("outbox_status", "--max-pending-age", "1", "--skip-broker")  # exit 0
    assert "scheduled (delay=, not due yet): 1" in run("outbox_status", "--skip-broker")


def test_a_delayed_event_counts_from_when_it_became_due() -> None:
    row = publish_event("reports.nightly", {}, delay=timedelta(hours=6))
    now = timezone.now()
    # Stored 6 h 2 min ago, due 2 min ago (and not yet published).
    OutboxMessage.objects.filter(pk=row.pk).update(
        created_at=now - timedelta(hours=6, minutes=2), next_attempt_at=now - timedelta(minutes=2)
    )
    status = outbox_status()
    assert status.scheduled == 0
    age = status.oldest_pending_age_seconds
    assert age is not None
    assert 110 < age < 200
    with pytest.raises(CommandError, match=r"oldest pending row is 1[0-9][0-9]s old") as info:
        run("outbox_status", "--max-pending-age", "60", "--skip-broker")
    assert info.value.returncode == 4


def test_an_event_that_is_not_delayed_counts_from_its_creation() -> None:
    now = timezone.now()
    row = OutboxMessage.objects.create(
        message_id="late", topic="a.b", payload={}, next_attempt_at=now - timedelta(minutes=9)
    )
    OutboxMessage.objects.filter(pk=row.pk).update(created_at=now - timedelta(minutes=10))
    # A failed publish pushed its next attempt into the future: still overdue.
    failed = OutboxMessage.objects.create(
        message_id="failed",
        topic="a.b",
        payload={},
        attempts=3,
        next_attempt_at=now + timedelta(minutes=5),
    )
    OutboxMessage.objects.filter(pk=failed.pk).update(created_at=now - timedelta(minutes=20))
    status = outbox_status()
    assert status.scheduled == 0
    age = status.oldest_pending_age_seconds
    assert age is not None
    assert 1190 < age < 1300


def test_an_on_commit_reservation_is_not_taken_for_a_delay(re_settings: Any) -> None:
    re_settings(PUBLISH_ON_COMMIT=True)
    row = publish_event("orders.created", {})  # reserved ON_COMMIT_GRACE_SECONDS for the hook
    stored = timezone.now() - timedelta(minutes=3)
    grace = timedelta(seconds=float(app_settings.ON_COMMIT_GRACE_SECONDS))
    OutboxMessage.objects.filter(pk=row.pk).update(
        created_at=stored, next_attempt_at=stored + grace
    )
    status = outbox_status()
    assert status.scheduled == 0
    age = status.oldest_pending_age_seconds
    assert age is not None
    assert age > 170
