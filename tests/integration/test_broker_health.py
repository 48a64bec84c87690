"""Broker health is not message health: a confirm timeout, a lost or refused connection
cost the rows nothing (no attempt, no backoff: due again at once, the relay pauses as a
whole); a ``basic.nack`` or a ``basic.return`` is the message's own failure and counts.

All on the real RabbitMQ, through a TCP proxy the test freezes or stops, with the shipped
retry policy (tests run it on the TIME_SCALE clock only)."""

from __future__ import annotations

import time
import uuid

import pytest
from django.db import transaction
from django.utils import timezone

from reliable_events import publish_event
from reliable_events.broker import UNROUTABLE_QUEUE
from reliable_events.models import OutboxMessage
from reliable_events.relay import Relay
from tests.support.producer_support import drain_queue, message_ids, with_port

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.rabbitmq, pytest.mark.postgres]


def _rows(count: int, key: str = "k") -> list[OutboxMessage]:
    with transaction.atomic():
        return [publish_event("h.x", {"n": n}, key=f"{key}{n % 3}") for n in range(count)]


def test_a_confirm_timeout_of_the_whole_batch_charges_no_row(
    broker, rabbit, exchange_name, amqp_url, tcp_proxy, re_settings
):
    queue = rabbit.bind_queue(exchange_name, "#")
    re_settings(
        PUBLISH_ON_COMMIT=False, BROKER_URL=with_port(amqp_url, tcp_proxy.port), CONFIRM_TIMEOUT=1
    )
    rows = _rows(20)
    relay = Relay()
    try:
        relay.publisher.connect()  # the connection is up; then the broker stops answering
        tcp_proxy.freeze()
        report = relay.run()
        assert (report.sent, report.failed, report.interrupted) == (0, 0, 20)
        assert "did not confirm in time" in report.broker_error
        stored = list(OutboxMessage.objects.filter(pk__in=[r.pk for r in rows]))
        assert {(r.status, r.attempts) for r in stored} == {("pending", 0)}
        assert all(r.next_attempt_at <= timezone.now() for r in stored)  # no backoff
        assert all("did not confirm" in r.last_error for r in stored)  # but the reason
        # the relay as a whole pauses instead (a few ms on the tests' clock)
        assert relay.breaker.failures == 1
        assert relay.breaker.down_since is not None

        tcp_proxy.thaw()
        tcp_proxy.stop()  # cut the frozen connection
        tcp_proxy.start()
        assert relay.breaker.remaining() <= 0.05 * 1.0  # RELAY_BROKER_RETRY_MAX x TIME_SCALE
        time.sleep(relay.breaker.remaining())
        report = relay.drain()
    finally:
        relay.close()
    assert report.sent == 20
    received = message_ids(drain_queue(rabbit.channel, queue, expect=20))
    assert set(received) == {r.message_id for r in rows}
    assert set(OutboxMessage.objects.values_list("attempts", flat=True)) == {1}  # the send


def test_a_refused_connection_charges_nothing_and_the_relay_retries_within_a_second(
    broker, rabbit, exchange_name, amqp_url, tcp_proxy, re_settings
):
    queue = rabbit.bind_queue(exchange_name, "#")
    # the shipped clock here: the pause is what a deployment gets
    re_settings(
        PUBLISH_ON_COMMIT=False, BROKER_URL=with_port(amqp_url, tcp_proxy.port), TIME_SCALE=1.0
    )
    rows = _rows(10)
    tcp_proxy.stop()
    relay = Relay()
    try:
        pauses = []
        for _ in range(6):
            before = time.monotonic()
            report = relay.run()
            after = time.monotonic()
            assert report.claimed == 0
            assert "cannot connect" in report.broker_error
            # the breaker tripped between the two readings: its pause lies within these bounds
            pauses.append((relay.breaker.open_until - after, relay.breaker.open_until - before))
            relay.breaker.open_until = 0  # try again now (what the pause would do)
        # doubling from RELAY_BROKER_RETRY_MAX / 8, capped at it, equal jitter
        assert pauses[0][0] <= 0.125
        assert pauses[0][1] >= 0.0625
        assert all(low <= 1.0 and high >= 0.5 for low, high in pauses[3:])
        stored = OutboxMessage.objects.filter(pk__in=[r.pk for r in rows])
        assert set(stored.values_list("attempts", flat=True)) == {0}
        tcp_proxy.start()
        assert relay.drain().sent == 10
    finally:
        relay.close()
    assert len(drain_queue(rabbit.channel, queue, expect=10)) == 10


