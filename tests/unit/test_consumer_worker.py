"""The consume loop on the embedded ``memory://`` transport (any database).

The guarantees themselves are proven on PostgreSQL + RabbitMQ in
``tests/integration/test_consumer_*.py``; these tests pin the loop's behaviour
(retries, dead letters, poison, commands) quickly, on SQLite too.
"""

from __future__ import annotations

import contextlib
import threading
import time
from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.db import IntegrityError
from django.utils import timezone
from kombu import Connection, Producer

from reliable_events import publish_event
from reliable_events.bootsteps import ConsumerService, ConsumerStep
from reliable_events.consumer import Event, EventConsumer
from reliable_events.consumer import worker as worker_module
from reliable_events.consuming import (
    ATTEMPT_HEADER,
    BAD_ATTEMPT_HEADER,
    DELIVERY_COUNT_HEADER,
    NO_MESSAGE_ID,
    NOT_JSON,
    PERMANENT_ERROR,
    REDELIVERY_LIMIT,
    RETRIES_EXHAUSTED,
    TOO_LARGE,
    WRONG_CONTENT_TYPE,
    Delivery,
    Processor,
    Worker,
)
from reliable_events.exceptions import PermanentError
from reliable_events.maintenance import purge
from reliable_events.models import DeadLetter, OutboxMessage, ProcessedMessage
from reliable_events.runner import StopFlag
from tests.support.consumer_support import applied, make_consumer
from tests.testapp.models import Effect, Order

pytestmark = pytest.mark.django_db(transaction=True)

URL = "memory://"


@pytest.fixture(autouse=True)
def _memory_broker(re_settings: Any) -> None:
    """Events published by these tests go to the in-process transport the worker reads
    (the SQLite tier's default is the database transport)."""
    re_settings(BROKER_URL=URL)


def started(*consumers: type[EventConsumer], **kwargs: Any) -> Worker:
    """A worker whose topology is declared, so that published events reach its queues."""
    worker = Worker(list(consumers), url=URL, **kwargs)
    worker.transport.connect()
    return worker


def send(
    body: bytes = b'{"n": 1}',
    *,
    message_id: str | None = "m-1",
    topic: str = "orders.created",
    content_type: str = "application/json",
    headers: dict[str, Any] | None = None,
) -> None:
    properties: dict[str, Any] = {"type": topic}
    if message_id is not None:
        properties["message_id"] = message_id
    with Connection(URL) as conn:
        Producer(conn.default_channel, serializer=None, auto_declare=False).publish(
            body,
            exchange="events",
            routing_key=topic,
            content_type=content_type,
            content_encoding="utf-8",
            headers=headers or {},
            delivery_mode=2,
            **properties,
        )


def queue_size(name: str) -> int:
    with Connection(URL) as conn:
        channel: Any = conn.default_channel
        return int(channel._size(name))


def fail_always(consumer: EventConsumer, event: Event) -> None:
    raise RuntimeError(f"boom on attempt {event.attempt}")


# -- the happy path and duplicates -------------------------------------------------------
def test_each_message_id_is_applied_once_and_every_delivery_acked(clean_registry):
    consumer = make_consumer(clean_registry)
    worker = started(consumer)
    send(message_id="m-1")
    send(message_id="m-1")  # the same message delivered twice
    send(message_id="m-2")
    stats = worker.run(until_idle=0.5)
    assert applied(consumer, "m-1") == 1
    assert applied(consumer, "m-2") == 1
    assert (stats.processed, stats.duplicates) == (2, 1)
    assert queue_size(consumer.name) == 0  # all three acked
    assert ProcessedMessage.objects.filter(consumer=consumer.name).count() == 2
    assert not DeadLetter.objects.exists()


def test_handler_sees_the_event(clean_registry):
    consumer = make_consumer(clean_registry)
    worker = started(consumer)
    send(b'{"order_id": 7}', message_id="m-7", headers={"x-event-key": "7", "tenant": "a"})
    worker.run(until_idle=0.5)
    [event] = consumer.calls
    assert (event.id, event.topic, event.key, event.payload) == (
        "m-7",
        "orders.created",
        "7",
        {"order_id": 7},
    )
    assert event.headers == {"tenant": "a"}
    assert event.attempt == 1


