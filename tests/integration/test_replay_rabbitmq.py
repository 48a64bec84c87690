"""The events a consumer's queue lost when it was deleted under a running system, given
back by ``replay_events`` on the real RabbitMQ: each applied exactly once."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command

from reliable_events import publish_event
from reliable_events.consuming import Worker
from reliable_events.liveness import liveness
from reliable_events.relay import relay_once
from reliable_events.topology import declare_on_amqp_channel, full_topology
from tests.support.consumer_support import applied, make_consumer, queue_names

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.rabbitmq, pytest.mark.postgres]


def test_the_events_a_deleted_queue_held_are_replayed_and_applied_once(
    clean_registry, broker, rabbit, re_settings
):
    re_settings(PUBLISH_ON_COMMIT=False)
    consumer = make_consumer(clean_registry)
    rabbit.queues.extend(queue_names(consumer))
    declare_on_amqp_channel(rabbit.channel, full_topology(consumer.queue_specs()))
    first = [publish_event("orders.created", {"n": n}).message_id for n in range(3)]
    relay_once()
    Worker([consumer]).run(until_idle=0.5)
    lost = [publish_event("orders.created", {"n": n}).message_id for n in range(3, 8)]
    relay_once()
    assert rabbit.count(consumer.name) == 5
    before = liveness().consumer(consumer.name)
    assert before is not None
    assert before.recreated == {}  # declared before it ran: not lost
    rabbit.channel.queue_delete(consumer.name)  # with its 5 messages

    Worker([consumer]).run(until_idle=0.5)  # declares the queue again: empty
    assert [applied(consumer, i) for i in first + lost] == [1] * 3 + [0] * 5
    # Its earlier heartbeat recorded the queue: shown as deleted, not as a first start.
    state = liveness().consumer(consumer.name)
    assert state is not None
    assert list(state.recreated) == [consumer.name]
    assert f"{consumer.name} was deleted and declared again" in state.warning
    assert f"`manage.py replay_events {consumer.name} --since" in state.warning
    text = StringIO()
    call_command("outbox_status", "--skip-broker", stdout=text)
    assert "was deleted and declared again" in text.getvalue()

    out = StringIO()
    call_command("replay_events", consumer.name, "--since", "1h", stdout=out)
    assert f"re-delivering 8 event(s) to {consumer.name}" in out.getvalue()
    relay_once()
    stats = Worker([consumer]).run(until_idle=0.5)
    assert (stats.processed, stats.duplicates) == (5, 3)
    assert [applied(consumer, i) for i in first + lost] == [1] * 8


def test_a_first_start_declares_its_queues_without_calling_them_lost(
    clean_registry, broker, rabbit
):
    consumer = make_consumer(clean_registry)
    rabbit.queues.extend(queue_names(consumer))
    Worker([consumer]).run(until_idle=0.3)  # nothing declared before: a first deployment
    state = liveness().consumer(consumer.name)
    assert state is not None
    assert (state.recreated, state.warning) == ({}, "")
