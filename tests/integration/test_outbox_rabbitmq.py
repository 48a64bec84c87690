"""The outbox against the real RabbitMQ: commit publishes once, rollback never."""

from __future__ import annotations

import json

import pytest
from django.db import transaction

from reliable_events import publish_event
from reliable_events.broker import BUCKET_HEADER, key_bucket
from reliable_events.models import OutboxMessage

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.rabbitmq, pytest.mark.postgres]


def test_rolled_back_transaction_never_reaches_the_broker(broker, rabbit, exchange_name):
    queue = rabbit.bind_queue(exchange_name, "orders.#")

    class Boom(Exception):
        pass

    def place_order_then_fail() -> None:
        with transaction.atomic():
            publish_event("orders.created", {"order_id": 1})
            raise Boom

    with pytest.raises(Boom):
        place_order_then_fail()

    assert OutboxMessage.objects.count() == 0
    assert rabbit.get_all(queue, timeout=0.5) == []


def test_committed_transaction_publishes_exactly_one_persistent_json_message(
    broker, rabbit, exchange_name
):
    queue = rabbit.bind_queue(exchange_name, "orders.#")
    with transaction.atomic():
        row = publish_event("orders.created", {"order_id": 7}, key="7", headers={"tenant": "a"})

    messages = rabbit.get_all(queue, expect=1, timeout=5)
    assert len(messages) == 1
    message = messages[0]
    assert json.loads(message.body) == {"order_id": 7}
    assert message.properties["delivery_mode"] == 2
    assert message.properties["message_id"] == row.message_id
    assert message.properties["content_type"] == "application/json"
    assert message.properties["application_headers"]["tenant"] == "a"
    assert message.properties["application_headers"]["x-event-key"] == "7"
    assert message.properties["type"] == "orders.created"
    assert OutboxMessage.objects.get(pk=row.pk).status == OutboxMessage.Status.SENT
    # nothing else arrives later
    assert rabbit.get_all(queue, timeout=0.3) == []


def test_wire_properties_of_a_published_event(broker, rabbit, exchange_name):
    from datetime import UTC, datetime

    queue = rabbit.bind_queue(exchange_name, "orders.#")
    with transaction.atomic():
        row = publish_event("orders.created", {"name": "Zoë", "n": [1, 2.5, None]})
    (message,) = rabbit.get_all(queue, expect=1, timeout=5)
    body = message.body if isinstance(message.body, str) else message.body.decode("utf-8")
    assert json.loads(body) == {"name": "Zoë", "n": [1, 2.5, None]}
    assert "Zoë" in body  # UTF-8, not \u escapes
    assert message.properties["content_encoding"] == "utf-8"
    # no key, no headers: only the bucket ordered consumers are partitioned by
    assert message.properties["application_headers"] == {BUCKET_HEADER: key_bucket(row.message_id)}
    stamp = message.properties["timestamp"]
    when = stamp if isinstance(stamp, datetime) else datetime.fromtimestamp(stamp, UTC)
    created = OutboxMessage.objects.get(pk=row.pk).created_at
    assert abs((when - created).total_seconds()) < 2
    assert message.delivery_info["routing_key"] == "orders.created"
    assert message.delivery_info["exchange"] == exchange_name


def test_without_publish_on_commit_only_the_relay_publishes(
    broker, rabbit, exchange_name, re_settings
):
    from reliable_events.relay import relay_once

    queue = rabbit.bind_queue(exchange_name, "orders.#")
    re_settings(PUBLISH_ON_COMMIT=False)
    with transaction.atomic():
        row = publish_event("orders.created", {"order_id": 9})
    assert rabbit.get_all(queue, timeout=0.3) == []
    assert relay_once().sent == 1
    assert [m.properties["message_id"] for m in rabbit.get_all(queue, expect=1)] == [row.message_id]