# -- retries and dead letters ------------------------------------------------------------
def test_a_failing_handler_is_retried_then_dead_lettered_with_its_history(clean_registry, use_tz):
    consumer = make_consumer(clean_registry, max_retries=2, retry_delays=[0], behaviour=fail_always)
    worker = started(consumer)
    send(b'{"n": 1}', message_id="m-1", headers={"x-event-key": "k1", "tenant": "a"})
    stats = worker.run(until_idle=1.0)

    assert [e.attempt for e in consumer.calls] == [1, 2, 3]
    assert {e.id for e in consumer.calls} == {"m-1"}
    assert (stats.retried, stats.dead_lettered) == (2, 1)
    assert applied(consumer) == 0  # every attempt rolled back
    assert not ProcessedMessage.objects.filter(consumer=consumer.name).exists()
    # the embedded transport retries through outbox rows addressed to this queue only
    retries = list(OutboxMessage.objects.filter(queue=consumer.name).order_by("id"))
    assert [r.headers[ATTEMPT_HEADER] for r in retries] == [2, 3]
    assert {r.message_id for r in retries} == {"m-1"}
    assert {r.key for r in retries} == {"k1"}

    letter = DeadLetter.objects.get()
    assert letter.reason == RETRIES_EXHAUSTED
    assert letter.consumer == consumer.name
    assert letter.queue == consumer.name
    assert letter.status == DeadLetter.Status.OPEN
    assert (letter.message_id, letter.topic, letter.key) == ("m-1", "orders.created", "k1")
    assert letter.payload == {"n": 1}
    assert letter.headers["tenant"] == "a"
    assert letter.attempts == 3
    assert letter.error_type == "RuntimeError"
    assert letter.error_message == "boom on attempt 3"
    assert "Traceback (most recent call last)" in letter.traceback
    assert "fail_always" in letter.traceback
    assert [h["attempt"] for h in letter.history] == [1, 2, 3]
    assert [h["error"] for h in letter.history] == [
        f"RuntimeError: boom on attempt {n}" for n in (1, 2, 3)
    ]
    assert letter.first_failed_at.isoformat() == letter.history[0]["at"]
    assert letter.first_failed_at < letter.last_failed_at
    assert len(letter.fingerprint) == 16
    assert queue_size(consumer.name) == 0


def test_a_json_null_event_is_retried_and_dead_lettered_like_any_other(clean_registry):
    consumer = make_consumer(clean_registry, max_retries=1, retry_delays=[0], behaviour=fail_always)
    worker = started(consumer)
    send(b"null", message_id="m-null")
    stats = worker.run(until_idle=1.0)
    assert [e.payload for e in consumer.calls] == [None, None]
    assert (stats.retried, stats.dead_lettered) == (1, 1)
    assert DeadLetter.objects.get().message_id == "m-null"


def test_retries_wait_for_their_delay(clean_registry):
    consumer = make_consumer(
        clean_registry, max_retries=3, retry_delays=[30, 120], behaviour=fail_always
    )
    worker = started(consumer)
    send(message_id="m-1")
    before = timezone.now()
    worker.run(until_idle=0.5)
    assert len(consumer.calls) == 1
    row = OutboxMessage.objects.get(queue=consumer.name)
    assert timedelta(seconds=29) < row.next_attempt_at - before < timedelta(seconds=32)
    # make it due now: the second attempt is scheduled with the second delay
    OutboxMessage.objects.filter(pk=row.pk).update(next_attempt_at=timezone.now())
    before = timezone.now()
    worker.run(until_idle=0.5)
    assert [e.attempt for e in consumer.calls] == [1, 2]
    row = OutboxMessage.objects.filter(queue=consumer.name).latest("id")
    assert timedelta(seconds=119) < row.next_attempt_at - before < timedelta(seconds=122)
    assert not DeadLetter.objects.exists()


