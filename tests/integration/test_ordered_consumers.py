"""Ordered consumers against the real RabbitMQ (classic and quorum partitions) and the
database transport: partitions by key, in-place retries that hold the key, and
order-preserving dead letters (parked events released in order by retry or discard,
shown in the admin)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from io import StringIO
from typing import Any

import amqp
import pytest
from django.core.management import call_command
from django.db import connections, transaction
from django.test import Client
from django.urls import reverse

from reliable_events import deadletters
from reliable_events.consumer import Event, EventConsumer, Outcome
from reliable_events.consumer.partitions import hash_exchange, partition_queues
from reliable_events.consuming import Worker
from reliable_events.exceptions import PermanentError
from reliable_events.models import DeadLetter, KeyHold, OutboxMessage, ParkedEvent
from reliable_events.publishing import publish_event
from reliable_events.relay import relay_once
from reliable_events.status import outbox_status
from reliable_events.testing import deliver_events
from reliable_events.topology import declare_on_amqp_channel, full_topology, key_bucket
from tests.support.consumer_support import make_consumer
from tests.testapp.models import Order

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.postgres]

Behaviour = Callable[[EventConsumer, Event], None]


@pytest.fixture(params=["classic", "quorum"])
def ordered(
    request, clean_registry, broker, rabbit, settings
) -> Callable[..., type[EventConsumer]]:
    """An ordered consumer on the real RabbitMQ (both queue types); its partitions and
    partitioning exchange are deleted after the test."""
    settings.RELIABLE_EVENTS = {**settings.RELIABLE_EVENTS, "QUEUE_TYPE": request.param}
    return _maker(clean_registry, rabbit)


@pytest.fixture
def ordered_classic(clean_registry, broker, rabbit) -> Callable[..., type[EventConsumer]]:
    return _maker(clean_registry, rabbit)


def _maker(clean_registry: Any, rabbit: Any) -> Callable[..., type[EventConsumer]]:
    def make(
        behaviour: Behaviour | None = None, *, hold: bool = False, **kwargs: Any
    ) -> type[EventConsumer]:
        consumer = make_consumer(clean_registry, behaviour=behaviour, **kwargs)
        consumer.ordered = True
        consumer.partitions = 4
        consumer.hold_key_on_dead_letter = hold
        rabbit.queues.extend(partition_queues(consumer))
        rabbit.exchanges.append(hash_exchange(consumer))
        topology = full_topology(consumer.queue_specs(), consumer.exchange_specs())
        declare_on_amqp_channel(rabbit.channel, topology)  # before anything is published
        return consumer

    return make


def publish(*events: tuple[str, str | None]) -> None:
    """Publish ``(message id, key)`` events on ``orders.created`` in one transaction."""
    with transaction.atomic():
        for message_id, key in events:
            publish_event("orders.created", {"id": message_id}, key=key, message_id=message_id)
    deadline = time.monotonic() + 30
    while OutboxMessage.objects.pending().exists() and time.monotonic() < deadline:
        relay_once()  # what the on-commit publish left (a slow confirm on a busy machine)
    assert not OutboxMessage.objects.pending().exists()


def handled(consumer: type[EventConsumer]) -> list[tuple[str, int]]:
    calls: list[Event] = consumer.calls  # type: ignore[attr-defined]
    return [(event.id, event.attempt) for event in calls]


def applied_ids(consumer: type[EventConsumer]) -> list[str]:
    prefix = f"{consumer.name}|"
    refs = Order.objects.filter(reference__startswith=prefix).order_by("id")
    return [ref.removeprefix(prefix) for ref in refs.values_list("reference", flat=True)]


def run_closing(worker: Worker, until_idle: float) -> None:
    """``worker.run`` in a thread, closing the thread's database connections after."""
    try:
        worker.run(until_idle=until_idle)
    finally:
        connections.close_all()


def consume(consumer: type[EventConsumer], seconds: float = 1.5) -> Any:
    return Worker([consumer]).run(until_idle=seconds)


