"""Batches with a savepoint per handler, on the real RabbitMQ and PostgreSQL.

Shipped defaults (``CONSUMER_BATCH_SIZE`` 100, prefetch twice that); only the linger is
raised so that the first batch deterministically holds all 100 queued messages on a
loaded machine.  Effects are ``Order`` rows without a unique constraint: a handler
applied twice would show as 2; ``consumer.calls`` counts every handler call.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import amqp
import pytest

from reliable_events.consumer import Event, EventConsumer
from reliable_events.consuming import RETRIES_EXHAUSTED, Worker
from reliable_events.models import DeadLetter, ProcessedMessage
from reliable_events.topology import declare_on_amqp_channel, full_topology
from tests.support.consumer_support import applied, make_consumer, queue_names

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.rabbitmq, pytest.mark.postgres]

#: Failing attempts per message id: m-10 fails once, m-50 twice, m-90 always.
FAILURES = {"m-10": 1, "m-50": 2, "m-90": 99}


def publish(rabbit: Any, exchange: str, message_ids: list[str]) -> None:
    for message_id in message_ids:
        rabbit.channel.basic_publish(
            amqp.Message(
                b'{"n": 1}',
                content_type="application/json",
                delivery_mode=2,
                message_id=message_id,
                type="orders.created",
            ),
            exchange=exchange,
            routing_key="orders.created",
        )


def spy_batches(consumer: type[EventConsumer]) -> list[list[str]]:
    """The message ids of every batch handed to ``consumer.process_batch``."""
    batches: list[list[str]] = []
    process_batch = consumer.process_batch

    def spy(self: EventConsumer, events: Any, **kwargs: Any) -> Any:
        batches.append([event.id for event in events])
        return process_batch(self, events, **kwargs)

    consumer.process_batch = spy  # type: ignore[method-assign]
    return batches


@pytest.fixture(params=["classic", "quorum"])
def queue_type(request: Any, re_settings: Any) -> str:
    re_settings(QUEUE_TYPE=request.param, CONSUMER_BATCH_LINGER=0.5)
    return str(request.param)


def test_a_failing_handler_rolls_back_alone_and_nobody_runs_twice(
    clean_registry, broker, rabbit, exchange_name, queue_type
):
    def fail_some(consumer: EventConsumer, event: Event) -> None:
        if event.attempt <= FAILURES.get(event.id, 0):
            raise RuntimeError(f"{event.id} fails on attempt {event.attempt}")

    consumer = make_consumer(clean_registry, behaviour=fail_some, retry_delays=[0.1])
    rabbit.queues.extend(queue_names(consumer))
    declare_on_amqp_channel(rabbit.channel, full_topology(consumer.queue_specs()))
    batches = spy_batches(consumer)
    ids = [f"m-{n}" for n in range(100)]
    publish(rabbit, exchange_name, ids)

    stats = Worker([consumer]).run(until_idle=2.0)

    assert batches[0] == ids  # one batch of 100, the three failures inside it
    # (BATCH_MAX_SECONDS may carry its tail over to a second transaction on a slow machine)
    calls = Counter(event.id for event in consumer.calls)
    ok = [message_id for message_id in ids if message_id not in FAILURES]
    assert len(ok) == 97
    assert {message_id: calls[message_id] for message_id in ok} == dict.fromkeys(ok, 1)
    assert {message_id: applied(consumer, message_id) for message_id in ok} == dict.fromkeys(ok, 1)
    # the failing ones were retried alone: one call per attempt, rolled back each time
    assert {message_id: calls[message_id] for message_id in FAILURES} == {
        "m-10": 2,
        "m-50": 3,
        "m-90": 3,  # max_retries 2: three attempts, then the dead letter
    }
    assert {message_id: applied(consumer, message_id) for message_id in FAILURES} == {
        "m-10": 1,
        "m-50": 1,
        "m-90": 0,
    }
    [letter] = DeadLetter.objects.filter(consumer=consumer.name)
    assert (letter.message_id, letter.reason, letter.attempts) == ("m-90", RETRIES_EXHAUSTED, 3)
    assert not ProcessedMessage.objects.filter(consumer=consumer.name, message_id="m-90").exists()
    assert ProcessedMessage.objects.filter(consumer=consumer.name).count() == 99
    assert (stats.processed, stats.retried, stats.dead_lettered) == (99, 5, 1)
    assert all(rabbit.count(queue) == 0 for queue in queue_names(consumer))  # all acked


def test_duplicates_inside_one_batch_apply_once(
    clean_registry, broker, rabbit, exchange_name, re_settings
):
    re_settings(CONSUMER_BATCH_LINGER=0.5)
    consumer = make_consumer(clean_registry)
    rabbit.queues.extend(queue_names(consumer))
    declare_on_amqp_channel(rabbit.channel, full_topology(consumer.queue_specs()))
    batches = spy_batches(consumer)
    ids = [f"m-{n % 40}" for n in range(60)]  # 40 ids, 20 of them twice
    publish(rabbit, exchange_name, ids)

    stats = Worker([consumer]).run(until_idle=1.0)

    # One batch of 60, copies met in it (BATCH_MAX_SECONDS may carry its tail over to a
    # second transaction on a slow machine: the tail is handed in again, after the head).
    assert batches[0] == ids
    assert len(set(batches[0])) < len(batches[0])
    assert Counter(event.id for event in consumer.calls) == Counter(dict.fromkeys(set(ids), 1))
    assert applied(consumer) == 40
    assert (stats.processed, stats.duplicates) == (40, 20)
    assert rabbit.count(consumer.queue_name()) == 0
