"""The on-commit hook against the real RabbitMQ (through a TCP proxy that counts
connections): never raises, skipped while the breaker is open, publishes a whole
transaction on one connection, keeps key order, steps aside when busy."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from io import StringIO

import prometheus_client
import pytest
from django.core.management import call_command
from django.db import connection, transaction
from django.db.models.functions import Now
from django.utils import timezone

from reliable_events import pg_listen, publish_event
from reliable_events.models import LaneLease, OutboxMessage
from reliable_events.publishing import lane_for
from reliable_events.relay import HOOK_LEASE_WAIT, dispatcher, publish_after_commit, relay_once
from reliable_events.relay.claims import WAKE_CHANNEL
from tests.support.producer_support import (
    drain_queue,
    free_port,
    message_ids,
    wait_until,
    with_port,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.postgres, pytest.mark.rabbitmq]


def handed_over(reason: str) -> float:
    """Rows this process's on-commit hook left to the relay for ``reason`` (the metric)."""
    value = prometheus_client.REGISTRY.get_sample_value(
        "reliable_events_on_commit_handed_over_total", {"reason": reason}
    )
    return value or 0.0


@pytest.fixture
def via_proxy(broker, amqp_url, tcp_proxy, re_settings):
    re_settings(BROKER_URL=with_port(amqp_url, tcp_proxy.port), ON_COMMIT_GRACE_SECONDS=1.5)
    return tcp_proxy


def test_several_events_of_one_transaction_go_in_order_on_one_connection(
    via_proxy, rabbit, exchange_name
):
    queue = rabbit.bind_queue(exchange_name, "#")
    with transaction.atomic():
        rows = [publish_event("tx.event", {"n": n}, key=f"k{n % 2}") for n in range(6)]
    assert message_ids(drain_queue(rabbit.channel, queue, expect=6)) == [r.message_id for r in rows]
    assert OutboxMessage.objects.sent().count() == 6
    with transaction.atomic():
        again = publish_event("tx.event", {"n": 6})
    assert message_ids(drain_queue(rabbit.channel, queue, expect=1)) == [again.message_id]
    assert via_proxy.accepted == 1  # the per-process connection is reused


def test_publish_outside_a_transaction_goes_at_once(via_proxy, rabbit, exchange_name):
    queue = rabbit.bind_queue(exchange_name, "#")
    row = publish_event("auto.commit", {})  # autocommit: on_commit runs immediately
    assert OutboxMessage.objects.get(pk=row.pk).status == OutboxMessage.Status.SENT
    assert message_ids(drain_queue(rabbit.channel, queue, expect=1)) == [row.message_id]


def test_never_raises_into_the_caller_when_the_broker_is_down(broker, re_settings, caplog):
    re_settings(BROKER_URL=f"amqp://guest:guest@127.0.0.1:{free_port()}//")
    with transaction.atomic():
        row = publish_event("down.event", {"n": 1})
    # no exception: the transaction committed and the row waits for the relay
    stored = OutboxMessage.objects.get(pk=row.pk)
    assert stored.status == OutboxMessage.Status.PENDING
    assert stored.attempts == 0  # the broker failed, not the event: no attempt counted
    assert "cannot connect" in stored.last_error
    assert dispatcher.breaker_open()


def test_the_breaker_skips_the_hook_while_open(via_proxy, rabbit, exchange_name, re_settings):
    queue = rabbit.bind_queue(exchange_name, "#")
    # the breaker's own period on the real clock (not the tests' TIME_SCALE)
    re_settings(ON_COMMIT_BREAKER_SECONDS=1.0, TIME_SCALE=1.0)
    via_proxy.stop()
    with transaction.atomic():
        failed = publish_event("b.one", {})
    assert OutboxMessage.objects.get(pk=failed.pk).attempts == 0  # not the event's fault
    assert dispatcher.breaker_open()

    via_proxy.start()  # the broker is back, but the breaker is still open
    with transaction.atomic():
        skipped = publish_event("b.two", {})
    assert via_proxy.accepted == 0  # no connection was even tried
    stored = OutboxMessage.objects.get(pk=skipped.pk)
    assert (stored.status, stored.attempts) == (OutboxMessage.Status.PENDING, 0)

    assert wait_until(lambda: not dispatcher.breaker_open(), timeout=10)
    with transaction.atomic():
        published = publish_event("b.three", {})
    assert OutboxMessage.objects.get(pk=published.pk).status == OutboxMessage.Status.SENT
    assert message_ids(drain_queue(rabbit.channel, queue, expect=1)) == [published.message_id]
    # the relay sends the two the hook missed
    OutboxMessage.objects.pending().update(next_attempt_at=Now())
    assert relay_once().sent == 2
    assert sorted(message_ids(drain_queue(rabbit.channel, queue, expect=2))) == sorted(
        [failed.message_id, skipped.message_id]
    )


