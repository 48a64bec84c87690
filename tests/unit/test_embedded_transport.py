"""The embedded path: with BROKER_URL memory:// the on-commit hook and the relay deliver
to a kombu queue through the same code (DB-agnostic: also runs on SQLite)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any, cast

import pytest
from django.db import transaction
from kombu import Connection, Exchange, Queue

from reliable_events import publish_event
from reliable_events.broker import (
    BUCKET_HEADER,
    KEY_HEADER,
    KombuPublisher,
    OutgoingMessage,
    key_bucket,
    open_publisher,
)
from reliable_events.consumer.worker import Worker
from reliable_events.exceptions import ConfigurationError
from reliable_events.models import OutboxMessage
from reliable_events.relay import Relay, relay_once, retry_dead
from tests.support.consumer_support import make_consumer

pytestmark = pytest.mark.django_db


@pytest.fixture
def memory_exchange(re_settings: Any) -> str:
    name = f"mem-ev-{uuid.uuid4().hex[:10]}"
    re_settings(BROKER_URL="memory://", EXCHANGE=name)
    return name


@pytest.fixture
def memory_queue(memory_exchange: str) -> Iterator[Any]:
    """A kombu queue bound to the test exchange with ``orders.#``."""
    with Connection("memory://") as conn:
        queue = Queue(
            f"mem-q-{uuid.uuid4().hex[:10]}",
            Exchange(
                memory_exchange,
                "topic",
                durable=True,
                arguments={"alternate-exchange": f"{memory_exchange}.unrouted"},
            ),
            routing_key="orders.#",
        )(conn.default_channel)
        queue.declare()
        yield queue
        queue.delete()


def _read(queue: Any) -> list[Any]:
    messages = []
    while (message := queue.get(no_ack=False)) is not None:
        message.ack()
        messages.append(message)
    return messages


def test_on_commit_hook_delivers_to_a_kombu_queue(memory_queue, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True), transaction.atomic():
        row = publish_event("orders.created", {"order_id": 1}, key="1", headers={"h": "v"})
        publish_event("orders.paid", {"order_id": 1}, key="1")

    messages = _read(memory_queue)
    assert [json.loads(m.body) for m in messages] == [{"order_id": 1}, {"order_id": 1}]
    first = messages[0]
    assert first.properties["message_id"] == row.message_id
    assert first.properties["type"] == "orders.created"
    assert first.properties["delivery_mode"] == 2
    assert first.content_type == "application/json"
    assert first.headers == {"h": "v", KEY_HEADER: "1", BUCKET_HEADER: key_bucket("1")}
    assert OutboxMessage.objects.filter(status=OutboxMessage.Status.SENT).count() == 2


def test_relay_delivers_to_a_kombu_queue(memory_queue, re_settings):
    re_settings(PUBLISH_ON_COMMIT=False)
    ids = [publish_event("orders.created", {"n": n}, key="k").message_id for n in range(5)]
    report = relay_once()
    assert report.sent == 5
    assert report.failed == 0
    assert [m.properties["message_id"] for m in _read(memory_queue)] == ids
    assert OutboxMessage.objects.pending().count() == 0
    assert relay_once().claimed == 0  # nothing left


def test_unroutable_event_is_kept_in_the_unrouted_queue(memory_exchange, re_settings):
    re_settings(PUBLISH_ON_COMMIT=False)
    row = publish_event("nobody.listens", {"x": 1})
    assert relay_once().sent == 1
    with Connection("memory://") as conn:
        unrouted = Queue(f"{memory_exchange}.unrouted")(conn.default_channel)
        messages = _read(unrouted)
    assert [m.properties["message_id"] for m in messages] == [row.message_id]


def test_dead_row_retried_is_delivered(memory_queue, re_settings):
    re_settings(PUBLISH_ON_COMMIT=False)
    row = publish_event("orders.created", {"n": 1})
    OutboxMessage.objects.filter(pk=row.pk).update(status=OutboxMessage.Status.DEAD, attempts=10)
    assert relay_once().claimed == 0
    assert retry_dead() == 1
    assert relay_once().sent == 1
    assert len(_read(memory_queue)) == 1


def test_direct_queue_row_goes_to_the_queue_not_the_exchange(memory_exchange, re_settings):
    """Outbox rows with ``queue`` set (dead-letter retries) bypass the exchange."""
    re_settings(PUBLISH_ON_COMMIT=False)
    name = f"mem-direct-{uuid.uuid4().hex[:8]}"
    with Connection("memory://") as conn:
        queue = Queue(name)(conn.default_channel)
        queue.declare()
        from django.utils import timezone

        OutboxMessage.objects.create(
            message_id="retry-1",
            topic="orders.created",
            queue=name,
            payload={"a": 1},
            next_attempt_at=timezone.now(),
        )
        assert relay_once().sent == 1
        messages = _read(queue)
        queue.delete()
    assert [m.properties["message_id"] for m in messages] == ["retry-1"]