def test_permanent_error_dead_letters_without_retry(clean_registry):
    def permanent(consumer: EventConsumer, event: Event) -> None:
        raise PermanentError("order 7 does not exist")

    consumer = make_consumer(clean_registry, max_retries=5, behaviour=permanent)
    worker = started(consumer)
    send(message_id="m-1")
    stats = worker.run(until_idle=0.5)
    assert len(consumer.calls) == 1
    assert (stats.retried, stats.dead_lettered) == (0, 1)
    assert not OutboxMessage.objects.filter(queue=consumer.name).exists()
    letter = DeadLetter.objects.get()
    assert letter.reason == PERMANENT_ERROR
    assert letter.attempts == 1
    assert letter.error_type == "reliable_events.exceptions.PermanentError"
    assert letter.error_message == "order 7 does not exist"


def test_max_retries_zero_dead_letters_on_first_failure(clean_registry):
    consumer = make_consumer(clean_registry, max_retries=0, behaviour=fail_always)
    worker = started(consumer)
    send(message_id="m-1")
    worker.run(until_idle=0.5)
    assert len(consumer.calls) == 1
    assert DeadLetter.objects.get().reason == RETRIES_EXHAUSTED


def test_a_redelivered_dead_letter_updates_the_open_one(clean_registry):
    """Died after writing the dead letter, before the ack: no second dead letter."""

    def permanent(consumer: EventConsumer, event: Event) -> None:
        raise PermanentError("nope")

    consumer = make_consumer(clean_registry, behaviour=permanent)
    processor = Processor({consumer.name: consumer()}, scheduler=None)  # type: ignore[arg-type]
    delivery = Delivery(
        consumer=consumer.name,
        body=b"{}",
        properties={"message_id": "m-1", "content_type": "application/json", "type": "t"},
        headers={},
    )
    processor.process(delivery)
    delivery.redelivered = True
    processor.process(delivery)
    assert DeadLetter.objects.count() == 1
    assert len(consumer.calls) == 2


def test_a_message_delivered_too_often_is_dead_lettered_unrun(clean_registry, settings):
    settings.RELIABLE_EVENTS = {**settings.RELIABLE_EVENTS, "MAX_DELIVERIES": 5}
    consumer = make_consumer(clean_registry)
    processor = Processor({consumer.name: consumer()}, scheduler=None)  # type: ignore[arg-type]
    delivery = Delivery(
        consumer=consumer.name,
        body=b"{}",
        properties={"message_id": "m-1", "content_type": "application/json", "type": "t"},
        headers={DELIVERY_COUNT_HEADER: 5},
    )
    processor.process(delivery)
    assert consumer.calls == []
    letter = DeadLetter.objects.get()
    assert letter.reason == REDELIVERY_LIMIT
    assert "5 times" in letter.error_message


# -- poison ------------------------------------------------------------------------------
POISON = [
    pytest.param({"body": b"x" * 300}, TOO_LARGE, id="too-large"),
    pytest.param({"content_type": "text/plain"}, WRONG_CONTENT_TYPE, id="content-type"),
    pytest.param({"body": b"\x80\x81 not json"}, NOT_JSON, id="not-json"),
    pytest.param({"message_id": None}, NO_MESSAGE_ID, id="no-message-id"),
    pytest.param({"headers": {ATTEMPT_HEADER: "soon"}}, BAD_ATTEMPT_HEADER, id="attempt"),
]


