"""The database transport (``db://``): routing, the claim in the handler's transaction,
retries through ``available_at``, poison bodies, idle back-off and wake-up.

Runs on PostgreSQL and on SQLite (both tiers of ``scripts/test``); the process-level
guarantee (SIGKILL at any moment) is the ledger in ``tests/integration``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import DatabaseError, connection, connections, transaction
from django.test.utils import CaptureQueriesContext

from reliable_events import publish_event
from reliable_events.broker import KEY_HEADER, UNROUTABLE_QUEUE, OutgoingMessage, open_publisher
from reliable_events.broker.queue_rows import CHANNEL, table_name
from reliable_events.checks import reliable_events_checks
from reliable_events.consumer import Event, EventConsumer
from reliable_events.consuming import ATTEMPT_HEADER, NOT_JSON, TOO_LARGE, Worker
from reliable_events.database_transport import (
    DatabasePublisher,
    DatabaseTransport,
    insert_rows,
    queue_row,
)
from reliable_events.exceptions import ConfigurationError, InvalidEvent, PermanentError
from reliable_events.models import DeadLetter, ProcessedMessage, QueuedMessage
from reliable_events.relay import relay_once
from reliable_events.routing import binding_matches
from reliable_events.topology import events_topology
from tests.support.consumer_support import applied, make_consumer
from tests.support.producer_support import free_port

pytestmark = pytest.mark.django_db(transaction=True)

URL = "db://"


@pytest.fixture(autouse=True)
def database_broker(re_settings: Any) -> None:
    re_settings(BROKER_URL=URL, EXCHANGE="events")


def message(topic: str, message_id: str, *, queue: str = "", **headers: Any) -> OutgoingMessage:
    return OutgoingMessage(
        ref=message_id,
        exchange="" if queue else "events",
        routing_key=queue or topic,
        body=b'{"n": 1}',
        message_id=message_id,
        topic=topic,
        headers=headers,
    )


def rows() -> list[tuple[str, str]]:
    return sorted(QueuedMessage.objects.values_list("queue", "message_id"))


def put(queue: str, body: bytes, message_id: str, topic: str = "orders.created") -> None:
    """A row as any writer of the table could leave it (the body is not checked)."""
    row = queue_row(
        queue, message_id=message_id, topic=topic, headers={}, body=body, published_at=None
    )
    insert_rows(connection.alias, [row])


# -- routing ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("binding", "key", "expected"),
    [
        ("orders.created", "orders.created", True),
        ("orders.created", "orders.paid", False),
        ("orders.*", "orders.created", True),
        ("orders.*", "orders", False),
        ("orders.*", "orders.created.eu", False),
        ("orders.#", "orders", True),
        ("orders.#", "orders.created.eu", True),
        ("#", "anything.at.all", True),
        ("#.eu", "orders.created.eu", True),
        ("#.eu", "eu", True),
        ("*.created.#", "orders.created", True),
        ("*.created.#", "created", False),
        ("orders.#.eu", "orders.eu", True),
        ("orders.#.eu", "orders.a.b.eu", True),
        ("orders.#.eu", "orders.a.b.us", False),
    ],
)
def test_bindings_match_like_a_rabbitmq_topic_exchange(binding, key, expected):
    assert binding_matches(binding, key) is expected


def test_publish_inserts_one_row_per_bound_queue_and_keeps_unrouted_events(clean_registry, caplog):
    star = make_consumer(clean_registry, topics=["orders.*"])
    hash_ = make_consumer(clean_registry, topics=["orders.#", "payments.created"])
    publisher = open_publisher()
    assert isinstance(publisher, DatabasePublisher)
    result = publisher.publish(
        [
            message("orders.created", "m-1"),
            message("orders.created.eu", "m-2"),
            message("payments.created", "m-3"),
            message("shipping.sent", "m-4"),
        ],
        timeout=1,
    )
    assert result.confirmed == ["m-1", "m-2", "m-3", "m-4"]
    assert rows() == sorted(
        [
            (star.name, "m-1"),
            (hash_.name, "m-1"),
            (hash_.name, "m-2"),
            (hash_.name, "m-3"),
            ("events.unrouted", "m-4"),
        ]
    )
    assert "1 event(s) matched no consumer queue and were kept in events.unrouted" in caplog.text


def test_republish_unrouted_moves_the_rows_whose_topic_is_bound_now_and_keeps_the_rest(
    clean_registry, monkeypatch
):
    """What the unrouted probe (``outbox_status --fail-on-unrouted``) points to works on
    ``db://`` too: each row goes to every queue bound for its topic now, a chunk per
    transaction, the others stay; the key and headers travel with it."""
    monkeypatch.setattr("reliable_events.broker.database.REPUBLISH_CHUNK", 2)
    open_publisher().publish(
        [message("orders.created", f"m-{n}", **{KEY_HEADER: f"k{n}", "t": "a"}) for n in range(3)]
        + [message("shipping.sent", "m-ship")],
        timeout=1,
    )
    assert rows() == [("events.unrouted", m) for m in ("m-0", "m-1", "m-2", "m-ship")]
    out = StringIO()
    call_command("republish_unrouted", "--dry-run", stdout=out)
    assert "4 event(s) in 'events.unrouted' (dry run: nothing moved)" in out.getvalue()
    one = make_consumer(clean_registry, topics=["orders.*"])
    two = make_consumer(clean_registry, topics=["orders.#"])

    out, err = StringIO(), StringIO()
    with pytest.raises(CommandError) as info:
        call_command("republish_unrouted", stdout=out, stderr=err)
    assert info.value.returncode == 5  # m-ship: still no queue for its topic
    assert "republish_unrouted: 3 of 4 event(s) re-published from 'events.unrouted'" in (
        out.getvalue()
    )
    assert "declared" not in out.getvalue()  # nothing to declare on db://
    assert rows() == sorted(
        [(one.name, f"m-{n}") for n in range(3)]
        + [(two.name, f"m-{n}") for n in range(3)]
        + [("events.unrouted", "m-ship")]
    )
    moved = QueuedMessage.objects.get(queue=one.name, message_id="m-1")
    assert (moved.key, moved.headers["t"], bytes(moved.body)) == ("k1", "a", b'{"n": 1}')

    stats = Worker([one, two]).run(until_idle=0.3)
    assert stats.processed == 6
    assert applied(one) == applied(two) == 3


def test_declare_topology_on_db_says_there_is_nothing_to_declare(clean_registry):
    make_consumer(clean_registry)
    out = StringIO()
    call_command("declare_topology", stdout=out)
    assert out.getvalue().strip() == (
        "declare_topology: nothing to declare on db:// (its queues are rows of a table, "
        "routed by the registered consumers' topics); the table exists"
    )


def test_a_message_addressed_to_a_queue_goes_there_only_and_an_unknown_queue_fails(
    clean_registry,
):
    first = make_consumer(clean_registry, topics=["orders.*"])
    make_consumer(clean_registry, topics=["orders.*"])
    result = open_publisher().publish(
        [
            message("orders.created", "m-1", queue=first.name),
            message("orders.created", "m-2", queue="nobody"),
        ],
        timeout=1,
    )
    assert result.confirmed == ["m-1"]
    assert result.failed == {"m-2": UNROUTABLE_QUEUE}
    assert rows() == [(first.name, "m-1")]


def test_the_relay_publishes_into_the_table_and_marks_sent(clean_registry):
    consumer = make_consumer(clean_registry, topics=["orders.*"])
    with transaction.atomic():
        publish_event("orders.created", {"n": 1}, key="k1", message_id="m-1")
    relay_once()
    [row] = QueuedMessage.objects.all()
    assert (row.queue, row.message_id, row.topic, row.key) == (
        consumer.name,
        "m-1",
        "orders.created",
        "k1",
    )
    assert bytes(row.body) == b'{"n": 1}'
    assert row.headers[KEY_HEADER] == "k1"


# -- consuming ------------------------------------------------------------------------------
def test_events_are_applied_once_and_their_rows_deleted(clean_registry):
    consumer = make_consumer(clean_registry)
    open_publisher().publish(
        [
            message("orders.created", "m-1"),
            message("orders.created", "m-1"),
            message("orders.paid", "m-2"),
        ],
        timeout=1,
    )
    stats = Worker([consumer]).run(until_idle=0.3)
    assert (stats.processed, stats.duplicates) == (2, 1)
    assert applied(consumer, "m-1") == applied(consumer, "m-2") == 1
    assert not QueuedMessage.objects.exists()
    [event] = [e for e in consumer.calls if e.id == "m-2"]
    assert (event.topic, event.payload, event.attempt) == ("orders.paid", {"n": 1}, 1)


def test_the_row_is_deleted_in_the_handlers_transaction_and_comes_back_if_it_dies(
    clean_registry,
):
    """The claim, the idempotency record and the effects are one transaction: a process
    that dies in the handler (here: an exception no handler code catches, as SIGKILL
    would end it) leaves the row in its queue and nothing applied."""
    seen: list[bool] = []

    def die_first_time(consumer: EventConsumer, event: Event) -> None:
        seen.append(QueuedMessage.objects.filter(message_id=event.id).exists())
        if len(seen) == 1:
            raise KeyboardInterrupt("killed in the handler")

    consumer = make_consumer(clean_registry, behaviour=die_first_time)
    open_publisher().publish([message("orders.created", "m-1")], timeout=1)
    with pytest.raises(KeyboardInterrupt):
        Worker([consumer]).run(until_idle=0.3)
    assert seen == [False]  # deleted by the claim, inside the handler's transaction
    assert rows() == [(consumer.name, "m-1")]  # rolled back: back in its queue
    assert applied(consumer, "m-1") == 0
    assert not ProcessedMessage.objects.exists()
    Worker([consumer]).run(until_idle=0.3)
    assert applied(consumer, "m-1") == 1
    assert not QueuedMessage.objects.exists()


def test_a_failed_handler_is_retried_through_available_at(clean_registry):
    def fail_once(consumer: EventConsumer, event: Event) -> None:
        if event.attempt == 1:
            raise RuntimeError("first time")

    consumer = make_consumer(clean_registry, retry_delays=[0.6], behaviour=fail_once)
    open_publisher().publish([message("orders.created", "m-1", **{KEY_HEADER: "k"})], timeout=1)
    worker = Worker([consumer])
    worker.run(max_messages=1)
    [row] = QueuedMessage.objects.all()
    assert (row.queue, row.attempt, row.headers[ATTEMPT_HEADER], row.key) == (
        consumer.name,
        2,
        2,
        "k",
    )
    assert row.available_at > row.created_at
    assert applied(consumer, "m-1") == 0
    started = time.monotonic()
    stats = Worker([consumer]).run(max_messages=1)
    waited = time.monotonic() - started
    assert stats.processed == 1
    assert waited >= 0.4  # not before it was due (database clock vs ours: a little slack)
    assert [e.attempt for e in consumer.calls] == [1, 2]
    assert applied(consumer, "m-1") == 1
    assert not QueuedMessage.objects.exists()


def test_exhausted_retries_become_a_dead_letter_and_the_row_goes(clean_registry, use_tz):
    def fail(consumer: EventConsumer, event: Event) -> None:
        raise RuntimeError(f"boom {event.attempt}")

    consumer = make_consumer(clean_registry, max_retries=1, retry_delays=[0], behaviour=fail)
    open_publisher().publish([message("orders.created", "m-1")], timeout=1)
    stats = Worker([consumer]).run(until_idle=0.3)
    assert (stats.retried, stats.dead_lettered) == (1, 1)
    letter = DeadLetter.objects.get()
    assert (letter.message_id, letter.reason, letter.attempts) == ("m-1", "retries-exhausted", 2)
    assert not QueuedMessage.objects.exists()


@pytest.mark.parametrize(
    "body", [b"", b'{"n": 1', b"\xff\xfe"], ids=["empty", "truncated", "binary"]
)
def test_a_body_that_cannot_be_decoded_is_dead_lettered_and_the_loop_goes_on(clean_registry, body):
    consumer = make_consumer(clean_registry)
    put(consumer.name, body, "bad")
    put(consumer.name, b'{"n": 2}', "good")
    stats = Worker([consumer]).run(until_idle=0.3)
    assert (stats.poison, stats.processed) == (1, 1)
    letter = DeadLetter.objects.get()
    assert (letter.message_id, letter.reason) == ("bad", NOT_JSON)
    assert letter.error_message.startswith("body is not")
    assert applied(consumer, "good") == 1
    assert not QueuedMessage.objects.exists()


def test_a_payload_publish_event_accepts_is_applied_however_its_stored_text_is_spaced(
    clean_registry, re_settings
):
    re_settings(MAX_PAYLOAD_BYTES=2000, PUBLISH_ON_COMMIT=False)
    consumer = make_consumer(clean_registry)
    at_limit = {"n": 10, "items": [0] * 991}
    assert len(json.dumps(at_limit, separators=(",", ":"))) == 2000
    publish_event("orders.created", at_limit, message_id="at-limit")
    with pytest.raises(InvalidEvent, match="payload is 2002 bytes"):
        publish_event("orders.created", {**at_limit, "items": [0] * 992}, message_id="over")
    relay_once()
    (body,) = QueuedMessage.objects.values_list("body", flat=True)
    assert len(bytes(body)) > 2000  # the stored text's spaces (", ", ": ") went with it

    stats = Worker([consumer]).run(until_idle=0.3)
    assert (stats.processed, stats.poison) == (1, 0)
    assert applied(consumer, "at-limit") == 1
    assert not DeadLetter.objects.exists()

    over = json.dumps({"items": [0] * 995}).encode()  # 2,001 bytes as compact JSON
    put(consumer.name, over, "too-large")
    put(consumer.name, b"x" * 2001, "too-large-text")
    Worker([consumer]).run(until_idle=0.3)
    letters = dict(DeadLetter.objects.values_list("message_id", "error_message"))
    assert letters == {
        "too-large": f"payload is 2001 bytes (body {len(over)}), over MAX_PAYLOAD_BYTES (2000)",
        "too-large-text": "payload is 2001 bytes (body 2001), over MAX_PAYLOAD_BYTES (2000)",
    }
    assert set(DeadLetter.objects.values_list("reason", flat=True)) == {TOO_LARGE}


def test_batches_share_one_transaction_and_a_failure_is_retried_alone(clean_registry):
    def fail_m3_once(consumer: EventConsumer, event: Event) -> None:
        if event.id == "m-3" and event.attempt == 1:
            raise RuntimeError("m-3 fails once")

    consumer = make_consumer(clean_registry, retry_delays=[0], behaviour=fail_m3_once)
    consumer.batch_size = 5  # on db:// only the consumer's own batch_size batches
    batches: list[int] = []
    process_batch = consumer.process_batch

    def spy(self: EventConsumer, events: Any, **kwargs: Any) -> Any:
        batches.append(len(events))
        return process_batch(self, events, **kwargs)

    consumer.process_batch = spy  # type: ignore[method-assign]
    open_publisher().publish([message("orders.created", f"m-{n}") for n in range(12)], timeout=1)
    stats = Worker([consumer]).run(until_idle=0.3)
    assert max(batches, default=0) == 5
    assert stats.processed == 12
    assert stats.retried == 1
    calls = [event.id for event in consumer.calls]
    assert calls.count("m-3") == 2  # its savepoint rolled back alone, retried
    assert all(calls.count(f"m-{n}") == 1 for n in range(12) if n != 3)
    assert all(applied(consumer, f"m-{n}") == 1 for n in range(12))
    assert not QueuedMessage.objects.exists()


def test_an_idle_consumer_backs_off_and_wakes_when_a_row_arrives(clean_registry, re_settings):
    re_settings(DATABASE_POLL_MAX=0.3)
    consumer = make_consumer(clean_registry)
    transport = DatabaseTransport(URL, [consumer], prefetch=1)
    transport.connect()
    try:
        with CaptureQueriesContext(connection) as queries:
            started = time.monotonic()
            assert transport.get(1.5) is None
            idle = time.monotonic() - started
        assert 1.4 <= idle < 3.0
        # Bounded back-off: ~0.01, 0.02, ... 0.3 s, not a busy loop (hundreds of queries).
        assert 3 <= len(queries) <= 25, len(queries)

        delivery, woke = get_with_a_late_publish(transport, "m-late", after=0.8, wait=5.0)
        assert delivery is not None
        assert delivery.message_id == "m-late"
        assert woke < 0.8 + 0.3 + 0.5  # within one back-off step (PostgreSQL: NOTIFY)
        transport.ack(delivery)
    finally:
        transport.close()
    assert not QueuedMessage.objects.exists()


def test_a_consumer_on_another_database_is_refused(clean_registry):
    consumer = make_consumer(clean_registry)
    consumer.database = "other"
    transport = DatabaseTransport(URL, [consumer], prefetch=1)
    with pytest.raises(Exception, match="must be one database"):
        transport.connect()


# -- checks ---------------------------------------------------------------------------------
def _ids(re_settings: Any, url: str) -> list[str]:
    re_settings(BROKER_URL=url)
    return [m.id for m in reliable_events_checks() if m.id and m.id.startswith("reliable_events")]


def test_checks_accept_db_and_refuse_filesystem(re_settings):
    assert _ids(re_settings, "db://") == []
    assert _ids(re_settings, "filesystem://") == ["reliable_events.E010"]
    assert _ids(re_settings, "db://nowhere") == ["reliable_events.E010"]


def test_a_retried_dead_letter_goes_back_to_its_consumers_queue_only(clean_registry):
    state = {"fixed": False}

    def broken_until_fixed(consumer: EventConsumer, event: Event) -> None:
        if not state["fixed"]:
            raise PermanentError("not yet")

    consumer = make_consumer(clean_registry, behaviour=broken_until_fixed)
    other = make_consumer(clean_registry)
    open_publisher().publish([message("orders.created", "m-1")], timeout=1)
    Worker([consumer]).run(until_idle=0.3)
    letter = DeadLetter.objects.get(consumer=consumer.name)
    state["fixed"] = True
    call_command("retry_dead_letters", "--id", str(letter.pk), stdout=StringIO())
    assert rows() == sorted([(other.name, "m-1"), (consumer.name, "m-1")])
    Worker([consumer]).run(until_idle=0.3)
    assert applied(consumer, "m-1") == 1
    assert rows() == [(other.name, "m-1")]  # the other consumer's copy, never duplicated


def test_queued_messages_are_listed_read_only_in_the_admin(clean_registry, admin_client):
    open_publisher().publish([message("nobody.listens", "m-unrouted")], timeout=1)
    response = admin_client.get("/admin/reliable_events/queuedmessage/")
    assert response.status_code == 200
    assert b"m-unrouted" in response.content
    assert b"events.unrouted" in response.content
    row = QueuedMessage.objects.get()
    assert (
        admin_client.get(f"/admin/reliable_events/queuedmessage/{row.pk}/change/").status_code
        == 200
    )
    assert admin_client.get("/admin/reliable_events/queuedmessage/add/").status_code == 403


def get_with_a_late_publish(
    transport: DatabaseTransport, message_id: str, *, after: float, wait: float
) -> tuple[Any, float]:
    """``transport.get(wait)`` while another thread publishes ``message_id`` ``after``
    seconds in: the delivery and how long the get took."""

    def publish_later() -> None:
        time.sleep(after)
        try:
            open_publisher().publish([message("orders.created", message_id)], timeout=1)
        finally:
            connections.close_all()

    thread = threading.Thread(target=publish_later)
    started = time.monotonic()
    thread.start()
    delivery = transport.get(wait)
    woke = time.monotonic() - started
    thread.join()
    return delivery, woke


@pytest.fixture
def pg_transport(clean_registry) -> Iterator[DatabaseTransport]:
    """A connected ``db://`` transport of one consumer on PostgreSQL (``LISTEN``/``NOTIFY``
    are PostgreSQL's: skipped elsewhere), closed afterwards."""
    if connection.vendor != "postgresql":
        pytest.skip("LISTEN/NOTIFY is PostgreSQL's")
    transport = DatabaseTransport(URL, [make_consumer(clean_registry)], prefetch=1)
    transport.connect()
    try:
        yield transport
    finally:
        transport.close()