# -- partitions ----------------------------------------------------------------------------
def test_events_of_one_key_share_a_partition_and_keys_spread(ordered, rabbit) -> None:
    consumer = ordered()
    publish(*[(f"m-{n}", f"k{n % 20}") for n in range(200)], ("keyless", None))
    seen: dict[str, set[str]] = {}
    queue_of: dict[str, str] = {}
    deadline = time.monotonic() + 10  # a quorum queue's count follows its log
    while time.monotonic() < deadline:
        counts = {queue: rabbit.count(queue) for queue in partition_queues(consumer)}
        if sum(counts.values()) >= 201:
            break
        time.sleep(0.2)
    assert sum(counts.values()) == 201, counts  # each event once, none unrouted
    for queue in partition_queues(consumer):
        channel = rabbit.connection.channel()
        got: list[Any] = []
        channel.basic_qos(0, 1000, False)
        channel.basic_consume(queue, callback=got.append, no_ack=True)
        while True:
            try:
                rabbit.connection.drain_events(timeout=0.5)
            except TimeoutError:
                break
        channel.close()
        for message in got:
            key = message.headers.get("x-event-key") or "-"
            seen.setdefault(key, set()).add(queue)
            queue_of[message.properties["message_id"]] = queue
    assert len(queue_of) == 201  # each event once, none unrouted
    assert all(len(queues) == 1 for queues in seen.values()), seen
    assert len({q for queues in seen.values() for q in queues}) >= 3  # keys spread


def test_partitions_are_single_active_consumer_queues(ordered, rabbit, settings) -> None:
    consumer = ordered()
    args: dict[str, Any] = {"x-single-active-consumer": True}
    if settings.RELIABLE_EVENTS["QUEUE_TYPE"] == "quorum":
        args.update({"x-queue-type": "quorum", "x-delivery-limit": 1000})
    queue = partition_queues(consumer)[0]
    rabbit.connection.channel().queue_declare(
        queue, durable=True, auto_delete=False, arguments=args
    )  # what we declared: accepted
    with pytest.raises(amqp.exceptions.PreconditionFailed):
        rabbit.connection.channel().queue_declare(
            queue,
            durable=True,
            auto_delete=False,
            arguments={k: v for k, v in args.items() if k != "x-single-active-consumer"},
        )


# -- in-place retries ------------------------------------------------------------------------
def test_a_failing_event_is_retried_in_place_and_holds_its_key(ordered) -> None:
    def fail_twice(consumer: EventConsumer, event: Event) -> None:
        if event.id == "a-1" and event.attempt < 3:
            raise RuntimeError(f"not yet ({event.attempt})")

    consumer = ordered(fail_twice, max_retries=3, retry_delays=[0.2])
    publish(("a-1", "a"), ("a-2", "a"), ("a-3", "a"))
    stats = consume(consumer)
    assert [c for c in handled(consumer) if c[0].startswith("a-")] == [
        ("a-1", 1),
        ("a-1", 2),
        ("a-1", 3),
        ("a-2", 1),
        ("a-3", 1),
    ]
    assert applied_ids(consumer) == ["a-1", "a-2", "a-3"]
    assert (stats.processed, stats.dead_lettered) == (3, 0)
    assert not DeadLetter.objects.exists()


# -- order-preserving dead letters -----------------------------------------------------------
def test_a_dead_lettered_head_holds_its_key_until_retried_then_all_follow_in_order(
    ordered, admin_client: Client
) -> None:
    state = {"fixed": False}

    def broken_head(consumer: EventConsumer, event: Event) -> None:
        if event.id == "a-1" and not state["fixed"]:
            raise PermanentError("bug 7")

    consumer = ordered(broken_head, hold=True)
    publish(("a-1", "a"), ("a-2", "a"), ("b-1", "b"), ("a-3", "a"), ("b-2", "b"))
    stats = consume(consumer)

    assert applied_ids(consumer) == ["b-1", "b-2"]  # the other key goes on
    assert stats.parked == 2
    letter = DeadLetter.objects.get()
    queues = partition_queues(consumer)
    # the partition it came from, not the consumer's name (no queue has that name)
    assert letter.queue == queues[int(key_bucket("a")) % len(queues)]
    hold = KeyHold.objects.get()
    assert (hold.consumer, hold.key, hold.dead_letter_id, hold.state) == (
        consumer.name,
        "a",
        letter.pk,
        KeyHold.State.HELD,
    )
    assert list(ParkedEvent.objects.order_by("id").values_list("message_id", flat=True)) == [
        "a-2",
        "a-3",
    ]
    # What is held shows: the admin lists, the overview and outbox_status count.
    page = admin_client.get(reverse("admin:reliable_events_keyhold_changelist")).content.decode()
    assert consumer.name in page
    assert ">2</a>" in page
    parked = admin_client.get(
        reverse("admin:reliable_events_parkedevent_changelist") + "?key=a"
    ).content.decode()
    assert "a-2" in parked
    assert "a-3" in parked
    detail = admin_client.get(
        reverse("admin:reliable_events_deadletter_change", args=[letter.pk])
    ).content.decode()
    assert "This dead letter holds key <strong>a</strong> of the ordered consumer" in detail
    assert "2 events are parked behind it</a>" in detail
    assert f"?consumer={consumer.name}&amp;key=a" in detail
    assert 'id="re-edit-blocked"' in detail  # not offered, then refused on submit
    assert 'id="re-edit"' not in detail
    status = outbox_status()
    assert (status.held_keys, status.parked_events) == (1, 2)
    overview_page = admin_client.get(reverse("admin:reliable_events_overview")).content.decode()
    assert "events parked behind 1 held key" in overview_page
    out = StringIO()
    call_command("outbox_status", "--skip-broker", stdout=out)
    assert "held keys (ordered consumers): 1, parked events: 2" in out.getvalue()

    state["fixed"] = True
    out = StringIO()
    call_command("retry_dead_letters", "--id", str(letter.pk), stdout=out)
    assert (
        f"retried #{letter.pk} {consumer.name} a-1 (permanent-error) -> its key released "
        "(the ordered consumer applies it in order)"
    ) in out.getvalue()
    assert "confirmed by the broker" not in out.getvalue()  # no outbox row: nothing to confirm
    consume(consumer)

    assert applied_ids(consumer) == ["b-1", "b-2", "a-1", "a-2", "a-3"]
    assert not KeyHold.objects.exists()
    assert not ParkedEvent.objects.exists()
    letter.refresh_from_db()
    assert letter.status == DeadLetter.Status.RETRIED
    publish(("a-4", "a"))  # the key flows again
    consume(consumer)
    assert applied_ids(consumer)[-1] == "a-4"