@pytest.mark.parametrize(("kwargs", "reason"), POISON)
def test_poison_is_dead_lettered_and_the_loop_goes_on(clean_registry, settings, kwargs, reason):
    settings.RELIABLE_EVENTS = {**settings.RELIABLE_EVENTS, "MAX_PAYLOAD_BYTES": 200}
    consumer = make_consumer(clean_registry)
    worker = started(consumer)
    send(**{"message_id": "bad-1", **kwargs})
    send(message_id="good-1")
    stats = worker.run(until_idle=0.5)
    assert applied(consumer, "good-1") == 1
    assert [e.id for e in consumer.calls] == ["good-1"]
    assert stats.poison == 1
    letter = DeadLetter.objects.get()
    assert letter.reason == reason
    assert letter.consumer == consumer.name
    assert letter.error_message
    if reason in (TOO_LARGE, NOT_JSON, WRONG_CONTENT_TYPE):  # kept as text, not retryable
        assert letter.payload is None
        assert letter.raw_body
    else:
        assert letter.payload == {"n": 1}
    assert queue_size(consumer.name) == 0


# -- the exactly-once chain --------------------------------------------------------------
def test_an_event_published_by_a_handler_commits_with_it(clean_registry):
    def publish_then_fail_once(consumer: EventConsumer, event: Event) -> None:
        publish_event("invoices.created", {"order": event.payload["n"]})
        if event.attempt == 1:
            raise RuntimeError("after publishing")

    consumer = make_consumer(clean_registry, retry_delays=[0], behaviour=publish_then_fail_once)
    worker = started(consumer)
    send(message_id="m-1")
    worker.run(until_idle=1.0)
    assert [e.attempt for e in consumer.calls] == [1, 2]
    # the first attempt's event was rolled back with it; the second one committed
    [row] = OutboxMessage.objects.filter(topic="invoices.created")
    assert row.payload == {"order": 1}
    assert row.status == OutboxMessage.Status.SENT
    assert ProcessedMessage.objects.filter(consumer=consumer.name, message_id="m-1").exists()


# -- batching ----------------------------------------------------------------------------
def test_a_failing_handler_in_a_batch_rolls_back_alone(clean_registry):
    def fail_on_m2(consumer: EventConsumer, event: Event) -> None:
        if event.id == "m-2":
            raise PermanentError("m-2 is broken")

    consumer = make_consumer(clean_registry, behaviour=fail_on_m2)
    consumer.batch_size = 10
    worker = started(consumer)
    for n in range(5):
        send(message_id=f"m-{n}")
    send(message_id="m-0")  # a duplicate inside the batch window
    stats = worker.run(until_idle=0.5)
    assert {f"m-{n}": applied(consumer, f"m-{n}") for n in range(5)} == {
        "m-0": 1,
        "m-1": 1,
        "m-2": 0,
        "m-3": 1,
        "m-4": 1,
    }
    assert (stats.processed, stats.duplicates, stats.dead_lettered) == (4, 1, 1)
    assert DeadLetter.objects.get().message_id == "m-2"
    # one batch, each handler in its own savepoint: m-2 rolled back alone, nobody ran twice
    assert [e.id for e in consumer.calls] == ["m-0", "m-1", "m-2", "m-3", "m-4"]
    assert not ProcessedMessage.objects.filter(consumer=consumer.name, message_id="m-2").exists()
    assert queue_size(consumer.name) == 0


def test_a_rolled_back_handler_in_a_batch_loses_its_on_commit_callbacks(clean_registry):
    from django.db import transaction

    committed: list[str] = []

    def nested_then_fail_on_m1(consumer: EventConsumer, event: Event) -> None:
        transaction.on_commit(lambda: committed.append(event.id))
        with transaction.atomic():  # a handler's own savepoint inside the batch's
            Order.objects.create(reference=f"nested|{event.id}")
        if event.id == "m-1" and event.attempt == 1:
            raise RuntimeError("m-1 fails once")

    consumer = make_consumer(clean_registry, behaviour=nested_then_fail_on_m1)
    consumer.batch_size = 10
    worker = started(consumer)
    for n in range(4):
        send(message_id=f"m-{n}")
    stats = worker.run(until_idle=1.0)
    assert sorted(committed) == ["m-0", "m-1", "m-2", "m-3"]  # m-1 once: its retry's
    assert Order.objects.filter(reference__startswith="nested|").count() == 4
    assert [e.id for e in consumer.calls].count("m-1") == 2
    assert (stats.processed, stats.retried) == (4, 1)