@pytest.mark.postgres
def test_postgresql_wakes_an_idle_consumer_at_once_through_notify(pg_transport, re_settings):
    """With polling pushed out to 10 s, only the publish's NOTIFY can wake it in time."""
    re_settings(DATABASE_POLL_MAX=10.0)
    transport = pg_transport
    assert transport.get(3.0) is None  # idle: the listener is up, the back-off is ~2.5 s

    delivery, woke = get_with_a_late_publish(transport, "m-notified", after=0.5, wait=8.0)
    assert delivery is not None
    assert delivery.message_id == "m-notified"
    assert woke < 0.5 + 1.0, woke
    transport.ack(delivery)


def test_a_database_failure_while_processing_rolls_the_claim_back(clean_registry, monkeypatch):
    """The idempotency record cannot be written (here: SQLite's "database is locked"
    once): the claim is rolled back, the row is in its queue again, and the worker
    processes it once the database answers."""
    from django.db import OperationalError

    from reliable_events.consumer.idempotency import insert_record as real

    failures = [OperationalError("database is locked")]

    def flaky(*args: Any) -> bool:
        if failures:
            raise failures.pop()
        return real(*args)

    # EventConsumer.process calls the name imported into consumer.base.
    monkeypatch.setattr("reliable_events.consumer.base.insert_record", flaky)
    consumer = make_consumer(clean_registry)
    open_publisher().publish([message("orders.created", "m-1")], timeout=1)
    stats = Worker([consumer]).run(until_idle=0.5)
    assert (stats.database_outages, stats.requeued, stats.processed) == (1, 1, 1)
    assert applied(consumer, "m-1") == 1
    assert not QueuedMessage.objects.exists()


