"""The relay against the real PostgreSQL + RabbitMQ: failures hold back only their own key,
unroutable events are kept, dead rows are visible and retryable, delays hold, and the
Celery relay task can run twice at once without harm."""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import close_old_connections, connection, transaction
from django.db.models.functions import Now

from reliable_events import publish_event
from reliable_events.broker import AmqpPublisher, open_publisher
from reliable_events.models import OutboxMessage
from reliable_events.relay import Relay, relay_once, retry_dead
from reliable_events.status import outbox_status
from tests.support.producer_support import (
    CutAtPublisher,
    FailingPublisher,
    drain_queue,
    message_ids,
    wait_until,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.postgres, pytest.mark.rabbitmq]


def _make_due(*rows: OutboxMessage) -> None:
    """Let the backoff of ``rows`` pass (the relay compares with the database clock)."""
    OutboxMessage.objects.filter(pk__in=[r.pk for r in rows]).update(next_attempt_at=Now())


def _hold(row: OutboxMessage) -> None:
    """Keep ``row`` in its backoff for the rest of the test."""
    OutboxMessage.objects.filter(pk=row.pk).update(next_attempt_at=Now() + timedelta(hours=1))


def _relay(publisher: Any) -> Any:
    relay = Relay(publisher=publisher)
    try:
        return relay.drain()
    finally:
        relay.close()


def test_a_failing_event_holds_back_its_key_but_not_the_others(
    broker, rabbit, exchange_name, re_settings
):
    """a1 keeps failing: a2, a3 (same key) wait; b and c (other keys) are delivered;
    once a1 succeeds, a1, a2, a3 arrive in order."""
    queue = rabbit.bind_queue(exchange_name, "#")
    re_settings(PUBLISH_ON_COMMIT=False, TIME_SCALE=60)  # the backoff lasts (slow clock)
    a1 = publish_event("orders.created", {"seq": 1}, key="A")
    failing = FailingPublisher(open_publisher(), fail_ids={a1.message_id})
    # a1's first attempt fails (its key's later events do not exist yet)
    report = _relay(failing)
    assert (report.sent, report.failed) == (0, 1)
    # the events that follow, in later transactions
    with transaction.atomic():
        b1 = publish_event("orders.created", {"seq": 1}, key="B")
        a2 = publish_event("orders.paid", {"seq": 2}, key="A")
        c1 = publish_event("orders.created", {"seq": 1})
        a3 = publish_event("orders.shipped", {"seq": 3}, key="A")
        b2 = publish_event("orders.paid", {"seq": 2}, key="B")

    # a1 is still in backoff: the relay sends B and the keyless event, holds a2 and a3
    _hold(a1)
    report = _relay(failing)
    delivered = message_ids(drain_queue(rabbit.channel, queue, expect=3))
    assert delivered == [b1.message_id, c1.message_id, b2.message_id]
    held = OutboxMessage.objects.filter(pk__in=[a2.pk, a3.pk])
    assert {(r.status, r.attempts) for r in held} == {(OutboxMessage.Status.PENDING, 0)}
    assert report.sent == 3

    # a1 is due again and fails again: a2 and a3 still wait
    _make_due(a1)
    report = _relay(failing)
    assert report.failed == 1
    assert OutboxMessage.objects.get(pk=a1.pk).attempts == 2
    assert drain_queue(rabbit.channel, queue, expect=1, timeout=0.5) == []
    assert OutboxMessage.objects.filter(pk__in=[a2.pk, a3.pk], status="pending").count() == 2

    # the fault clears: the key's events go, in order
    failing.fail_ids.clear()
    _make_due(a1)
    report = _relay(failing)
    assert report.sent == 3
    delivered = message_ids(drain_queue(rabbit.channel, queue, expect=3))
    assert delivered == [a1.message_id, a2.message_id, a3.message_id]
    assert OutboxMessage.objects.pending().count() == 0
    assert OutboxMessage.objects.get(pk=a1.pk).attempts == 3