def test_a_handler_that_swallows_a_database_error_fails_alone_in_its_batch(clean_registry):
    def swallow_on_m1(consumer: EventConsumer, event: Event) -> None:
        Effect.objects.create(consumer="swallow", message_id=f"{event.id}|{event.attempt}")
        if event.id == "m-1" and event.attempt == 1:
            # Caught without a nested atomic(): the transaction is broken.
            with contextlib.suppress(IntegrityError):
                Effect.objects.create(consumer="swallow", message_id=f"{event.id}|1")

    consumer = make_consumer(clean_registry, retry_delays=[0], behaviour=swallow_on_m1)
    consumer.batch_size = 10
    stop = StopFlag()
    worker = started(consumer, stop=stop)
    for n in range(3):
        send(message_id=f"m-{n}")
    deadline = threading.Timer(20.0, stop.set)  # taken for a lost database, it never idles
    deadline.start()
    try:
        stats = worker.run(until_idle=1.0)
    finally:
        deadline.cancel()
    assert (stats.processed, stats.retried, stats.database_outages) == (3, 1, 0)
    assert sorted(Effect.objects.values_list("message_id", flat=True)) == [
        "m-0|1",
        "m-1|2",
        "m-2|1",
    ]
    assert [e.id for e in consumer.calls] == ["m-0", "m-1", "m-2", "m-1"]


def test_a_batch_applies_each_message_once(clean_registry, monkeypatch):
    # A batch cut short by its time limit (a loaded machine) hands its rest over again:
    # not what this test counts.
    monkeypatch.setattr(worker_module, "BATCH_MAX_SECONDS", 60.0)
    consumer = make_consumer(clean_registry)
    consumer.batch_size = 50
    batches = spy_batches(consumer)
    worker = started(consumer)
    for n in range(30):
        send(message_id=f"m-{n % 20}")  # 20 ids, 10 of them twice
    stats = worker.run(until_idle=0.5)
    assert sum(batches) == 30
    assert max(batches) > 1
    assert (stats.processed, stats.duplicates) == (20, 10)
    assert applied(consumer) == 20
    assert len(consumer.calls) == 20  # duplicates never reach handle
    assert queue_size(consumer.name) == 0


def spy_batches(consumer: type[EventConsumer]) -> list[int]:
    """Record the size of every batch handed to ``consumer.process_batch``."""
    sizes: list[int] = []
    process_batch = consumer.process_batch

    def spy(self: EventConsumer, events: Any, **kwargs: Any) -> Any:
        sizes.append(len(events))
        return process_batch(self, events, **kwargs)

    consumer.process_batch = spy  # type: ignore[method-assign]
    return sizes


def test_a_batch_transaction_stays_short(clean_registry):
    def slow(consumer: EventConsumer, event: Event) -> None:
        time.sleep(0.15)

    consumer = make_consumer(clean_registry, behaviour=slow)
    consumer.batch_size = 10
    sizes = spy_batches(consumer)
    worker = started(consumer)
    for n in range(5):
        send(message_id=f"m-{n}")
    stats = worker.run(until_idle=0.5)
    # 0.15 s handlers, BATCH_MAX_SECONDS 0.25: two per transaction, the rest carried over
    assert sizes == [5, 3, 1]
    assert stats.processed == 5
    assert applied(consumer) == 5


def test_batching_goes_on_after_a_failed_handler(clean_registry):
    def fail_on_m1(consumer: EventConsumer, event: Event) -> None:
        if event.id == "m-1":
            raise PermanentError("broken")

    consumer = make_consumer(clean_registry, behaviour=fail_on_m1)
    consumer.batch_size = 10
    sizes = spy_batches(consumer)
    worker = started(consumer)
    for n in range(12):
        send(message_id=f"m-{n}")
    worker.run(until_idle=0.5)
    assert sizes == [10, 2]  # the failure cost no batching
    assert len(consumer.calls) == 12
    assert applied(consumer) == 11
    assert DeadLetter.objects.get().message_id == "m-1"