def test_discarding_the_dead_head_releases_the_parked_events_in_order(ordered_classic) -> None:
    def broken_head(consumer: EventConsumer, event: Event) -> None:
        if event.id == "a-1":
            raise PermanentError("bad data")

    consumer = ordered_classic(broken_head, hold=True)
    publish(("a-1", "a"), ("a-2", "a"), ("a-3", "a"))
    consume(consumer)
    assert applied_ids(consumer) == []
    letter = DeadLetter.objects.get()

    result = deadletters.discard([letter], note="bad data", user="ops")
    assert result.done == [letter.pk]
    consume(consumer)
    assert applied_ids(consumer) == ["a-2", "a-3"]
    assert not KeyHold.objects.exists()
    assert [e for e, _ in handled(consumer)].count("a-1") == 1  # discarded: never run again


def test_a_parked_event_that_fails_on_release_becomes_the_new_head(ordered_classic) -> None:
    bad = {"a-1", "a-2"}

    def broken(consumer: EventConsumer, event: Event) -> None:
        if event.id in bad:
            raise PermanentError(f"bad {event.id}")

    consumer = ordered_classic(broken, hold=True)
    publish(("a-1", "a"), ("a-2", "a"), ("a-3", "a"))
    consume(consumer)
    first = DeadLetter.objects.get()
    deadletters.discard([first], note="skip", user="ops")
    consume(consumer)
    # a-2 failed when released: it is the key's dead head now, a-3 still waits
    second = DeadLetter.objects.exclude(pk=first.pk).get()
    assert second.message_id == "a-2"
    assert KeyHold.objects.get().dead_letter_id == second.pk
    assert list(ParkedEvent.objects.values_list("message_id", flat=True)) == ["a-3"]
    # retrying the first (discarded) letter again is refused; the head is released in order
    bad.clear()
    deadletters.retry([second], user="ops")
    consume(consumer)
    assert applied_ids(consumer) == ["a-2", "a-3"]


def test_only_the_head_dead_letter_releases_a_key(ordered_classic) -> None:
    consumer = ordered_classic(hold=True)
    head = DeadLetter.objects.create(
        consumer=consumer.name,
        queue=consumer.name,
        message_id="x-1",
        topic="orders.created",
        key="x",
        payload={},
        reason="permanent-error",
        first_failed_at="2026-01-01T00:00:00Z",
        last_failed_at="2026-01-01T00:00:00Z",
    )
    older = DeadLetter.objects.create(
        consumer=consumer.name,
        queue=consumer.name,
        message_id="x-0",
        topic="orders.created",
        key="x",
        payload={},
        reason="permanent-error",
        first_failed_at="2026-01-01T00:00:00Z",
        last_failed_at="2026-01-01T00:00:00Z",
    )
    KeyHold.objects.create(consumer=consumer.name, key="x", dead_letter_id=head.pk)
    result = deadletters.retry([older], user="ops")
    assert older.pk in result.skipped
    assert "held by dead letter" in result.skipped[older.pk]
    edit = deadletters.edit_and_retry(head, {"fixed": True}, user="ops")
    assert "ordered consumer" in edit.skipped[head.pk]