def test_a_claim_left_unsettled_or_requeued_goes_back_and_a_late_ack_changes_nothing(
    clean_registry,
):
    consumer = make_consumer(clean_registry)
    open_publisher().publish(
        [message("orders.created", "m-1"), message("orders.created", "m-2")], timeout=1
    )
    transport = DatabaseTransport(URL, [consumer], prefetch=1)
    transport.connect()
    try:
        assert transport.take_more(consumer.name, 5) == []  # no claim open to add to
        first = transport.get(1.0)
        assert first is not None
        assert first.message_id == "m-1"
        again = transport.get(1.0)  # ``first`` was never settled: rolled back first
        assert again is not None
        assert again.message_id == "m-1"
        transport.ack(first)  # of a transaction rolled back: nothing to commit
        transport.requeue(again)
        assert rows() == [(consumer.name, "m-1"), (consumer.name, "m-2")]
        last = transport.get(1.0)
        assert last is not None
        transport.ack(last)
        assert rows() == [(consumer.name, "m-2")]
    finally:
        transport.close()


def test_an_ack_of_a_transaction_marked_for_rollback_leaves_the_row_in_its_queue(
    clean_registry, caplog
):
    """A handler swallowed a database error outside a savepoint: Django marked the claim's
    transaction for rollback, so the ack cannot commit it; the row stays to be retried."""
    consumer = make_consumer(clean_registry)
    open_publisher().publish([message("orders.created", "m-1")], timeout=1)
    transport = DatabaseTransport(URL, [consumer], prefetch=1)
    transport.connect()
    try:
        delivery = transport.get(1.0)
        assert delivery is not None
        with pytest.raises(DatabaseError), transaction.atomic(savepoint=False):
            connection.cursor().execute("SELECT * FROM no_such_table_here")
        transport.ack(delivery)
    finally:
        transport.close()
    assert "the transaction of m-1 was marked for rollback" in caplog.text
    assert rows() == [(consumer.name, "m-1")]
    stats = Worker([consumer]).run(until_idle=0.3)
    assert stats.processed == 1
    assert applied(consumer, "m-1") == 1