# -- stopping ----------------------------------------------------------------------------
def test_stop_lets_the_current_message_finish_and_leaves_the_rest_queued(clean_registry):
    worker_box: dict[str, Worker] = {}

    def stop_on_first(consumer: EventConsumer, event: Event) -> None:
        worker_box["w"].stop.set("SIGTERM")

    consumer = make_consumer(clean_registry, behaviour=stop_on_first)
    worker = worker_box["w"] = started(consumer)
    for n in range(3):
        send(message_id=f"m-{n}")
    worker.run()
    assert len(consumer.calls) == 1
    assert applied(consumer) == 1
    assert queue_size(consumer.name) == 2  # prefetched but unstarted: back in the queue


# -- commands ----------------------------------------------------------------------------
def test_consume_events_command_runs_until_idle(clean_registry):
    consumer = make_consumer(clean_registry)
    started(consumer).close()
    send(message_id="m-1")
    out = StringIO()
    call_command("consume_events", consumer.name, "--until-idle", "0.5", stdout=out)
    assert applied(consumer, "m-1") == 1
    assert "processed=1" in out.getvalue()


def test_consume_events_command_rejects_bad_input(clean_registry):
    plain = make_consumer(clean_registry)
    ordered = make_consumer(clean_registry)
    ordered.ordered = True
    with pytest.raises(CommandError, match="no consumer named"):
        call_command("consume_events", "nope", "--until-idle", "0.1")
    with pytest.raises(CommandError, match="must be positive"):
        call_command("consume_events", "--until-idle", "0")
    out = StringIO()
    call_command("consume_events", "--list", stdout=out)
    listed = {line.split(":")[0]: line for line in out.getvalue().splitlines()}
    assert "topics=orders.*" in listed[plain.name]
    assert not listed[plain.name].endswith(" ordered")
    assert listed[ordered.name].endswith(" ordered")


@pytest.fixture
def fixable(clean_registry):
    """A consumer that fails permanently until ``state["fixed"]``; two dead letters."""
    state = {"fixed": False}

    def maybe_fail(consumer: EventConsumer, event: Event) -> None:
        if not state["fixed"]:
            raise PermanentError("bug")

    consumer = make_consumer(clean_registry, behaviour=maybe_fail)
    worker = started(consumer)
    send(message_id="m-1")
    send(message_id="m-2")
    worker.run(until_idle=0.5)
    assert DeadLetter.objects.open().count() == 2
    return consumer, state


def test_retry_dead_letters_needs_a_selection(fixable):
    with pytest.raises(CommandError, match="choose dead letters"):
        call_command("retry_dead_letters")
    with pytest.raises(CommandError, match="cannot be combined"):
        call_command("retry_dead_letters", "--all", "--id", "1")


def test_retry_dead_letters_dry_run_changes_nothing(fixable):
    consumer, _ = fixable
    out = StringIO()
    call_command("retry_dead_letters", "--all", "--dry-run", stdout=out)
    assert "would retry 2 dead letter(s)" in out.getvalue()
    assert DeadLetter.objects.open().count() == 2
    assert not OutboxMessage.objects.filter(queue=consumer.name).exists()


def test_retry_dead_letters_by_id_redelivers_to_that_consumer_once(fixable):
    consumer, state = fixable
    state["fixed"] = True
    first = DeadLetter.objects.get(message_id="m-1")
    out = StringIO()
    call_command("retry_dead_letters", "--id", str(first.pk), stdout=out)
    assert "retried 1 dead letter(s); 1 confirmed by the broker now" in out.getvalue()
    first.refresh_from_db()
    assert first.status == DeadLetter.Status.RETRIED
    assert first.resolved_by == "retry_dead_letters"
    row = OutboxMessage.objects.get(queue=consumer.name)
    assert (row.message_id, row.status) == ("m-1", OutboxMessage.Status.SENT)

    Worker([consumer], url=URL).run(until_idle=0.5)
    assert applied(consumer, "m-1") == 1
    assert applied(consumer, "m-2") == 0  # still dead
    assert DeadLetter.objects.get(message_id="m-2").status == DeadLetter.Status.OPEN

    # retrying it again is refused (it is no longer open): exit code 3
    err = StringIO()
    with pytest.raises(CommandError) as info:
        call_command("retry_dead_letters", "--id", str(first.pk), stderr=err)
    assert info.value.returncode == 3
    assert f"skipped #{first.pk}" in err.getvalue()