def test_connection_lost_mid_batch_resends_everything_unconfirmed_in_order(
    broker, rabbit, exchange_name, re_settings
):
    queue = rabbit.bind_queue(exchange_name, "#")
    # the shipped policy on a slow clock: a charged attempt would wait a minute
    re_settings(PUBLISH_ON_COMMIT=False, TIME_SCALE=60)
    with transaction.atomic():
        rows = [publish_event("t.x", {"n": n}, key=f"k{n % 3}") for n in range(12)]
    cut = CutAtPublisher(open_publisher(), cut_ids={rows[5].message_id})
    report = _relay(cut)
    assert report.sent == 5
    assert (report.failed, report.interrupted) == (0, 7)
    first = message_ids(drain_queue(rabbit.channel, queue, expect=5))
    assert first == [r.message_id for r in rows[:5]]
    failed = OutboxMessage.objects.filter(pk__in=[r.pk for r in rows[5:]])
    # a lost connection is the broker's failure: no attempt counted, due again at once
    assert all(r.attempts == 0 and r.last_error == "injected connection loss" for r in failed)

    cut.cut_ids.clear()
    assert _relay(cut).sent == 7  # due again at once: no backoff for a broker failure
    rest = message_ids(drain_queue(rabbit.channel, queue, expect=7))
    assert rest == [r.message_id for r in rows[5:]]


def test_unroutable_event_is_kept_in_the_unrouted_queue(broker, rabbit, exchange_name):
    bound = rabbit.bind_queue(exchange_name, "orders.#")
    with transaction.atomic():
        routed = publish_event("orders.created", {"n": 1})
        lost = publish_event("nobody.listens.here", {"n": 2}, key="k")
    assert wait_until(lambda: OutboxMessage.objects.pending().count() == 0, timeout=10)
    unrouted = f"{exchange_name}.unrouted"
    kept = rabbit.get_all(unrouted, expect=1, timeout=5)
    assert message_ids(kept) == [lost.message_id]
    assert kept[0].delivery_info["routing_key"] == "nobody.listens.here"
    assert json.loads(kept[0].body) == {"n": 2}
    assert message_ids(rabbit.get_all(bound, expect=1)) == [routed.message_id]


def test_max_attempts_makes_the_row_dead_then_retry_dead_delivers_it(
    broker, rabbit, exchange_name, re_settings
):
    queue = rabbit.bind_queue(exchange_name, "#")
    # the shipped MAX_ATTEMPTS (10); a slow clock keeps the row in its backoff between tries
    re_settings(PUBLISH_ON_COMMIT=False, TIME_SCALE=60)
    row = publish_event("orders.created", {"n": 1}, key="A")
    failing = FailingPublisher(open_publisher(), fail_ids={row.message_id})
    for attempt in range(1, 11):
        _make_due(row)
        report = _relay(failing)
        assert report.failed == 1
        stored = OutboxMessage.objects.get(pk=row.pk)
        assert stored.attempts == attempt
        assert stored.last_error == "injected failure (like basic.nack)"
    assert stored.status == OutboxMessage.Status.DEAD
    assert report.dead == 1
    # dead is visible...
    status = outbox_status()
    assert status.dead == 1
    out = StringIO()
    with pytest.raises(CommandError) as info:
        call_command("outbox_status", "--fail-on-dead", stdout=out)
    assert info.value.returncode == 3
    assert "dead: 1" in out.getvalue()
    # ...no longer holds back its key (documented), and is never sent by the relay
    later = publish_event("orders.paid", {"n": 2}, key="A")
    assert _relay(failing).sent == 1
    assert message_ids(drain_queue(rabbit.channel, queue, expect=1)) == [later.message_id]
    _make_due(row)
    assert _relay(failing).claimed == 0

    # retry_dead makes it pending again, with fresh attempts, and the relay delivers it
    failing.fail_ids.clear()
    assert retry_dead([row.pk]) == 1
    stored = OutboxMessage.objects.get(pk=row.pk)
    assert (stored.status, stored.attempts, stored.last_error) == ("pending", 0, "")
    assert _relay(failing).sent == 1
    assert message_ids(drain_queue(rabbit.channel, queue, expect=1)) == [row.message_id]
    assert OutboxMessage.objects.get(pk=row.pk).status == OutboxMessage.Status.SENT
    assert retry_dead() == 0


def test_delay_holds_the_event_until_due(broker, rabbit, exchange_name):
    queue = rabbit.bind_queue(exchange_name, "#")
    with transaction.atomic():
        delayed = publish_event("reminders.due", {"n": 1}, delay=1.0)
        now = publish_event("reminders.now", {"n": 2})
    # the on-commit hook publishes the undelayed one only
    assert message_ids(drain_queue(rabbit.channel, queue, expect=1)) == [now.message_id]
    assert relay_once().claimed == 0
    assert OutboxMessage.objects.get(pk=delayed.pk).status == OutboxMessage.Status.PENDING
    assert wait_until(lambda: relay_once().sent == 1, timeout=10, interval=0.2)
    assert message_ids(drain_queue(rabbit.channel, queue, expect=1)) == [delayed.message_id]