def test_publishing_nothing_writes_nothing_and_a_missing_table_is_named_at_declare(
    clean_registry,
):
    publisher = DatabasePublisher(URL)
    result = publisher.publish([], timeout=1)
    assert (result.confirmed, result.failed) == ([], {})
    publisher.declare(events_topology())  # the table is there: nothing to say

    table = table_name(connection.alias)
    with transaction.atomic():
        connection.cursor().execute(f"ALTER TABLE {table} RENAME TO re_queue_away")
        with pytest.raises(ConfigurationError, match=r"table is missing .*run manage.py migrate"):
            publisher.declare(events_topology())
        transaction.set_rollback(True)  # the rename is undone with the rest
    assert not QueuedMessage.objects.exists()  # the table is back


@pytest.mark.postgres
def test_a_lost_listen_connection_falls_back_to_polling_and_listens_again(
    pg_transport, re_settings
):
    re_settings(DATABASE_POLL_MAX=0.2)
    transport = pg_transport
    assert transport.get(0.5) is None  # idle: listening
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND query = %s",
            [f"LISTEN {CHANNEL}"],
        )
        assert cursor.fetchone() == (1,)
    assert transport.get(0.5) is None  # the wait fails: it sleeps instead
    open_publisher().publish([message("orders.created", "m-1")], timeout=1)
    delivery = transport.get(5.0)  # found by polling
    assert delivery is not None
    transport.ack(delivery)
    assert transport.get(0.5) is None  # and listening again (a new connection)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND query = %s",
            [f"LISTEN {CHANNEL}"],
        )
        assert cursor.fetchone() == (1,)