def test_retry_dead_letters_by_consumer(fixable):
    consumer, state = fixable
    state["fixed"] = True
    call_command("retry_dead_letters", "--consumer", consumer.name, stdout=StringIO())
    Worker([consumer], url=URL).run(until_idle=0.5)
    assert applied(consumer, "m-1") == applied(consumer, "m-2") == 1
    assert DeadLetter.objects.filter(status=DeadLetter.Status.RETRIED).count() == 2


def test_retry_dead_letters_refuses_consumers_it_does_not_know(clean_registry):
    now = timezone.now()
    letter = DeadLetter.objects.create(
        consumer="gone.consumer",
        queue="gone.consumer",
        message_id="m-1",
        payload={"n": 1},
        reason=PERMANENT_ERROR,
        first_failed_at=now,
        last_failed_at=now,
    )
    for dry_run in (["--dry-run"], []):  # a dry run skips what the real run skips
        out, err = StringIO(), StringIO()
        with pytest.raises(CommandError) as info:
            call_command("retry_dead_letters", "--all", *dry_run, stdout=out, stderr=err)
        assert info.value.returncode == 3
        assert (
            f"skipped #{letter.pk}: no consumer named 'gone.consumer' is registered here"
            in err.getvalue()
        )
        assert "--force to retry anyway" in err.getvalue()
        assert f"retry #{letter.pk}" not in out.getvalue()
    letter.refresh_from_db()
    assert letter.status == DeadLetter.Status.OPEN
    assert not OutboxMessage.objects.exists()

    call_command("retry_dead_letters", "--all", "--force", stdout=StringIO())
    letter.refresh_from_db()
    assert letter.status == DeadLetter.Status.RETRIED
    assert OutboxMessage.objects.get().queue == "gone.consumer"


# -- retention ---------------------------------------------------------------------------
def test_processed_records_are_purged_after_retention_in_batches(settings):
    from reliable_events.conf import app_settings

    assert app_settings.PROCESSED_RETENTION_DAYS == 7.0
    horizon = sum(app_settings.RETRY_DELAYS)  # seconds of the default retry policy
    assert 100 * horizon < app_settings.PROCESSED_RETENTION_DAYS * 86400
    ProcessedMessage.objects.bulk_create(
        ProcessedMessage(consumer="c", message_id=f"m-{n}", topic="t") for n in range(7)
    )
    old = timezone.now() - timedelta(days=8)
    ProcessedMessage.objects.filter(message_id__in=[f"m-{n}" for n in range(5)]).update(
        processed_at=old
    )
    batches: list[int] = []
    report = purge(batch_size=2, progress=batches.append)
    assert report.processed_deleted == 5
    assert sorted(ProcessedMessage.objects.values_list("message_id", flat=True)) == ["m-5", "m-6"]
    assert len(batches) == 3  # 2 + 2 + 1: bounded statements
    out = StringIO()
    call_command("purge_outbox", stdout=out)
    assert "processed_deleted=0" in out.getvalue()