def test_a_nack_and_a_return_are_the_messages_own_failures_and_count(
    broker, rabbit, exchange_name, re_settings, caplog
):
    """A real basic.nack (a queue that rejects publishes) and a real basic.return (a row
    addressed to a missing queue) in the same run as good rows: those two get an attempt
    and a backoff, the others are sent, the relay does not pause.  On the shipped clock:
    on the tests' (20 times faster) a failed row's backoff can end within the drain, and
    a loaded machine then sees it fail twice."""
    re_settings(PUBLISH_ON_COMMIT=False, TIME_SCALE=1.0)
    rabbit.full_queue(exchange_name, "full.#")
    ok_queue = rabbit.bind_queue(exchange_name, "fine.#")
    with transaction.atomic():
        nacked = publish_event("full.event", {"n": 1}, key="a")
        good = [publish_event("fine.event", {"n": n}, key=f"b{n}") for n in range(5)]
    returned = OutboxMessage.objects.create(
        message_id=str(uuid.uuid4()),
        topic="orders.created",
        queue=f"test-missing-{uuid.uuid4().hex[:10]}",
        payload={"n": 1},
        next_attempt_at=timezone.now(),
    )
    relay = Relay()
    try:
        report = relay.drain()
        assert relay.breaker.remaining() == 0
    finally:
        relay.close()
    assert (report.sent, report.failed, report.interrupted) == (5, 2, 0)
    assert report.broker_error == ""
    n, r = OutboxMessage.objects.get(pk=nacked.pk), OutboxMessage.objects.get(pk=returned.pk)
    assert (n.status, n.attempts) == ("pending", 1)
    assert "nack" in n.last_error
    assert (r.status, r.attempts, r.last_error) == ("pending", 1, UNROUTABLE_QUEUE)
    assert n.next_attempt_at > n.created_at  # its own backoff
    # Not silent until dead: each failed attempt is a warning naming one of them.
    (line,) = [
        r.getMessage()
        for r in caplog.records
        if r.levelname == "WARNING" and "did not take" in r.getMessage()
    ]
    assert line.startswith("reliable_events: the broker did not take 2 outbox message(s)")
    assert f"#{n.pk}" in line or f"#{r.pk}" in line
    assert "dead after 10 attempts" in line
    delivered = message_ids(drain_queue(rabbit.channel, ok_queue, expect=5))
    assert sorted(delivered) == sorted(g.message_id for g in good)


def test_a_message_that_cannot_be_written_is_its_own_failure_not_the_brokers(
    broker, rabbit, exchange_name, re_settings
):
    """A row AMQP cannot encode (a header integer beyond 64 bits, written behind
    publish_event's back, which only accepts string headers): that row gets the attempt;
    the rest of its batch is only interrupted and goes out next, and the relay does not
    take it for a broker outage (no pause).  On the shipped clock, so that the poison
    row's backoff outlasts the test's next drain on a loaded machine."""
    queue = rabbit.bind_queue(exchange_name, "#")
    re_settings(PUBLISH_ON_COMMIT=False, TIME_SCALE=1.0)
    with transaction.atomic():
        before = publish_event("p.ok", {"n": 1}, key="a")
        poison = OutboxMessage.objects.create(
            message_id=str(uuid.uuid4()),
            topic="p.bad",
            key="b",
            payload={"n": 2},
            headers={"huge": 2**70},
            next_attempt_at=timezone.now(),
        )
        after = publish_event("p.ok", {"n": 3}, key="c")
    relay = Relay()
    try:
        first = relay.run()
        assert (first.failed, first.interrupted, first.broker_error) == (1, 2, "")
        assert relay.breaker.remaining() == 0  # not a broker outage: no pause
        stored = OutboxMessage.objects.get(pk=poison.pk)
        assert (stored.status, stored.attempts) == ("pending", 1)
        others = OutboxMessage.objects.filter(pk__in=[before.pk, after.pk])
        assert set(others.values_list("attempts", flat=True)) == {0}
        assert relay.drain().sent == 2  # due again at once, without the poison row
    finally:
        relay.close()
    delivered = message_ids(drain_queue(rabbit.channel, queue, expect=2))
    assert sorted(delivered) == sorted([before.message_id, after.message_id])