@pytest.mark.postgres
def test_a_consumer_that_cannot_listen_warns_once_and_polls(pg_transport, re_settings, caplog):
    """The listener's own connection is refused (a port nobody listens on) while the
    consumer's connection works: new rows are still found, by polling, and the warning
    comes once per streak of failures."""
    re_settings(DATABASE_POLL_MAX=0.2)
    transport = pg_transport
    connections[transport.alias].ensure_connection()  # kept: only new connections fail
    settings_dict = connections[transport.alias].settings_dict
    port = settings_dict["PORT"]
    caplog.set_level(logging.DEBUG, logger="reliable_events")
    try:
        settings_dict["PORT"] = str(free_port())
        assert transport.get(0.3) is None
        transport._listen_retry_at = 0.0  # the next wait tries again (else 5 s later)
        assert transport.get(0.3) is None
        open_publisher().publish([message("orders.created", "m-polled")], timeout=1)
        delivery = transport.get(5.0)
        assert delivery is not None
        assert delivery.message_id == "m-polled"
        transport.ack(delivery)
        said = [r for r in caplog.records if "cannot LISTEN" in r.getMessage()]
        assert [r.levelno for r in said] == [logging.WARNING] + [logging.DEBUG] * (len(said) - 1)
        assert len(said) >= 2
        settings_dict["PORT"] = port
        transport._listen_retry_at = 0.0
        assert transport.get(0.3) is None  # listening again: the streak is over
        assert transport._listener is not None
    finally:
        settings_dict["PORT"] = port