# -- hosting: the service behind the Celery bootstep -------------------------------------
def test_consumer_service_runs_in_a_thread_and_stops(clean_registry, settings):
    consumer = make_consumer(clean_registry)
    settings.RELIABLE_EVENTS = {**settings.RELIABLE_EVENTS, "CELERY_CONSUMERS": [consumer.name]}
    step = ConsumerStep.__new__(ConsumerStep)
    service = step.create(parent=None)
    assert isinstance(service, ConsumerService)
    assert step.include_if(parent=None)
    started(consumer)  # its queue exists before the service's thread declares it
    service.start()
    try:
        send(message_id="m-1")
        deadline = time.monotonic() + 10
        while not consumer.calls and time.monotonic() < deadline:
            time.sleep(0.05)
        assert service.running
    finally:
        service.stop(timeout=10)
    assert not service.running
    assert service.error is None
    assert applied(consumer, "m-1") == 1


def test_consumer_service_keeps_the_error_that_ended_its_thread(clean_registry, caplog):
    """An exception no handler code catches (here KeyboardInterrupt, as SIGINT would raise
    it) ends the thread: the service keeps it, logs it, and stopping is still clean."""

    def interrupt(consumer: EventConsumer, event: Event) -> None:
        raise KeyboardInterrupt("interrupted in the handler")

    consumer = make_consumer(clean_registry, behaviour=interrupt)
    started(consumer)  # its queue exists before the service's thread declares it
    service = ConsumerService([consumer.name])
    service.stop()  # never started: nothing to stop
    service.start()
    thread = service.thread
    service.start()  # already running: the same thread
    assert service.thread is thread
    send(message_id="m-1")
    deadline = time.monotonic() + 10
    while service.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not service.running
    assert isinstance(service.error, KeyboardInterrupt)
    assert "the consumer thread stopped on an error" in caplog.text
    service.stop(timeout=1)
    assert applied(consumer, "m-1") == 0


def test_consumer_service_says_when_its_thread_outlives_the_stop_timeout(clean_registry, caplog):
    gate = threading.Event()
    entered = threading.Event()

    def hold(consumer: EventConsumer, event: Event) -> None:
        entered.set()
        assert gate.wait(30)

    consumer = make_consumer(clean_registry, behaviour=hold)
    started(consumer)  # its queue exists before the service's thread declares it
    service = ConsumerService([consumer.name])
    service.start()
    thread = service.thread
    assert thread is not None
    try:
        send(message_id="m-1")
        assert entered.wait(60)
        service.stop(timeout=0.1)
        assert "consumer thread still busy after 0s" in caplog.text
        assert thread.is_alive()
    finally:
        gate.set()
        thread.join(10)
    assert not thread.is_alive()
    assert service.error is None
    assert applied(consumer, "m-1") == 1  # the message it was busy with was finished


def test_consumer_step_is_left_out_when_no_consumers_are_configured(settings):
    settings.RELIABLE_EVENTS = {**settings.RELIABLE_EVENTS, "CELERY_CONSUMERS": []}
    step = ConsumerStep.__new__(ConsumerStep)
    assert not step.include_if(parent=None)


def test_consume_events_exits_3_when_the_broker_stays_unreachable(clean_registry, settings):
    consumer = make_consumer(clean_registry)
    settings.RELIABLE_EVENTS = {
        **settings.RELIABLE_EVENTS,
        "BROKER_URL": "amqp://guest:guest@127.0.0.1:1//",  # nothing listens there
        "CONNECT_TIMEOUT": 0.5,
    }
    with pytest.raises(CommandError, match="could not be reached") as info:
        call_command("consume_events", consumer.name, "--until-idle", "1", stdout=StringIO())
    assert info.value.returncode == 3


def test_consumer_settings_are_checked(settings):
    from reliable_events.checks import reliable_events_checks

    settings.RELIABLE_EVENTS = {
        **settings.RELIABLE_EVENTS,
        "MAX_DELIVERIES": 0,
        "CONSUMER_BATCH_SIZE": "10",
        "CONSUMER_HEARTBEAT": -1,
        "CONSUMER_RECONNECT_MAX": 0,
    }
    text = " ".join(message.msg for message in reliable_events_checks())
    for name in (
        "MAX_DELIVERIES",
        "CONSUMER_BATCH_SIZE",
        "CONSUMER_HEARTBEAT",
        "CONSUMER_RECONNECT_MAX",
    ):
        assert name in text