# -- several processes -------------------------------------------------------------------------
def test_two_workers_share_the_partitions_and_each_key_stays_in_order(ordered_classic) -> None:
    consumer = ordered_classic()
    consumer.partitions = 4
    publish(*[(f"k{n % 10}-{n // 10}", f"k{n % 10}") for n in range(200)])
    workers = [Worker([consumer]) for _ in range(2)]
    threads = [threading.Thread(target=run_closing, args=(w, 5.0)) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    order = applied_ids(consumer)
    assert sorted(order) == sorted(f"k{n % 10}-{n // 10}" for n in range(200))
    for key in range(10):
        mine = [int(m.split("-")[1]) for m in order if m.startswith(f"k{key}-")]
        assert mine == sorted(mine), (key, mine)


# -- the database transport ------------------------------------------------------------------
@pytest.fixture
def ordered_db(clean_registry, settings) -> Callable[..., type[EventConsumer]]:
    settings.RELIABLE_EVENTS = {**settings.RELIABLE_EVENTS, "BROKER_URL": "db://"}

    def make(behaviour: Behaviour | None = None, **kwargs: Any) -> type[EventConsumer]:
        consumer = make_consumer(clean_registry, behaviour=behaviour, **kwargs)
        consumer.ordered = True
        consumer.hold_key_on_dead_letter = True
        return consumer

    return make


def test_database_transport_retries_in_place_and_holds_keys_in_order(ordered_db) -> None:
    def flaky(consumer: EventConsumer, event: Event) -> None:
        if event.id == "a-1" and event.attempt == 1:
            raise RuntimeError("once")
        if event.id == "b-1":
            raise PermanentError("bad")

    consumer = ordered_db(flaky, max_retries=2, retry_delays=[0.2])
    publish(("a-1", "a"), ("b-1", "b"), ("a-2", "a"), ("b-2", "b"), ("b-3", "b"))
    consume(consumer)
    assert applied_ids(consumer) == ["a-1", "a-2"]
    assert [c for c in handled(consumer) if c[0] == "a-1"] == [("a-1", 1), ("a-1", 2)]
    assert list(ParkedEvent.objects.values_list("message_id", flat=True)) == ["b-2", "b-3"]
    assert DeadLetter.objects.get().queue == consumer.name  # db://: its one queue
    deadletters.discard([DeadLetter.objects.get()], note="bad", user="ops")
    consume(consumer)
    assert applied_ids(consumer) == ["a-1", "a-2", "b-2", "b-3"]


def test_database_transport_workers_take_an_ordered_queue_one_at_a_time(ordered_db) -> None:
    def slow(consumer: EventConsumer, event: Event) -> None:
        time.sleep(0.002)

    consumer = ordered_db(slow)
    publish(*[(f"k{n % 5}-{n // 5}", f"k{n % 5}") for n in range(100)])
    workers = [Worker([consumer]) for _ in range(2)]
    threads = [threading.Thread(target=run_closing, args=(w, 2.0)) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    order = applied_ids(consumer)
    assert len(order) == 100
    for key in range(5):
        mine = [int(m.split("-")[1]) for m in order if m.startswith(f"k{key}-")]
        assert mine == sorted(mine), (key, mine)


def test_deliver_events_retries_an_ordered_consumer_in_place(clean_registry, settings) -> None:
    settings.RELIABLE_EVENTS = {**settings.RELIABLE_EVENTS, "PUBLISH_ON_COMMIT": False}

    def fail_once(consumer: EventConsumer, event: Event) -> None:
        if event.id == "a-1" and event.attempt == 1:
            raise RuntimeError("once")

    consumer = make_consumer(clean_registry, behaviour=fail_once, max_retries=1)
    consumer.ordered = True
    with transaction.atomic():
        for message_id in ("a-1", "a-2"):
            publish_event("orders.created", {}, key="a", message_id=message_id)
    report = deliver_events(consumer)
    assert [(d.message_id, d.attempt, d.outcome) for d in report.deliveries] == [
        ("a-1", 1, Outcome.RETRIED),
        ("a-1", 2, Outcome.PROCESSED),
        ("a-2", 1, Outcome.PROCESSED),
    ]
