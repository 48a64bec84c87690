"""The consume loop against the real RabbitMQ and PostgreSQL, in this process.

Messages are published with a plain AMQP client (not through the app), and every test
counts effects as rows without a unique constraint (``tests.support.consumer_support``), so a
double application would show as 2.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
import time
from io import StringIO
from typing import Any

import amqp
import pytest
from django.core.management import call_command
from django.db import OperationalError, connection, connections

from reliable_events.consumer import QUORUM_DELIVERY_LIMIT, Event, EventConsumer
from reliable_events.consuming import (
    ATTEMPT_HEADER,
    BAD_ATTEMPT_HEADER,
    NO_MESSAGE_ID,
    NOT_JSON,
    PERMANENT_ERROR,
    RETRIES_EXHAUSTED,
    TOO_LARGE,
    WRONG_CONTENT_TYPE,
    Worker,
)
from reliable_events.exceptions import PermanentError
from reliable_events.liveness import liveness
from reliable_events.models import DeadLetter, OutboxMessage, ProcessedMessage
from reliable_events.topology import declare_on_amqp_channel, full_topology
from tests.support.consumer_support import applied, make_consumer, queue_names, run_worker_thread
from tests.support.producer_support import free_port
from tests.support.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.rabbitmq, pytest.mark.postgres]


@pytest.fixture
def amqp_consumer(clean_registry, broker, rabbit):
    """Make a consumer, declare its topology on the broker, delete its queues after."""

    def make(**kwargs: Any) -> type[EventConsumer]:
        consumer = make_consumer(clean_registry, **kwargs)
        rabbit.queues.extend(queue_names(consumer))
        declare_on_amqp_channel(rabbit.channel, full_topology(consumer.queue_specs()))
        return consumer

    return make


def send(
    rabbit: Any,
    exchange: str,
    body: bytes = b'{"n": 1}',
    *,
    message_id: str | None = "m-1",
    topic: str = "orders.created",
    routing_key: str | None = None,
    **properties: Any,
) -> None:
    props: dict[str, Any] = {
        "content_type": "application/json",
        "content_encoding": "utf-8",
        "delivery_mode": 2,
        "type": topic,
        **properties,
    }
    if message_id is not None:
        props["message_id"] = message_id
    props = {k: v for k, v in props.items() if v is not None}
    rabbit.channel.basic_publish(
        amqp.Message(body, **props), exchange=exchange, routing_key=routing_key or topic
    )


def always_fail(consumer: EventConsumer, event: Event) -> None:
    raise RuntimeError(f"boom {event.attempt}")


# -- retries waiting, as liveness counts them ------------------------------------------------
def test_retries_waiting_in_the_delay_queues_are_counted_beside_the_queue(
    amqp_consumer, rabbit, exchange_name, re_settings
):
    re_settings(METRICS_CACHE_SECONDS=0)
    consumer = amqp_consumer(max_retries=3, retry_delays=[60, 120], behaviour=always_fail)
    state = liveness().consumer(consumer.name)
    assert state is not None
    assert (state.messages, state.retrying) == (0, 0)
    for n in range(4):
        send(rabbit, exchange_name, message_id=f"m-{n}")
    rabbit.channel.basic_publish(
        amqp.Message(b'{"n": 9}', message_id="m-9", content_type="application/json"),
        exchange="",
        routing_key=consumer.retry_queue_name(2),
    )

    stats = Worker([consumer]).run(until_idle=1.0, max_messages=4)

    assert stats.retried == 4
    assert (
        rabbit.count(consumer.retry_queue_name(1)),
        rabbit.count(consumer.retry_queue_name(2)),
    ) == (4, 1)
    state = liveness().consumer(consumer.name)
    assert state is not None
    assert (state.messages, state.retrying, state.queue_error) == (0, 5, "")

    rabbit.channel.queue_delete(consumer.retry_queue_name(2))
    state = liveness().consumer(consumer.name)
    assert state is not None
    assert (state.messages, state.retrying) == (0, None)
    assert "NOT_FOUND" in state.queue_error or "404" in state.queue_error, state.queue_error


# -- idempotency -------------------------------------------------------------------------
def test_the_same_message_id_delivered_twice_is_applied_once(amqp_consumer, rabbit, exchange_name):
    consumer = amqp_consumer()
    send(rabbit, exchange_name, message_id="m-1")
    send(rabbit, exchange_name, message_id="m-1")
    stats = Worker([consumer]).run(until_idle=1.0)
    assert applied(consumer, "m-1") == 1
    assert (stats.processed, stats.duplicates) == (1, 1)
    assert ProcessedMessage.objects.filter(consumer=consumer.name).count() == 1
    assert rabbit.count(consumer.name) == 0  # both acked


def test_concurrent_duplicates_serialize_on_the_idempotency_record(
    amqp_consumer, rabbit, exchange_name
):
    """Two workers hold the two copies at the same moment: one applies, one skips."""
    both_in = threading.Barrier(2, timeout=10)

    def slow(consumer: EventConsumer, event: Event) -> None:
        time.sleep(0.5)  # the other copy arrives meanwhile and waits on the unique index

    consumer = amqp_consumer(behaviour=slow)
    send(rabbit, exchange_name, message_id="m-1")
    send(rabbit, exchange_name, message_id="m-1")
    results: list[Any] = []

    def run() -> None:
        worker = Worker([consumer], prefetch=1)
        worker.transport.connect()
        both_in.wait()
        results.append(run_worker_thread(worker, until_idle=2.0))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 2
    assert applied(consumer, "m-1") == 1
    assert sum(s.processed for s in results) == 1
    assert sum(s.duplicates for s in results) == 1
    assert rabbit.count(consumer.name) == 0


# -- retries and dead letters ------------------------------------------------------------
def test_retries_follow_retry_delays_then_dead_letter(amqp_consumer, rabbit, exchange_name):
    other_subscriber = rabbit.bind_queue(exchange_name, "orders.*")
    consumer = amqp_consumer(max_retries=2, retry_delays=[0.4, 0.8], behaviour=always_fail)
    send(
        rabbit, exchange_name, message_id="m-1", application_headers={"x-event-key": "k", "t": "a"}
    )
    started = time.monotonic()
    stats = Worker([consumer]).run(until_idle=2.0)

    calls: list[Event] = consumer.calls
    times: list[float] = consumer.times
    assert [e.attempt for e in calls] == [1, 2, 3]
    assert {(e.id, e.topic, e.key) for e in calls} == {("m-1", "orders.created", "k")}
    assert all(e.headers == {"t": "a"} for e in calls)
    assert times[0] - started < 1.0
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert 0.4 <= gaps[0] < 2.4, gaps
    assert 0.8 <= gaps[1] < 2.8, gaps
    assert (stats.retried, stats.dead_lettered) == (2, 1)
    assert applied(consumer) == 0

    letter = DeadLetter.objects.get()
    assert letter.reason == RETRIES_EXHAUSTED
    assert letter.attempts == 3
    assert letter.error_type == "RuntimeError"
    assert "RuntimeError: boom 3" in letter.traceback
    assert "always_fail" in letter.traceback
    assert [h["error"] for h in letter.history] == [
        "RuntimeError: boom 1",
        "RuntimeError: boom 2",
        "RuntimeError: boom 3",
    ]
    assert letter.first_failed_at.isoformat() == letter.history[0]["at"]
    assert letter.headers["t"] == "a"
    assert letter.headers[ATTEMPT_HEADER] == 3
    for queue in queue_names(consumer):
        assert rabbit.count(queue) == 0
    # the retries went to this consumer's queue only, never to the topic's other subscribers
    assert len(rabbit.get_all(other_subscriber)) == 1


def test_permanent_error_dead_letters_at_once(amqp_consumer, rabbit, exchange_name):
    def permanent(consumer: EventConsumer, event: Event) -> None:
        raise PermanentError("cannot ever work")

    consumer = amqp_consumer(max_retries=3, retry_delays=[0.1], behaviour=permanent)
    send(rabbit, exchange_name, message_id="m-1")
    stats = Worker([consumer]).run(until_idle=1.0)
    assert len(consumer.calls) == 1
    assert stats.retried == 0
    letter = DeadLetter.objects.get()
    assert (letter.reason, letter.attempts) == (PERMANENT_ERROR, 1)
    assert "PermanentError: cannot ever work" in letter.traceback


def test_retry_dead_letters_after_the_fix_applies_once(amqp_consumer, rabbit, exchange_name):
    other_subscriber = rabbit.bind_queue(exchange_name, "orders.*")
    state = {"fixed": False}

    def buggy(consumer: EventConsumer, event: Event) -> None:
        if not state["fixed"]:
            raise PermanentError("bug 42")

    consumer = amqp_consumer(behaviour=buggy)
    send(rabbit, exchange_name, b'{"order": 9}', message_id="m-1")
    Worker([consumer]).run(until_idle=1.0)
    letter = DeadLetter.objects.get()

    state["fixed"] = True
    out = StringIO()
    call_command("retry_dead_letters", "--id", str(letter.pk), stdout=out)
    assert "1 confirmed by the broker now" in out.getvalue()
    stats = Worker([consumer]).run(until_idle=1.0)

    assert stats.processed == 1
    assert applied(consumer, "m-1") == 1
    assert consumer.calls[-1].payload == {"order": 9}
    letter.refresh_from_db()
    assert letter.status == DeadLetter.Status.RETRIED
    assert ProcessedMessage.objects.filter(consumer=consumer.name, message_id="m-1").count() == 1
    assert rabbit.count(consumer.name) == 0
    assert len(rabbit.get_all(other_subscriber)) == 1  # the original only


# -- poison ------------------------------------------------------------------------------
POISON = [
    pytest.param({"body": b'{"pad": "' + b"x" * 300 + b'"}'}, TOO_LARGE, id="too-large"),
    pytest.param(
        {"content_type": "application/x-python-serialize"}, WRONG_CONTENT_TYPE, id="pickle"
    ),
    pytest.param({"body": b"\x80\x04\x95 not json"}, NOT_JSON, id="not-json"),
    pytest.param({"message_id": None}, NO_MESSAGE_ID, id="no-message-id"),
    pytest.param(
        {"application_headers": {ATTEMPT_HEADER: "later"}}, BAD_ATTEMPT_HEADER, id="attempt"
    ),
]


@pytest.mark.parametrize(("kwargs", "reason"), POISON)
def test_each_poison_kind_is_dead_lettered_and_the_next_message_processed(
    amqp_consumer, rabbit, exchange_name, settings, kwargs, reason
):
    settings.RELIABLE_EVENTS = {**settings.RELIABLE_EVENTS, "MAX_PAYLOAD_BYTES": 200}
    consumer = amqp_consumer()
    send(rabbit, exchange_name, **{"message_id": "bad-1", **kwargs})
    send(rabbit, exchange_name, message_id="good-1")
    stats = Worker([consumer]).run(until_idle=1.0)
    assert stats.poison == 1
    assert [e.id for e in consumer.calls] == ["good-1"]
    assert applied(consumer, "good-1") == 1
    letter = DeadLetter.objects.get()
    assert letter.reason == reason
    assert letter.error_message
    assert letter.consumer == consumer.name
    assert rabbit.count(consumer.name) == 0  # acked: nothing requeued forever


# -- the exactly-once chain --------------------------------------------------------------
def test_an_event_published_by_a_handler_exists_exactly_when_it_committed(
    amqp_consumer, rabbit, exchange_name
):
    invoices = rabbit.bind_queue(exchange_name, "invoices.#")
    from reliable_events import publish_event

    def publish_then_maybe_fail(consumer: EventConsumer, event: Event) -> None:
        publish_event("invoices.created", {"caused_by": event.id, "attempt": event.attempt})
        if event.attempt == 1:
            raise RuntimeError("fails after publishing")

    consumer = amqp_consumer(retry_delays=[0.1], behaviour=publish_then_maybe_fail)
    send(rabbit, exchange_name, message_id="m-1")
    Worker([consumer]).run(until_idle=1.0)

    [row] = OutboxMessage.objects.filter(topic="invoices.created")
    assert row.payload == {"caused_by": "m-1", "attempt": 2}  # the committed attempt's only
    assert row.status == OutboxMessage.Status.SENT
    messages = rabbit.get_all(invoices, expect=1, timeout=5)
    assert [json.loads(m.body) for m in messages] == [{"caused_by": "m-1", "attempt": 2}]
    assert ProcessedMessage.objects.filter(consumer=consumer.name, message_id="m-1").exists()


# -- quorum queues -----------------------------------------------------------------------
def test_quorum_queues_retry_through_their_delay_queues(
    amqp_consumer, rabbit, exchange_name, settings
):
    settings.RELIABLE_EVENTS = {**settings.RELIABLE_EVENTS, "QUEUE_TYPE": "quorum"}

    def fail_once(consumer: EventConsumer, event: Event) -> None:
        if event.attempt == 1:
            raise RuntimeError("once")

    consumer = amqp_consumer(retry_delays=[0.2], behaviour=fail_once)
    send(rabbit, exchange_name, message_id="m-1")
    Worker([consumer]).run(until_idle=1.5)
    assert [e.attempt for e in consumer.calls] == [1, 2]
    assert applied(consumer, "m-1") == 1
    # the broker kept our arguments: redeclaring without the delivery limit is refused
    channel = rabbit.connection.channel()
    with pytest.raises(amqp.exceptions.PreconditionFailed):
        channel.queue_declare(
            consumer.name, durable=True, auto_delete=False, arguments={"x-queue-type": "quorum"}
        )
    channel = rabbit.connection.channel()
    channel.queue_declare(  # the same arguments are accepted: this is what we declared
        consumer.name,
        durable=True,
        auto_delete=False,
        arguments={"x-queue-type": "quorum", "x-delivery-limit": QUORUM_DELIVERY_LIMIT},
    )


# -- faults ------------------------------------------------------------------------------
def test_a_lost_broker_connection_is_reopened_and_nothing_is_lost(
    amqp_consumer, rabbit, exchange_name, amqp_url
):
    proxy = TcpProxy().start()

    def cut_once(consumer: EventConsumer, event: Event) -> None:
        if event.id == "m-10" and not event.redelivered:
            proxy.stop()  # the broker vanishes while this message is being handled
            threading.Timer(1.5, proxy.start).start()

    consumer = amqp_consumer(behaviour=cut_once)
    ids = [f"m-{n}" for n in range(30)]
    for message_id in ids:
        send(rabbit, exchange_name, message_id=message_id)
    try:
        worker = Worker([consumer], url=proxy.url(), prefetch=5)
        # Idle time counts while disconnected (``consume_events --until-idle`` exits
        # with code 3 then): the reconnect back-off after the 1.5 s outage (jittered,
        # ~0.3 + 0.7 + 1.5 s) must fit in it with room for a slow machine.
        stats = run_worker_thread(worker, until_idle=8.0)
    finally:
        proxy.stop()
    assert stats.reconnects >= 1
    assert {message_id: applied(consumer, message_id) for message_id in ids} == dict.fromkeys(
        ids, 1
    )
    assert rabbit.count(consumer.name) == 0
    assert not DeadLetter.objects.exists()


def test_a_database_connection_lost_mid_handler_leaves_the_message_unacked(
    amqp_consumer, rabbit, exchange_name
):
    kills: list[str] = []

    def kill_my_connection_once(consumer: EventConsumer, event: Event) -> None:
        if not kills:
            kills.append(event.id)
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")

    consumer = amqp_consumer(behaviour=kill_my_connection_once)
    send(rabbit, exchange_name, message_id="m-1")
    send(rabbit, exchange_name, message_id="m-2")
    stats = Worker([consumer]).run(until_idle=1.0)
    assert stats.database_outages == 1
    assert len(consumer.calls) == 3  # m-1 twice, then m-2
    assert applied(consumer, "m-1") == applied(consumer, "m-2") == 1
    assert stats.retried == 0  # an outage is not the handler's failure
    assert not DeadLetter.objects.exists()
    assert rabbit.count(consumer.name) == 0


def test_a_database_gone_while_writing_a_dead_letter_is_waited_for_not_a_crash(
    amqp_consumer, rabbit, exchange_name
):
    """The dead letter of a handler that failed in a batch is written after the batch
    committed.  When the database goes away right then and does not take new connections
    (PostgreSQL shutting down), the transaction around the dead letter fails again as it
    ends (Django reconnects to restore autocommit): the worker waits for the database and
    writes the letter; it must not die of that second error (seen in the ledger)."""
    settings_dict = connection.settings_dict
    port = settings_dict["PORT"]
    closed = str(free_port())  # nobody listens there: connections are refused
    restored = threading.Event()

    def restore() -> None:
        settings_dict["PORT"] = port
        restored.set()

    def database_down_after_commit() -> None:
        settings_dict["PORT"] = closed
        with contextlib.suppress(OperationalError), connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        threading.Timer(1.0, restore).start()

    def fail_or_break(consumer: EventConsumer, event: Event) -> None:
        if event.id == "m-1":
            raise PermanentError("cannot ever work")
        connection.on_commit(database_down_after_commit)

    consumer = amqp_consumer(behaviour=fail_or_break)
    send(rabbit, exchange_name, message_id="m-1")
    send(rabbit, exchange_name, message_id="m-2")
    try:
        stats = Worker([consumer], prefetch=5).run(until_idle=3.0)
    finally:
        assert restored.wait(5)
    assert stats.database_outages >= 1
    assert stats.dead_lettered == 1
    assert applied(consumer, "m-1") == 0
    assert applied(consumer, "m-2") == 1
    letters = list(DeadLetter.objects.values_list("message_id", "reason"))
    assert letters == [("m-1", PERMANENT_ERROR)]
    assert rabbit.count(consumer.name) == 0


@pytest.mark.parametrize("batch_size", [1, None])
def test_stopping_while_waiting_for_the_database_leaves_the_message_unacked(
    amqp_consumer, rabbit, exchange_name, batch_size
):
    """Acks are coalesced; a message held for the database is never acked with them.

    One message per transaction, m-0 committed before m-1 lost the database; with the
    default batch the three share a transaction: all of it is rolled back, nothing is
    acked, all three go back to the queue."""
    box: dict[str, Worker] = {}

    def kill_connection_and_stop(consumer: EventConsumer, event: Event) -> None:
        if event.id == "m-1":
            box["w"].stop.set("SIGTERM")
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")

    consumer = amqp_consumer(behaviour=kill_connection_and_stop)
    consumer.batch_size = batch_size
    for n in range(3):
        send(rabbit, exchange_name, message_id=f"m-{n}")
    worker = box["w"] = Worker([consumer])
    stats = worker.run(until_idle=2.0)
    committed = ["m-0"] if batch_size == 1 else []
    assert stats.processed == len(committed)
    assert applied(consumer, "m-0") == len(committed)
    assert applied(consumer, "m-1") == applied(consumer, "m-2") == 0
    left = [f"m-{n}" for n in range(3) if f"m-{n}" not in committed]
    messages = rabbit.get_all(consumer.name, expect=len(left), timeout=5)
    assert sorted(m.properties["message_id"] for m in messages) == left


def test_a_connection_that_died_while_idle_is_caught_at_the_idempotency_record(
    amqp_consumer, rabbit, exchange_name
):
    """The record insert is the transaction's first statement (sent with its BEGIN)."""
    from reliable_events.exceptions import DatabaseUnavailable

    consumer = amqp_consumer()
    connection.ensure_connection()
    pid = connection.connection.info.backend_pid
    killer = connections.create_connection(connection.alias)  # either driver
    try:
        with killer.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
    finally:
        killer.close()
    time.sleep(0.2)
    event = Event(id="m-1", topic="orders.created", key=None, payload={})
    with pytest.raises(DatabaseUnavailable):
        consumer().process(event)
    assert consumer.calls == []
    connection.close()
    assert consumer().process(event).outcome.value == "processed"
    assert applied(consumer, "m-1") == 1


def test_topology_conflicts_are_reported_not_retried(amqp_consumer, rabbit, settings):
    from reliable_events.exceptions import ConfigurationError

    consumer = amqp_consumer(retry_delays=[1])
    consumer.retry_delays = [2]  # the delay queue exists with another TTL
    with pytest.raises(ConfigurationError, match="other arguments"):
        Worker([consumer]).run(until_idle=1.0)
