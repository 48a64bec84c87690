"""A consumer removed from the code, on the real RabbitMQ: its queues stay bound and fill
up; liveness says so, ``purge_outbox`` keeps the heartbeat that says so, and
``forget_consumer`` deletes them (refusing while they hold messages, unless forced)."""

from __future__ import annotations

import logging
from datetime import timedelta
from io import StringIO
from typing import Any

import amqp
import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from reliable_events.consumer import EventConsumer
from reliable_events.consumer.partitions import hash_exchange, partition_queues
from reliable_events.consuming import Worker
from reliable_events.heartbeats import purge_heartbeats
from reliable_events.liveness import liveness
from reliable_events.models import Heartbeat
from reliable_events.publishing import publish_event
from reliable_events.topology import declare_on_amqp_channel, full_topology
from tests.support.consumer_support import make_consumer, queue_names

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.rabbitmq, pytest.mark.postgres]


def exists(rabbit: Any, queue: str) -> bool:
    channel = rabbit.connection.channel()
    try:
        channel.queue_declare(queue, passive=True)
    except amqp.exceptions.NotFound:
        return False
    channel.close()
    return True


def exchange_exists(rabbit: Any, exchange: str) -> bool:
    channel = rabbit.connection.channel()
    try:
        channel.exchange_declare(exchange, "headers", passive=True)
    except amqp.exceptions.NotFound:
        return False
    channel.close()
    return True


def ran_then_removed(
    clean_registry: Any, rabbit: Any, *, ordered: bool = False
) -> type[EventConsumer]:
    """A consumer that ran once here (its heartbeat records its topology), then was taken
    out of the code."""
    consumer = make_consumer(clean_registry, max_retries=2, retry_delays=[60, 120])
    if ordered:
        consumer.ordered = True
        consumer.partitions = 4
        rabbit.queues.extend(partition_queues(consumer))
        rabbit.exchanges.append(hash_exchange(consumer))
    else:
        rabbit.queues.extend(queue_names(consumer))
    topology = full_topology(consumer.queue_specs(), consumer.exchange_specs())
    declare_on_amqp_channel(rabbit.channel, topology)
    Worker([consumer]).run(until_idle=0.3)
    clean_registry.unregister(consumer.name)
    return consumer


def publish_some(count: int) -> None:
    for n in range(count):
        publish_event("orders.created", {"n": n}, key=f"k{n % 3}")


@pytest.mark.parametrize("ordered", [False, True], ids=["plain", "ordered"])
def test_a_removed_consumer_s_queues_fill_up_show_and_are_forgotten(
    clean_registry, broker, rabbit, re_settings, ordered
):
    re_settings(METRICS_CACHE_SECONDS=0)
    consumer = ran_then_removed(clean_registry, rabbit, ordered=ordered)
    queues = partition_queues(consumer) if ordered else queue_names(consumer)
    publish_some(6)  # still routed to it: its queues are bound

    state = liveness().consumer(consumer.name)
    assert state is not None
    assert (state.retired, state.processes, state.messages) == (True, 0, 6)
    assert state.problem.startswith("not in the code any more, but its queues are still bound")
    assert f"`manage.py forget_consumer {consumer.name}` deletes them" in state.problem
    status = StringIO()
    call_command("outbox_status", stdout=status)
    assert f"consumer {consumer.name}: not in the code any more" in status.getvalue()

    with pytest.raises(CommandError, match="hold 6 message\\(s\\) that no consumer will apply"):
        call_command("forget_consumer", consumer.name, stdout=StringIO())
    dry = StringIO()
    call_command("forget_consumer", consumer.name, "--dry-run", stdout=dry)
    assert "dry run: nothing deleted" in dry.getvalue()
    assert all(exists(rabbit, queue) for queue in queues)

    out = StringIO()
    call_command("forget_consumer", consumer.name, "--force", stdout=out)
    assert "queue(s) with 6 message(s)" in out.getvalue()
    assert not any(exists(rabbit, queue) for queue in queues)
    if ordered:
        assert not exchange_exists(rabbit, hash_exchange(consumer))
        assert f"deleted exchange {hash_exchange(consumer)}" in out.getvalue()
    assert liveness().consumer(consumer.name) is None
    assert not Heartbeat.objects.filter(consumers__contains=[consumer.name]).exists()
    publish_some(2)  # now unrouted for it: nothing fills up


def test_forget_consumer_refuses_a_registered_a_running_and_an_unknown_one(
    clean_registry, broker, rabbit
):
    consumer = make_consumer(clean_registry)
    with pytest.raises(CommandError, match="is a consumer of this code"):
        call_command("forget_consumer", consumer.name)
    worker = Worker([consumer])
    worker.heartbeat.tick()  # a live process runs it
    clean_registry.unregister(consumer.name)
    with pytest.raises(CommandError, match="1 live process\\(es\\) still run"):
        call_command("forget_consumer", consumer.name)
    with pytest.raises(CommandError, match=r"no heartbeat names 'nobody\.ever'"):
        call_command("forget_consumer", "nobody.ever")
    worker.heartbeat.stop()


def test_purge_keeps_the_heartbeat_of_a_removed_consumer_while_its_queues_are_there(
    clean_registry, broker, rabbit, re_settings, caplog
):
    re_settings(METRICS_CACHE_SECONDS=0)
    consumer = ran_then_removed(clean_registry, rabbit)
    kept = make_consumer(clean_registry)  # still in the code
    Worker([kept]).run(until_idle=0.1)
    Heartbeat.objects.update(last_seen=timezone.now() - timedelta(days=3))
    publish_some(2)

    with caplog.at_level(logging.WARNING, logger="reliable_events.liveness"):
        assert purge_heartbeats() == 1  # the other consumer's
    (row,) = Heartbeat.objects.all()
    assert row.consumers == [consumer.name]
    assert f"consumer {consumer.name} is not in the code any more" in caplog.text
    assert "with 2 message(s)" in caplog.text
    state = liveness().consumer(consumer.name)
    assert state is not None
    assert state.messages == 2

    call_command("forget_consumer", consumer.name, "--force", stdout=StringIO())
    assert not Heartbeat.objects.exists()