def test_the_hook_respects_key_order_when_an_earlier_row_of_the_key_is_pending(
    broker, rabbit, exchange_name
):
    queue = rabbit.bind_queue(exchange_name, "#")
    with transaction.atomic():
        earlier = publish_event("k.first", {}, key="K", delay=60)  # pending, not due
    with transaction.atomic():
        later = publish_event("k.second", {}, key="K")
        other = publish_event("k.other", {}, key="L")
        keyless = publish_event("k.none", {})
    # the hook publishes what does not have to wait, and leaves `later` behind `earlier`
    assert message_ids(drain_queue(rabbit.channel, queue, expect=2)) == [
        other.message_id,
        keyless.message_id,
    ]
    assert OutboxMessage.objects.get(pk=later.pk).status == OutboxMessage.Status.PENDING
    OutboxMessage.objects.pending().update(next_attempt_at=Now())
    call_command("relay_outbox", "--once", stdout=StringIO())
    assert message_ids(drain_queue(rabbit.channel, queue, expect=2)) == [
        earlier.message_id,
        later.message_id,
    ]


def test_the_hook_steps_aside_when_another_thread_is_publishing(
    broker, rabbit, exchange_name, re_settings
):
    re_settings(ON_COMMIT_CONFIRM_TIMEOUT=0.2)
    queue = rabbit.bind_queue(exchange_name, "#")
    assert dispatcher.lock.acquire()
    try:
        with transaction.atomic():
            row = publish_event("busy.event", {})
    finally:
        dispatcher.lock.release()
    assert OutboxMessage.objects.get(pk=row.pk).status == OutboxMessage.Status.PENDING
    # left for the relay once its reservation ends
    OutboxMessage.objects.update(next_attempt_at=Now())
    assert relay_once().sent == 1
    assert message_ids(drain_queue(rabbit.channel, queue, expect=1)) == [row.message_id]


@pytest.fixture
def relay_wakes() -> Iterator[Callable[[], bool]]:
    """Whether a relay daemon ``LISTEN``ing on its channel was woken (within 2 s) since
    the fixture started: a connection of its own listens the way the daemon does."""
    raw = pg_listen.connect(connection.alias)
    try:
        pg_listen.listen(raw, WAKE_CHANNEL)
        yield lambda: pg_listen.wait(raw, 2.0)
    finally:
        raw.close()


@pytest.mark.parametrize("why", ["breaker open", "publisher busy"])
def test_rows_the_hook_leaves_wake_the_relay_daemon(broker, re_settings, relay_wakes, why):
    """The rows are handed to the relay at once (``NOTIFY``), not left for its next poll
    (``RELAY_IDLE_SECONDS``): a broker blip that trips one process's breaker for
    ``ON_COMMIT_BREAKER_SECONDS`` must not make its events wait for polls meanwhile."""
    re_settings(ON_COMMIT_CONFIRM_TIMEOUT=0.2)
    reason = {"breaker open": "breaker_open", "publisher busy": "publisher_busy"}[why]
    before = handed_over(reason)
    if why == "breaker open":
        dispatcher.trip()
    else:
        assert dispatcher.lock.acquire()
    try:
        row = publish_event("handed.over", {})
    finally:
        if why == "publisher busy":
            dispatcher.lock.release()
    assert OutboxMessage.objects.due().filter(pk=row.pk).exists()
    assert relay_wakes()
    assert handed_over(reason) == before + 1  # counted: a fast path not taken shows


def test_the_hook_follows_a_configuration_change(broker, rabbit, exchange_name, re_settings):
    queue = rabbit.bind_queue(exchange_name, "#")
    with transaction.atomic():
        publish_event("conf.one", {})
    first = dispatcher.publisher
    other_exchange = f"{exchange_name}-2"
    rabbit.exchanges.append(other_exchange)
    other_queue = rabbit.bind_queue(other_exchange, "#")
    re_settings(EXCHANGE=other_exchange)
    with transaction.atomic():
        row = publish_event("conf.two", {})
    assert dispatcher.publisher is not first
    assert len(drain_queue(rabbit.channel, queue, expect=1)) == 1
    assert message_ids(drain_queue(rabbit.channel, other_queue, expect=1)) == [row.message_id]