def test_kombu_publisher_reports_a_failing_publish(memory_exchange):
    publisher = open_publisher("memory://")
    assert isinstance(publisher, KombuPublisher)
    assert not publisher.connected
    assert publisher.publish([], timeout=1).confirmed == []
    good = OutgoingMessage(
        ref=1, exchange=memory_exchange, routing_key="a", body=b"{}", message_id="m1", topic="a"
    )
    # A body kombu cannot publish (not bytes/str) fails that message (an attempt); the
    # rest is only interrupted (not its fault: no attempt).
    bad = OutgoingMessage(
        ref=2,
        exchange=memory_exchange,
        routing_key="a",
        body=object(),  # type: ignore[arg-type]
        message_id="m2",
        topic="a",
    )
    after = OutgoingMessage(
        ref=3, exchange=memory_exchange, routing_key="a", body=b"{}", message_id="m3", topic="a"
    )
    result = publisher.publish([good, bad, after], timeout=1)
    assert result.confirmed == [1]
    assert set(result.failed) == {2}
    assert set(result.interrupted) == {3}
    assert not publisher.connected  # dropped after the failure; the next call reconnects
    assert publisher.publish([good], timeout=1).confirmed == [1]
    publisher.close()
    publisher.close()  # closing twice is harmless


def test_kombu_publisher_cannot_connect_to_an_unknown_transport():
    publisher = KombuPublisher("nosuchtransport://")
    result = publisher.publish(
        [
            OutgoingMessage(
                ref=1, exchange="e", routing_key="a", body=b"{}", message_id="m", topic="a"
            )
        ],
        timeout=1,
    )
    assert result.confirmed == []
    assert result.failed == {}  # the broker, not the message: no attempt is charged
    assert "cannot connect" in result.interrupted[1]


def test_relay_with_an_explicit_publisher_and_batch_size(memory_queue, re_settings):
    re_settings(PUBLISH_ON_COMMIT=False)
    for n in range(7):
        publish_event("orders.created", {"n": n})
    relay = Relay(batch_size=3, publisher=open_publisher())
    try:
        first = relay.run_batch()
        assert (first.claimed, first.sent) == (3, 3)
        rest = relay.drain()
    finally:
        relay.close()
    assert rest.sent == 4
    assert rest.failed == 0
    assert "sent=4" in str(rest)
    assert len(_read(memory_queue)) == 7


def test_relay_once_stops_after_max_seconds(memory_queue, re_settings):
    re_settings(PUBLISH_ON_COMMIT=False)
    for n in range(30):
        publish_event("orders.created", {"n": n})
    report = relay_once(batch_size=10, max_seconds=0)
    assert report.sent == 10  # one batch, then the time budget is spent
    assert OutboxMessage.objects.pending().count() == 20
    assert relay_once(batch_size=10).sent == 20


def test_kombu_declares_queues_without_bindings(memory_exchange):
    from reliable_events.topology import QueueSpec, Topology, declare_on_kombu_channel

    name = f"mem-plain-{uuid.uuid4().hex[:8]}"
    with Connection("memory://") as conn:
        channel = conn.default_channel
        declare_on_kombu_channel(channel, Topology(exchanges=(), queues=(QueueSpec(name),)))
        assert cast(Any, channel)._has_queue(name)
        Queue(name)(channel).delete()


def test_topology_data_follows_the_settings(re_settings):
    from reliable_events.topology import events_topology, full_topology, queue_arguments

    re_settings(EXCHANGE="shop", QUEUE_TYPE="quorum")
    topology = events_topology()
    assert [(e.name, e.type, e.arguments) for e in topology.exchanges] == [
        ("shop.unrouted", "fanout", {}),
        ("shop", "topic", {"alternate-exchange": "shop.unrouted"}),
    ]
    (unrouted,) = topology.queues
    assert unrouted.name == "shop.unrouted"
    assert unrouted.bindings == (("shop.unrouted", ""),)
    assert unrouted.arguments == {"x-queue-type": "quorum"}
    assert queue_arguments(**{"x-message-ttl": 5}) == {"x-queue-type": "quorum", "x-message-ttl": 5}
    re_settings(QUEUE_TYPE="classic")
    assert queue_arguments() == {}
    assert len(full_topology().queues) == 1


