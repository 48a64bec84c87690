"""A deleted events exchange heals without a restart, and what it diverted is visible
and re-published (issue 8, item 5).

Against the real PostgreSQL and RabbitMQ, with this test's own exchange (the ``broker``
fixture); only that exchange is ever deleted.  ``TOPOLOGY_CHECK_SECONDS`` is the
documented check interval, shortened so the test is quick; nothing else is tuned.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connections

from reliable_events import publish_event
from reliable_events.consumer import Event, EventConsumer
from reliable_events.consumer.partitions import hash_exchange, partition_queues
from reliable_events.consuming import Worker
from reliable_events.liveness import liveness
from reliable_events.models import OutboxMessage
from reliable_events.overview import overview
from reliable_events.relay import Relay, relay_once
from reliable_events.topology import (
    declare_on_amqp_channel,
    events_topology,
    full_topology,
    unrouted_name,
)
from reliable_events.topology_check import TopologyCheck
from reliable_events.unrouted import clear_cache, count_unrouted, sample_topics
from tests.support.consumer_support import applied, make_consumer, queue_names, running
from tests.support.producer_support import wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.rabbitmq, pytest.mark.postgres]

#: The check interval of this test (the shipped default is 30 s).
CHECK_SECONDS = 1.0


@pytest.fixture
def relay_loop() -> Iterator[None]:
    """A relay running next to the test, as deployed (publishes what the hook missed)."""
    stop = threading.Event()

    def loop() -> None:
        try:
            while not stop.is_set():
                relay_once()
                stop.wait(0.2)
        finally:
            connections.close_all()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(30)
    assert not thread.is_alive()


def publish(topic: str, n: int = 1) -> list[str]:
    return [publish_event(topic, {"n": i}).message_id for i in range(n)]


def all_sent(ids: list[str]) -> Callable[[], bool]:
    def check() -> bool:
        return OutboxMessage.objects.sent().filter(message_id__in=ids).count() == len(ids)

    return check


def test_a_deleted_exchange_heals_and_what_it_diverted_is_shown_and_republished(
    broker, rabbit, exchange_name, clean_registry, re_settings, relay_loop, caplog, report_figures
):
    re_settings(TOPOLOGY_CHECK_SECONDS=CHECK_SECONDS)
    caplog.set_level(logging.WARNING, logger="reliable_events")
    gate = threading.Event()

    def hold_on_request(consumer: EventConsumer, event: Event) -> None:
        if event.payload.get("hold"):
            assert gate.wait(60), "the test never opened the gate"

    consumer = make_consumer(clean_registry, topics=["orders.*"], behaviour=hold_on_request)
    # Registered here but not running: its queue exists (declare_topology) and must be
    # bound again by the running worker's check.
    idle = make_consumer(clean_registry, topics=["invoices.*"])
    rabbit.queues.extend(queue_names(consumer) + queue_names(idle))
    call_command("declare_topology", stdout=StringIO())
    unrouted = unrouted_name()
    worker = Worker([consumer])

    with running(worker) as box:
        before = publish("orders.created", 10)
        assert wait_until(lambda: applied(consumer) == 10, timeout=30), box

        # 1. The worker is inside a handler (so it cannot check) while the exchange is
        # deleted and re-declared the way a publisher's reconnect re-declares it: the
        # bindings are gone, and what is published now is diverted.
        blocker = publish_event("orders.created", {"hold": True}).message_id
        assert wait_until(lambda: any(e.id == blocker for e in consumer.calls), timeout=30)
        rabbit.channel.exchange_delete(exchange_name)
        declare_on_amqp_channel(rabbit.channel, events_topology())
        diverted = publish("orders.created", 20)
        diverted_invoices = publish("invoices.created", 3)
        assert wait_until(all_sent(diverted + diverted_invoices), timeout=30)
        assert rabbit.count(unrouted) == 23  # confirmed, "sent", and in no consumer's queue

        # 2. Visible: the overview and outbox_status count them; the flag exits 5.
        clear_cache()
        page = overview()
        assert page.unrouted is not None
        assert page.unrouted.count == 23
        out = StringIO()
        call_command("outbox_status", "--json", stdout=out)
        assert json.loads(out.getvalue())["unrouted"] == 23
        with pytest.raises(CommandError, match="23 event") as info:
            call_command("outbox_status", "--fail-on-unrouted", stdout=StringIO())
        assert info.value.returncode == 5

        # 3. No restart: the worker's next check binds the queues again (also the idle
        # consumer's) and a warning names the topic and the consumer.
        gate.set()
        assert wait_until(lambda: bool(_heal_warnings(caplog, consumer.name)), timeout=30)
        after = publish("orders.created", 10)
        after_invoices = publish("invoices.created", 2)
        assert wait_until(lambda: all(applied(consumer, i) == 1 for i in after), timeout=30)
        assert wait_until(lambda: rabbit.count(idle.queue_name()) == 2, timeout=10)

        # 4. While idle, only the periodic check runs: delete the exchange again and keep
        # publishing; events reach the consumer again within a few check intervals.
        rabbit.channel.exchange_delete(exchange_name)
        declare_on_amqp_channel(rabbit.channel, events_topology())
        deleted_at = time.monotonic()
        window: list[str] = []
        while not window or not applied(consumer, window[-1]):
            window += publish("orders.created")
            assert time.monotonic() - deleted_at < 10 * CHECK_SECONDS + 10, "never healed"
            time.sleep(0.1)
        healed_in = time.monotonic() - deleted_at
        report_figures(
            f"topology heal: events reached the consumer again {healed_in:.1f}s after the "
            f"exchange was deleted (TOPOLOGY_CHECK_SECONDS={CHECK_SECONDS}); "
            f"{len(window)} published meanwhile"
        )

        # 5. Re-published with confirms: every diverted event reaches its queue.
        left = rabbit.count(unrouted)
        assert left >= 23
        out = StringIO()
        call_command("republish_unrouted", "--dry-run", stdout=out)
        assert "(dry run: nothing moved)" in out.getvalue()
        assert rabbit.count(unrouted) == left
        out = StringIO()
        call_command("republish_unrouted", stdout=out)
        text = out.getvalue()
        assert re.search(r"(\d+) of \1 event\(s\) re-published", text), text
        orders = [*before, blocker, *diverted, *after, *window]
        assert wait_until(lambda: all(applied(consumer, i) == 1 for i in orders), timeout=30)
        assert count_unrouted().count == 0
        call_command("outbox_status", "--fail-on-unrouted", stdout=StringIO())  # exit 0 now

    assert "error" not in box, box
    assert box["stats"].reconnects == 0  # healed by the check, not by a reconnect
    # Every id, exactly once in effect (a duplicate would show as a second Order row).
    assert [i for i in orders if applied(consumer, i) != 1] == []
    assert applied(consumer) == len(orders)
    invoices = rabbit.get_all(idle.queue_name(), expect=5, timeout=10)
    got = sorted(str(m.properties["message_id"]) for m in invoices)
    assert got == sorted(diverted_invoices + after_invoices)
    assert rabbit.count(unrouted) == 0


def _heal_warnings(caplog: Any, consumer: str) -> list[str]:
    texts = [r.getMessage() for r in list(caplog.records) if r.levelno >= logging.WARNING]
    return [
        t for t in texts if "orders.created" in t and consumer in t and "republish_unrouted" in t
    ]


def test_the_relay_re_declares_an_exchange_deleted_under_it(
    broker, rabbit, exchange_name, re_settings, caplog
):
    """A publish to a deleted exchange is a channel error (404); the next publish
    reconnects and declares the exchange again, so nothing waits for a restart."""
    re_settings(PUBLISH_ON_COMMIT=False)  # only the relay publishes here
    queue = rabbit.bind_queue(exchange_name, "orders.#")
    relay = Relay()  # one connection kept across the deletion, as the relay daemon keeps it
    try:
        first = publish("orders.created")
        relay.drain()
        assert rabbit.get_all(queue, expect=1)
        rabbit.channel.exchange_delete(exchange_name)
        ids = publish("orders.created", 5)
        deadline = time.monotonic() + 30
        while not all_sent(ids)() and time.monotonic() < deadline:
            relay.drain()
            time.sleep(0.1)
    finally:
        relay.close()
    assert all_sent(first + ids)()
    # The deletion was met (a 404 on the kept connection), not missed by a fresh connect.
    assert any("NOT_FOUND" in r.getMessage() for r in caplog.records), caplog.text
    rabbit.channel.exchange_declare(exchange_name, "topic", passive=True)  # it exists again
    # Its bindings did not come back with it: the events were kept, not dropped.
    kept = rabbit.get_all(unrouted_name(), expect=5, timeout=10)
    assert sorted(str(m.properties["message_id"]) for m in kept) == sorted(ids)


def test_a_running_consumer_names_what_was_missing_and_declares_it_again(
    broker, rabbit, amqp_url, exchange_name, clean_registry, re_settings, caplog
):
    re_settings(TOPOLOGY_CHECK_SECONDS=CHECK_SECONDS)
    caplog.set_level(logging.WARNING, logger="reliable_events")
    consumer = make_consumer(clean_registry, topics=["orders.*"], retry_delays=[5])
    rabbit.queues.extend(queue_names(consumer))
    worker = Worker([consumer])
    with running(worker) as box:
        assert wait_until(lambda: _queue_exists(amqp_url, consumer.retry_queue_name(1)), timeout=30)
        rabbit.channel.exchange_delete(exchange_name)
        rabbit.channel.queue_delete(consumer.retry_queue_name(1))

        def warned() -> bool:
            texts = [r.getMessage() for r in list(caplog.records) if "topology check" in r.msg]
            return any(
                f"exchange {exchange_name!r}" in t
                and repr(consumer.retry_queue_name(1)) in t
                and "`manage.py replay_events <consumer> --since <when it was deleted>`" in t
                for t in texts
            )

        assert wait_until(warned, timeout=10 * CHECK_SECONDS + 10)
        assert _queue_exists(amqp_url, consumer.retry_queue_name(1))

        def shown() -> bool:  # the retries it held are lost: liveness says so
            state = liveness().consumer(consumer.name)
            return state is not None and consumer.retry_queue_name(1) in state.recreated

        assert wait_until(shown, timeout=10)
        ids = publish("orders.created", 5)
        assert wait_until(lambda: all(applied(consumer, i) == 1 for i in ids), timeout=30)
    assert "error" not in box, box
    assert box["stats"].reconnects == 0
    assert rabbit.count(unrouted_name()) == 0


def test_declare_topology_binds_the_queues_of_consumers_that_are_not_running(
    broker, rabbit, exchange_name, clean_registry
):
    idle = make_consumer(clean_registry, topics=["invoices.*"])
    rabbit.queues.extend(queue_names(idle))
    call_command("declare_topology", stdout=StringIO())
    rabbit.channel.exchange_delete(exchange_name)
    declare_on_amqp_channel(rabbit.channel, events_topology())  # as a publisher would
    call_command("declare_topology", stdout=StringIO())
    ids = publish("invoices.created", 3)
    assert wait_until(all_sent(ids), timeout=30)
    got = rabbit.get_all(idle.queue_name(), expect=3, timeout=10)
    assert sorted(str(m.properties["message_id"]) for m in got) == sorted(ids)
    assert rabbit.count(unrouted_name()) == 0


def _queue_exists(url: str, name: str) -> bool:
    from kombu import Connection

    with Connection(url) as conn:
        channel: Any = conn.default_channel
        try:
            channel.queue_declare(name, passive=True)
        except Exception:  # NOT_FOUND closes that channel; this connection is thrown away
            return False
    return True


def _relay_unrouted(count: int) -> None:
    """``count`` events of a topic nobody subscribes to, published by a relay."""
    for n in range(count):
        publish_event("nobody.listens", {"n": n})
    relay = Relay()
    try:
        assert relay.drain().sent == count
    finally:
        relay.close()


def test_republish_exits_5_when_the_events_still_have_no_queue(broker, rabbit, re_settings):
    """Nothing is bound for the topic yet: re-published, the events come straight back
    to the unrouted queue; the command says so and exits 5 (none is lost)."""
    re_settings(PUBLISH_ON_COMMIT=False)
    _relay_unrouted(3)
    unrouted = unrouted_name()
    rabbit.queues.append(unrouted)
    assert wait_until(lambda: rabbit.count(unrouted) == 3, timeout=10)
    with pytest.raises(CommandError, match="'0' is not a positive count") as info:
        call_command("republish_unrouted", "--limit", "0", stdout=StringIO())
    assert info.value.returncode == 1
    with pytest.raises(CommandError) as info:
        call_command("republish_unrouted", stdout=StringIO())
    assert info.value.returncode == 5
    assert f"3 event(s) are still in {unrouted!r}: no queue is bound" in str(info.value)
    assert rabbit.count(unrouted) == 3


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_sampling_the_unrouted_queue_keeps_its_order_on_a_classic_queue(
    broker, rabbit, re_settings, queue_type
):
    """The check's sample puts a classic queue's messages back in place, so
    ``republish_unrouted`` sends them in the order they came; on a quorum queue (where a
    requeue counts as a delivery) it moves them to the tail."""
    re_settings(PUBLISH_ON_COMMIT=False, QUEUE_TYPE=queue_type)
    unrouted = unrouted_name()
    rabbit.queues.append(unrouted)
    declare_on_amqp_channel(rabbit.channel, events_topology())
    for n in range(50):
        publish_event("nobody.listens", {"n": n})
    relay = Relay()
    try:
        assert relay.drain().sent == 50
    finally:
        relay.close()
    for _ in range(3):
        channel = rabbit.connection.channel()
        assert sample_topics(channel, limit=20) == {"nobody.listens": 20}
        channel.close()
    order = [json.loads(message.body)["n"] for message in rabbit.get_all(unrouted, expect=50)]
    if queue_type == "classic":
        assert order == list(range(50))
    else:  # three samples of 20 moved to the tail: rotated by 60 mod 50
        assert order == list(range(10, 50)) + list(range(10))


def test_a_check_binds_an_idle_ordered_consumer_never_creates_a_queue_and_samples_once(
    broker, rabbit, amqp_url, exchange_name, clean_registry, re_settings, caplog
):
    """The check of a worker running one consumer: another, ordered, registered consumer
    gets its hash exchange bound again; a registered consumer whose queue was never
    declared is left alone (``declare_topology`` creates queues, not the check).  Unrouted
    events nobody here subscribes to are named in a warning, and a second check at the
    same depth reuses the sample instead of moving the messages again."""
    re_settings(PUBLISH_ON_COMMIT=False)
    caplog.set_level(logging.WARNING, logger="reliable_events")
    mine = make_consumer(clean_registry, topics=["orders.*"])
    ordered = make_consumer(clean_registry, topics=["payments.*"])
    ordered.ordered = True
    ordered.partitions = 2
    never = make_consumer(clean_registry, topics=["refunds.*"])
    rabbit.queues.extend([*queue_names(mine), *partition_queues(ordered)])
    rabbit.exchanges.append(hash_exchange(ordered))
    declare_on_amqp_channel(
        rabbit.channel, full_topology(ordered.queue_specs(), ordered.exchange_specs())
    )
    # The events exchange deleted and re-declared: every binding to it is gone.
    rabbit.channel.exchange_delete(exchange_name)
    declare_on_amqp_channel(rabbit.channel, events_topology())
    _relay_unrouted(3)
    assert wait_until(lambda: rabbit.count(unrouted_name()) == 3, timeout=10)

    check = TopologyCheck([mine])
    result = check.run(rabbit.connection)
    assert sorted(result.missing) == sorted(f"queue {name!r}" for name in queue_names(mine))
    assert result.rebound == [hash_exchange(ordered)]
    assert not _queue_exists(amqp_url, never.queue_name())
    assert result.unrouted == 3
    assert result.topics == {"nobody.listens": 3}
    assert result.ours == {}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "no queue was bound for their topic" in t and "nobody.listens" in t for t in warnings
    )

    again = check.run(rabbit.connection)
    assert again.missing == []
    assert again.topics is result.topics  # the same depth: not sampled again
    assert rabbit.count(unrouted_name()) == 3  # sampling moves messages, never drops them

    publish("payments.created", 4)
    relay = Relay()
    try:
        assert relay.drain().sent == 4
    finally:
        relay.close()
    partitions = partition_queues(ordered)
    assert wait_until(
        lambda: sum(rabbit.count(name) for name in partitions) == 4, timeout=10
    )  # through the hash exchange bound again by the first check
    assert rabbit.count(unrouted_name()) == 3