def test_publish_after_commit_ignores_unknown_sent_and_rolled_back_ids(
    broker, rabbit, exchange_name
):
    queue = rabbit.bind_queue(exchange_name, "#")
    with transaction.atomic():
        row = publish_event("x.y", {})
    before = handed_over("not_claimed")
    assert publish_after_commit([row.pk, 10**12]).claimed == 0  # sent already; unknown
    assert handed_over("not_claimed") == before  # nothing was left to the relay
    with transaction.atomic():
        publish_event("x.rolled", {})
        transaction.set_rollback(True)
    assert message_ids(drain_queue(rabbit.channel, queue, expect=1)) == [row.message_id]
    assert drain_queue(rabbit.channel, queue, expect=1, timeout=0.3) == []


def test_hooks_of_concurrent_threads_each_publish_their_transaction(broker, rabbit, exchange_name):
    queue = rabbit.bind_queue(exchange_name, "#")
    ids: list[str] = []

    def work(n: int) -> None:
        try:
            for m in range(10):
                with transaction.atomic():
                    ids.append(publish_event("t.x", {"n": n, "m": m}, key=f"t{n}").message_id)
        finally:
            connection.close()

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    # some hooks may step aside (another thread held the connection): the relay sends those
    OutboxMessage.objects.pending().update(next_attempt_at=Now())
    relay_once()
    assert sorted(message_ids(drain_queue(rabbit.channel, queue, expect=40))) == sorted(ids)


def _lease_lane_of(key: str) -> LaneLease:
    """A lease another (live) relay holds, for an hour, on the lane of ``key``."""
    lane = lane_for(key, "")
    LaneLease.objects.update_or_create(
        lane=lane,
        defaults={"owner": "other-relay", "expires_at": timezone.now() + timedelta(hours=1)},
    )
    return LaneLease.objects.get(lane=lane)


def test_the_hook_waits_for_a_relay_that_gives_its_lane_back(
    broker, rabbit, exchange_name, re_settings
):
    """A relay gives its lanes back once it caught up: the hook of a row committed during
    its run publishes the row itself, instead of leaving it to the relay's next run (a
    relay slower than the commits would keep every lane)."""
    queue = rabbit.bind_queue(exchange_name, "#")
    re_settings(PUBLISH_ON_COMMIT=False)  # the hook is called below, its report kept
    with transaction.atomic():
        row = publish_event("waited.event", {}, key="waited")
    lease = _lease_lane_of("waited")

    connected = threading.Event()

    def give_back() -> None:
        connection.ensure_connection()  # not part of the relay's time
        connected.set()
        time.sleep(HOOK_LEASE_WAIT / 4)
        LaneLease.objects.filter(pk=lease.pk).update(owner="", expires_at=timezone.now())
        connection.close()

    relay = threading.Thread(target=give_back)
    relay.start()
    try:
        assert connected.wait(30)
        report = publish_after_commit([row.pk])
    finally:
        relay.join()
    assert (report.claimed, report.sent) == (1, 1)
    assert OutboxMessage.objects.get(pk=row.pk).status == OutboxMessage.Status.SENT
    assert message_ids(drain_queue(rabbit.channel, queue, expect=1)) == [row.message_id]
    assert dispatcher.relays_busy_until == 0.0


def test_the_hook_leaves_a_lane_a_relay_keeps_and_then_stops_waiting_for_it(
    broker, rabbit, exchange_name, relay_wakes
):
    """A relay draining a backlog keeps its lanes: after one wait of ``HOOK_LEASE_WAIT``
    the row goes to it (woken), and this process's next hooks leave leased lanes to it
    without waiting, for ``HOOK_LEASE_PAUSE``."""
    lease = _lease_lane_of("kept")
    before = handed_over("not_claimed")
    with transaction.atomic():
        first = publish_event("kept.event", {}, key="kept")
    assert OutboxMessage.objects.due().filter(pk=first.pk).exists()
    assert relay_wakes()
    paused_until = dispatcher.relays_busy_until
    assert paused_until > time.monotonic()
    with transaction.atomic():
        second = publish_event("kept.event", {}, key="kept")
    assert dispatcher.relays_busy_until == paused_until  # no second wait ran out
    assert OutboxMessage.objects.due().filter(pk=second.pk).exists()
    assert handed_over("not_claimed") == before + 2
    LaneLease.objects.filter(pk=lease.pk).update(owner="", expires_at=timezone.now())
    assert relay_once().sent == 2