def test_a_delayed_event_holds_back_later_events_of_its_key(broker, rabbit, exchange_name):
    queue = rabbit.bind_queue(exchange_name, "#")
    with transaction.atomic():
        first = publish_event("k.first", {}, key="K", delay=0.8)
    with transaction.atomic():
        second = publish_event("k.second", {}, key="K")
        other = publish_event("k.other", {}, key="L")
    assert message_ids(drain_queue(rabbit.channel, queue, expect=1)) == [other.message_id]
    assert OutboxMessage.objects.get(pk=second.pk).status == "pending"
    _make_due(second)  # even once its own reservation is over, it waits for `first`
    assert relay_once().sent == 0
    assert wait_until(lambda: relay_once().sent == 2, timeout=10, interval=0.2)
    delivered = message_ids(drain_queue(rabbit.channel, queue, expect=2))
    assert delivered == [first.message_id, second.message_id]


def test_two_relay_tasks_at_once_lose_nothing_and_mark_only_confirmed_rows(
    broker, rabbit, exchange_name, re_settings
):
    """Two Celery relay runs (eager, in two threads) drain the same rows."""
    from celery import Celery
    from celery._state import get_current_app

    import reliable_events.tasks  # noqa: F401 - registers the shared tasks

    queue = rabbit.bind_queue(exchange_name, "#")
    re_settings(PUBLISH_ON_COMMIT=False, RELAY_BATCH_SIZE=50)
    with transaction.atomic():
        ids = [publish_event("t.x", {"n": n}, key=f"k{n % 40}").message_id for n in range(2000)]

    previous = get_current_app()
    app = Celery("tests-two-relays", set_as_current=True)
    app.config_from_object("django.conf:settings", namespace="CELERY")
    relay_outbox = app.tasks["reliable_events.tasks.relay_outbox"]
    assert relay_outbox.app.conf.task_always_eager  # never a message to a real broker
    results: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(relay_outbox.delay(max_seconds=30).get(disable_sync_subtasks=False))
        except BaseException as exc:
            errors.append(exc)
        finally:
            close_old_connections()
            connection.close()

    try:
        threads = [threading.Thread(target=run) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        previous.set_current()
    assert errors == []
    assert sum(r["failed"] for r in results) == 0
    # whatever one run left (it may have found its lanes taken), a last run sends
    last = relay_once()
    delivered = message_ids(drain_queue(rabbit.channel, queue, expect=len(ids)))
    assert sorted(delivered) == sorted(ids)  # every event exactly once
    sent = set(OutboxMessage.objects.sent().values_list("message_id", flat=True))
    assert sent == set(ids)  # every sent row was confirmed: it is in the queue
    assert sum(r["sent"] for r in results) + last.sent == len(ids)


def test_the_confirm_window_smaller_than_the_batch(broker, rabbit, exchange_name, re_settings):
    queue = rabbit.bind_queue(exchange_name, "#")
    re_settings(PUBLISH_ON_COMMIT=False, CONFIRM_WINDOW=7, RELAY_BATCH_SIZE=100)
    with transaction.atomic():
        ids = [publish_event("w.x", {"n": n}, key="one-key").message_id for n in range(250)]
    report = relay_once()
    assert (report.sent, report.failed) == (250, 0)
    assert message_ids(drain_queue(rabbit.channel, queue, expect=250)) == ids


def test_per_key_order_over_many_keys_and_batches(broker, rabbit, exchange_name, re_settings):
    queue = rabbit.bind_queue(exchange_name, "#")
    re_settings(PUBLISH_ON_COMMIT=False, RELAY_BATCH_SIZE=37, LANES=8)
    with transaction.atomic():
        for n in range(600):
            publish_event("o.x", {"key": f"k{n % 23}", "seq": n // 23}, key=f"k{n % 23}")
    assert relay_once().sent == 600
    seqs: dict[str, list[int]] = defaultdict(list)
    for message in drain_queue(rabbit.channel, queue, expect=600):
        body = json.loads(message.body)
        seqs[body["key"]].append(body["seq"])
    assert all(values == sorted(values) for values in seqs.values())
    assert sum(len(v) for v in seqs.values()) == 600


def test_amqp_publisher_reports_a_nack_free_confirm_for_each_message(broker, rabbit, exchange_name):
    """The publisher on its own: confirmed refs in order, nothing failed."""
    from reliable_events.broker import OutgoingMessage

    publisher = open_publisher()
    assert isinstance(publisher, AmqpPublisher)
    try:
        messages = [
            OutgoingMessage(
                ref=n,
                exchange=exchange_name,
                routing_key="p.x",
                body=b"{}",
                message_id=f"m{n}",
                topic="p.x",
            )
            for n in range(20)
        ]
        result = publisher.publish(messages, timeout=10)
        assert result.confirmed == list(range(20))
        assert result.failed == {}
        assert publisher.connected
        assert publisher.publish([], timeout=1).confirmed == []
    finally:
        publisher.close()
    assert not publisher.connected
    publisher.close()  # twice is harmless


def test_a_message_the_broker_nacks_stays_pending_and_is_retried(
    broker, rabbit, exchange_name, re_settings
):
    """A real basic.nack: a bound queue that is full and rejects publishes."""
    re_settings(PUBLISH_ON_COMMIT=False, TIME_SCALE=60)  # the backoff lasts (slow clock)
    full = rabbit.full_queue(exchange_name, "full.#")
    ok_queue = rabbit.bind_queue(exchange_name, "fine.#")

    with transaction.atomic():
        rejected = publish_event("full.event", {"n": 1})
        accepted = publish_event("fine.event", {"n": 2})
    report = relay_once()
    assert (report.sent, report.failed) == (1, 1)
    stored = OutboxMessage.objects.get(pk=rejected.pk)
    assert stored.status == OutboxMessage.Status.PENDING
    assert "nack" in stored.last_error
    assert stored.attempts == 1
    assert message_ids(drain_queue(rabbit.channel, ok_queue, expect=1)) == [accepted.message_id]

    # the queue accepts messages again: the retry delivers it
    rabbit.channel.queue_delete(full)
    full_again = rabbit.bind_queue(exchange_name, "full.#", name=full)
    _make_due(rejected)
    assert relay_once().sent == 1
    assert message_ids(drain_queue(rabbit.channel, full_again, expect=1)) == [rejected.message_id]


def test_lanes_held_by_another_relay_are_left_alone(broker, rabbit, exchange_name, re_settings):
    """A lane whose lease another (live) relay holds is not published by this relay; once
    that lease expired (the other relay died), this relay takes the lane over."""
    from datetime import timedelta

    from django.utils import timezone

    from reliable_events.models import LaneLease
    from reliable_events.publishing import lane_for

    queue = rabbit.bind_queue(exchange_name, "#")
    # Two lanes: the other relay (it counts while its lease lasts) holds one; this
    # relay's fair share is the other.
    re_settings(PUBLISH_ON_COMMIT=False, LANES=2)
    with transaction.atomic():
        rows = [publish_event("l.x", {"n": n}, key=f"key{n}") for n in range(12)]
    busy_lane = lane_for("key0", "")
    later = timezone.now() + timedelta(hours=1)
    LaneLease.objects.create(lane=busy_lane, owner="other-relay", expires_at=later, token=7)
    relay_once()
    held = {r.message_id for r in rows if r.lane == busy_lane}
    delivered = set(message_ids(drain_queue(rabbit.channel, queue, expect=12 - len(held))))
    assert delivered == {r.message_id for r in rows} - held
    assert held  # key0's lane had events
    assert OutboxMessage.objects.pending().count() == len(held)
    # with every lane leased elsewhere, a relay does nothing at all
    LaneLease.objects.update(owner="other-relay", expires_at=later)
    assert relay_once().claimed == 0
    # the other relay stopped renewing: once its leases expired, they change hands (the
    # fencing token grows) and this relay sends the lane's rows
    LaneLease.objects.update(expires_at=timezone.now())
    assert relay_once().sent == len(held)
    assert set(message_ids(drain_queue(rabbit.channel, queue, expect=len(held)))) == held
    assert LaneLease.objects.get(lane=busy_lane).token == 8
    assert not LaneLease.objects.exclude(owner="").exists()  # given back on close


def test_declaring_a_forbidden_exchange_is_a_broker_error(broker, amqp_url):
    from reliable_events.exceptions import BrokerError
    from reliable_events.topology import ExchangeSpec, Topology

    publisher = AmqpPublisher(amqp_url)
    try:
        with pytest.raises(BrokerError, match="declaring topology failed"):
            publisher.declare(Topology((ExchangeSpec("amq.reserved-by-test", "topic"),), ()))
        assert not publisher.connected
    finally:
        publisher.close()


def test_a_publisher_may_skip_declaring_the_events_topology(
    broker, rabbit, exchange_name, amqp_url
):
    import amqp

    publisher = AmqpPublisher(amqp_url, declare_events_topology=False)
    try:
        publisher.connect()
        publisher.connect()  # already connected: nothing happens
        assert publisher.connected
    finally:
        publisher.close()
    with pytest.raises(amqp.exceptions.NotFound):
        rabbit.channel.exchange_declare(exchange_name, "topic", passive=True)
    rabbit.channel = rabbit.connection.channel()  # the failed passive declare closed it


def test_quorum_topology_and_a_queue_type_conflict(
    broker, rabbit, exchange_name, re_settings, clean_registry
):
    re_settings(QUEUE_TYPE="quorum")
    out = StringIO()
    call_command("declare_topology", stdout=out)
    call_command("declare_topology", stdout=StringIO())  # idempotent
    re_settings(QUEUE_TYPE="classic")  # the unrouted queue exists as a quorum queue
    with pytest.raises(CommandError, match="already has this topology") as info:
        call_command("declare_topology", stdout=StringIO())
    assert "x-queue-type" in str(info.value) or "inequivalent" in str(info.value)


@pytest.mark.parametrize("batch_size", [1, 50])
def test_a_retried_event_that_fails_again_late_is_not_overtaken_by_its_key(
    broker, rabbit, exchange_name, re_settings, batch_size
):
    """While a retried event is in flight (its failure not known yet), the next batches
    must not carry its key's later events."""
    from tests.support.producer_support import LateNackPublisher

    queue = rabbit.bind_queue(exchange_name, "#")
    # The backoff lasts (slow clock): on the tests' fast clock a drain slower than the
    # backoff (a loaded machine) took `first` a third time and counted two failures.
    re_settings(PUBLISH_ON_COMMIT=False, RELAY_BATCH_SIZE=batch_size, TIME_SCALE=60)
    first = publish_event("k.one", {}, key="K")
    late = LateNackPublisher(open_publisher(), fail_ids={first.message_id})
    assert _relay(late).failed == 1  # the first failure, alone
    with transaction.atomic():
        second = publish_event("k.two", {}, key="K")
        other = publish_event("o.one", {}, key="O")
    _make_due(first)
    report = _relay(late)  # `first` is retried and fails again, late
    assert report.failed == 1
    assert message_ids(drain_queue(rabbit.channel, queue, expect=1)) == [other.message_id]
    assert OutboxMessage.objects.get(pk=second.pk).status == OutboxMessage.Status.PENDING

    late.fail_ids.clear()
    _make_due(first)
    assert _relay(late).sent == 2
    assert message_ids(drain_queue(rabbit.channel, queue, expect=2)) == [
        first.message_id,
        second.message_id,
    ]


def test_a_relay_gives_its_lanes_back_once_it_caught_up(broker, rabbit, exchange_name, re_settings):
    """A run cut short with rows still due keeps its lanes (a backlog: the next run goes
    on at once); a run whose last claim was short gives them back, so the on-commit hooks
    of the rows committed from then on publish them (none waits for a relay's batch)."""
    from reliable_events.models import LaneLease

    queue = rabbit.bind_queue(exchange_name, "#")
    re_settings(PUBLISH_ON_COMMIT=False)
    with transaction.atomic():
        rows = [publish_event("c.x", {"n": n}, key=f"key{n}") for n in range(5)]
    relay = Relay(batch_size=2)
    try:
        cut = relay.run(max_seconds=0)
        assert (cut.sent, cut.caught_up) == (2, False)
        held = LaneLease.objects.filter(owner=relay.lanes.owner)
        assert held.count() == len(relay.lanes.held) > 0
        rest = relay.drain()
        assert (rest.sent, rest.caught_up) == (3, True)
        assert not held.exists()
    finally:
        relay.close()
    delivered = message_ids(drain_queue(rabbit.channel, queue, expect=5))
    assert sorted(delivered) == sorted(r.message_id for r in rows)