def test_redact_and_safe_url(re_settings):
    from reliable_events.broker import describe_error, redact, safe_url

    re_settings(BROKER_URL="amqp://user:pa55@host:5672//")
    assert redact("login pa55 failed") == "login *** failed"
    assert redact("pa55", "amqp://u:other@h//") == "pa55"
    assert redact("no password", "amqp://host//") == "no password"
    assert redact("pa55 [", "amqp://u:pa55@[::1") == "*** ["  # unparsable URL: masked too
    assert describe_error(RuntimeError("pa55 leaked")) == "RuntimeError: *** leaked"
    assert "pa55" not in safe_url("amqp://user:pa55@host:5672//")


def test_publisher_base_class_is_an_interface():
    from reliable_events.broker import Publisher

    base = Publisher()
    with pytest.raises(NotImplementedError):
        base.publish([], timeout=1)
    with pytest.raises(NotImplementedError):
        base.declare(None)  # type: ignore[arg-type]
    with pytest.raises(NotImplementedError):
        base.close()
    with pytest.raises(NotImplementedError):
        _ = base.connected
    assert base.flush(timeout=1).confirmed == []


def test_claim_due_takes_only_the_given_lanes(re_settings):
    from django.db import connection

    from reliable_events.relay import claim_due, mark_failed, mark_sent

    re_settings(PUBLISH_ON_COMMIT=False, LANES=4)
    rows = [publish_event("l.x", {"n": n}, key=f"key{n}") for n in range(20)]
    lane = rows[0].lane
    claimed = claim_due(connection.alias, [lane], 100)
    assert [row[0] for row in claimed] == [r.pk for r in rows if r.lane == lane]
    assert len(claim_due(connection.alias, [0, 1, 2, 3], 100)) == 20
    assert len(claim_due(connection.alias, [0, 1, 2, 3], 5)) == 5
    mark_sent(connection.alias, [])  # nothing to do
    assert mark_failed(connection.alias, {}) == 0


def test_kombu_publisher_leaves_an_undeclared_exchange_alone(memory_exchange):
    publisher = KombuPublisher("memory://")
    publisher.connect()
    try:
        channel = cast(Any, publisher)._conn.default_channel
        channel.exchange_delete(memory_exchange)
        message = OutgoingMessage(
            ref=1, exchange=memory_exchange, routing_key="a", body=b"{}", message_id="m", topic="a"
        )
        assert publisher._exchange_for(message) == memory_exchange
    finally:
        publisher.close()


def test_closing_a_broken_connection_is_quiet(caplog):
    import logging

    from reliable_events.broker.base import quiet_release

    with caplog.at_level(logging.DEBUG, logger="reliable_events"):
        quiet_release(object())  # has no release(): the error is logged at debug level only
    assert "error while closing a broker connection" in caplog.text


def test_an_ordered_consumer_is_refused_on_a_kombu_transport(clean_registry: Any) -> None:
    """kombu's virtual transports have no consistent-hash exchange: ordering would be lost
    silently, so the worker refuses to start rather than consume out of order."""
    consumer = make_consumer(clean_registry, name="orders.ordered")
    consumer.ordered = True
    with pytest.raises(ConfigurationError, match=r"ordered consumers \(orders.ordered\) need"):
        Worker([consumer], url="memory://")


def test_a_second_confirm_of_a_sent_row_keeps_its_first_mark(re_settings, caplog):
    import logging

    import prometheus_client
    from django.db import connection

    from reliable_events.relay import set_sent

    re_settings(PUBLISH_ON_COMMIT=False)
    rows = [publish_event("twice.x", {"n": n}, key="k") for n in range(3)]
    ids = [row.pk for row in rows]
    assert set_sent(connection.alias, ids[:2]) == []
    first = dict(OutboxMessage.objects.filter(pk__in=ids[:2]).values_list("pk", "sent_at"))
    counted = prometheus_client.REGISTRY.get_sample_value
    before = counted("reliable_events_publish_duplicates_total") or 0.0
    with caplog.at_level(logging.WARNING, logger="reliable_events"):
        assert set_sent(connection.alias, ids) == []  # published again (a lease expired)
    assert "2 confirmed outbox row(s) had been sent already" in caplog.text
    assert counted("reliable_events_publish_duplicates_total") == before + 2
    assert set(OutboxMessage.objects.values_list("status", "attempts")) == {("sent", 1)}
    assert first == dict(OutboxMessage.objects.filter(pk__in=ids[:2]).values_list("pk", "sent_at"))
