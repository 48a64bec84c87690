"""Outbox rows addressed to one queue (dead-letter retries) are never silently dropped."""

from __future__ import annotations

import uuid

import pytest
from django.utils import timezone

from reliable_events.broker import UNROUTABLE_QUEUE
from reliable_events.models import OutboxMessage
from reliable_events.relay import relay_once

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.rabbitmq, pytest.mark.postgres]


def _direct_row(queue: str) -> OutboxMessage:
    return OutboxMessage.objects.create(
        message_id=str(uuid.uuid4()),
        topic="orders.created",
        queue=queue,
        payload={"n": 1},
        next_attempt_at=timezone.now(),
    )


def test_row_for_a_missing_queue_stays_pending_with_the_reason(broker, rabbit):
    missing = f"test-missing-{uuid.uuid4().hex[:10]}"
    row = _direct_row(missing)

    report = relay_once()

    assert (report.sent, report.failed) == (0, 1)
    row.refresh_from_db()
    assert row.status == OutboxMessage.Status.PENDING
    assert row.attempts == 1
    assert row.last_error == UNROUTABLE_QUEUE


def test_row_for_an_existing_queue_is_delivered_to_that_queue_only(broker, rabbit, exchange_name):
    other_subscriber = rabbit.bind_queue(exchange_name, "orders.#")
    target = f"test-direct-{uuid.uuid4().hex[:10]}"
    rabbit.channel.queue_declare(target, durable=True, auto_delete=False)
    rabbit.queues.append(target)
    missing_row = _direct_row(f"test-missing-{uuid.uuid4().hex[:10]}")
    row = _direct_row(target)

    report = relay_once()

    assert report.sent == 1
    row.refresh_from_db()
    missing_row.refresh_from_db()
    assert row.status == OutboxMessage.Status.SENT
    assert missing_row.status == OutboxMessage.Status.PENDING
    messages = rabbit.get_all(target, expect=1, timeout=5)
    assert [m.properties["message_id"] for m in messages] == [row.message_id]
    assert rabbit.get_all(other_subscriber, timeout=0.3) == []