# -- an ordered consumer's retry ------------------------------------------------------------
def test_an_ordered_retry_waits_without_holding_a_transaction(clean_registry: Any) -> None:
    """A trial on SQLite: an ordered consumer's retry kept its claim's transaction open
    for the whole delay, so the one write lock was held: a publish and a triage request
    failed with "database is locked" after 30 s. The row now goes back to the head of
    its queue under its id, due later, and the rows behind it wait for it."""
    calls: list[tuple[str, int, float]] = []

    def fail_first(consumer: EventConsumer, event: Event) -> None:
        calls.append((event.id, event.attempt, time.monotonic()))
        if event.id == "a-1" and event.attempt == 1:
            raise RuntimeError("once")

    consumer = make_consumer(clean_registry, behaviour=fail_first, max_retries=1)
    consumer.ordered = True
    consumer.retry_delays = [2.0]
    with transaction.atomic():
        for message_id, key in (("a-1", "a"), ("b-1", "b"), ("a-2", "a")):
            publish_event("orders.created", {}, key=key, message_id=message_id)
    head = QueuedMessage.objects.get(message_id="a-1").pk
    worker = Worker([consumer], url=URL)

    def run() -> None:
        try:
            worker.run(until_idle=3.0)
        finally:
            connections.close_all()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not calls and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # the retry waits now
        started = time.monotonic()
        with transaction.atomic():  # a write beside it, as a web request makes
            publish_event("billing.other", {}, message_id="beside-1")  # no consumer
        assert time.monotonic() - started < 1.0
        waiting = QueuedMessage.objects.get(message_id="a-1")
        assert (waiting.pk, waiting.attempt) == (head, 2)  # its place, its next attempt
    finally:
        thread.join(60)
    assert [(c[0], c[1]) for c in calls] == [("a-1", 1), ("a-1", 2), ("b-1", 1), ("a-2", 1)]
    assert calls[1][2] - calls[0][2] >= 2.0  # the delay was kept
    assert [applied(consumer, m) for m in ("a-1", "b-1", "a-2")] == [1, 1, 1]
    assert worker.stats.retried == 1
