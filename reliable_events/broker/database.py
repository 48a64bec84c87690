"""The database transport (``BROKER_URL = "db://"``): queues in a table of the app's database.

Messages are :class:`~reliable_events.models.QueuedMessage` rows in the consumers'
database (``db://``: the default alias; ``db://<alias>``), PostgreSQL or SQLite.  Both
directions live here, like a kombu transport module (docs/relay.md, docs/consumers.md):

* **Publishing** (:class:`DatabasePublisher`): one row per consumer queue bound to the
  topic (AMQP wildcards, :mod:`reliable_events.routing`), unrouted events to
  ``<EXCHANGE>.unrouted``, all of a call in one transaction: the commit is the confirm.
  On PostgreSQL the transaction also sends a ``NOTIFY``.
* **Consuming** (:class:`DatabaseTransport`, run by the usual Worker): a delivery is
  claimed by deleting its row (PostgreSQL: picked ``FOR UPDATE SKIP LOCKED``; SQLite: the
  delete takes the single write lock) in a transaction that stays open while the
  consumer runs; its ``ProcessedMessage``, the handler's writes, a retry row or a dead
  letter commit with the delete - the commit is the ack.  A process killed at any
  moment rolls back: the row is in its queue again, nothing was held in memory.
* **Retries** are rows inserted in that transaction, due later (``available_at``).
* **Idle**: a bounded exponential back-off (``DATABASE_POLL_MAX``), never past the next
  retry's due time; on PostgreSQL a ``LISTEN`` connection wakes it at once.

Ordered consumers (``EventConsumer.ordered``) keep one queue here (no partitions): one
process at a time claims from it (a transaction-level advisory lock on PostgreSQL; SQLite
has one writer), so a key's events are applied in order.  An in-place retry puts the
claimed row back under its id, due later (:meth:`DatabaseTransport.retry_later`), and
only the head of such a queue is claimed once due: the queue waits for it without a
transaction held open.

Not there: a redelivery counter and ``redelivered`` flags (a rolled-back claim leaves no
trace, as on a classic RabbitMQ queue).
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from django.db import DatabaseError, InterfaceError, connections
from django.db import transaction as db_transaction
from django.utils.dateparse import parse_datetime

from reliable_events import pg_listen
from reliable_events.broker.base import (
    CONTENT_ENCODING,
    CONTENT_TYPE,
    KEY_HEADER,
    UNROUTABLE_QUEUE,
    Delivery,
    OutgoingMessage,
    Publisher,
    PublishResult,
    Transport,
)
from reliable_events.broker.queue_rows import (
    CHANNEL,
    DIALECTS,
    Dialect,
    claim_rows,
    dialect_for,
    due_in,
    insert_rows,
    load_headers,
    queue_row,
    table_name,
)
from reliable_events.broker_url import DATABASE_SCHEME
from reliable_events.conf import app_settings
from reliable_events.consumer import Event, EventConsumer
from reliable_events.consumer.db import database_guard
from reliable_events.consumer.failures import Failure
from reliable_events.consumer.retries import RetryScheduler, retry_headers
from reliable_events.db import queue_alias
from reliable_events.exceptions import ConfigurationError, DatabaseUnavailable
from reliable_events.models import QueuedMessage
from reliable_events.routing import Routes
from reliable_events.runner import StopFlag
from reliable_events.sanitize import describe_error
from reliable_events.times import as_instant, from_column
from reliable_events.topology import UNROUTED_SUFFIX, Topology
from reliable_events.unrouted import RepublishReport

logger = logging.getLogger(__name__)

#: Kept importable from here: the queue rows' SQL moved to ``broker/queue_rows.py``.
__all__ = [
    "CHANNEL",
    "DIALECTS",
    "FIRST_PAUSE",
    "SCHEME",
    "DatabasePublisher",
    "DatabaseRetryScheduler",
    "DatabaseTransport",
    "Dialect",
    "alias_for",
    "dialect_for",
    "insert_rows",
    "queue_row",
]

SCHEME = DATABASE_SCHEME
#: First pause of an idle consumer, seconds (doubled per empty look, up to DATABASE_POLL_MAX).
FIRST_PAUSE = 0.01
#: A busy consumer reads (and drops) the notifications it has not waited for this often.
_DRAIN_EVERY = 1.0


#: The database of a ``db://`` URL (kept under its old name).
alias_for = queue_alias

#: Advisory-lock namespace of ordered consumers' queues ("REOQ").
ORDERED_QUEUE_LOCK_NAMESPACE = 0x52454F51


# -- publishing -----------------------------------------------------------------------
class DatabasePublisher(Publisher):
    """Inserts one row per bound queue, all of a call in one transaction (its confirm)."""

    def __init__(
        self, url: str, *, connect_timeout: float | None = None, window: int | None = None
    ) -> None:
        self.url = url
        self.alias = alias_for(url)
        self.last_used = 0.0

    @property
    def connected(self) -> bool:
        return True  # Django opens the database connection on use

    def declare(self, topology: Topology) -> None:
        """Nothing to declare (routing follows the registered consumers): check the table."""
        dialect_for(self.alias)
        try:
            with connections[self.alias].cursor() as cursor:
                cursor.execute(f"SELECT 1 FROM {table_name(self.alias)} WHERE 1 = 0", [])  # noqa: S608
        except (DatabaseError, InterfaceError) as exc:
            raise ConfigurationError(
                f"the database transport's table is missing in {self.alias!r} "
                f"({type(exc).__name__}): run manage.py migrate"
            ) from exc

    def close(self) -> None:
        """Nothing to close: the connection is Django's."""

    def publish(
        self, messages: Sequence[OutgoingMessage], *, timeout: float, wait: bool = True
    ) -> PublishResult:
        """Store ``messages``; confirmed = committed (``wait`` changes nothing)."""
        result = PublishResult()
        if not messages:
            return result
        routes = Routes.current()
        rows: list[tuple[Any, ...]] = []
        stored: list[Hashable] = []
        unrouted: dict[str, int] = {}
        for message in messages:
            queues, diverted = routes.targets(message)
            if not queues:
                result.failed[message.ref] = UNROUTABLE_QUEUE
                continue
            if diverted:
                unrouted[message.topic] = unrouted.get(message.topic, 0) + 1
            rows.extend(queue_row(queue, message) for queue in queues)
            stored.append(message.ref)
        try:
            with db_transaction.atomic(using=self.alias):
                insert_rows(self.alias, rows)
        except (DatabaseError, InterfaceError) as exc:
            reason = describe_error(exc, self.url)
            result.fail(stored, reason)
            logger.warning("reliable_events: publish failed: %s", reason)
            return result
        finally:
            self.last_used = time.monotonic()
        result.confirmed.extend(stored)
        if unrouted:
            logger.warning(
                "reliable_events: %d event(s) matched no consumer queue and were kept in %s%s: %s",
                sum(unrouted.values()),
                routes.exchange,
                UNROUTED_SUFFIX,
                ", ".join(f"{topic} x{count}" for topic, count in sorted(unrouted.items())),
            )
        return result


#: Unrouted rows moved per transaction by :func:`republish_unrouted_rows`.
REPUBLISH_CHUNK = 500


def republish_unrouted_rows(
    url: str,
    *,
    dry_run: bool = False,
    limit: int | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> RepublishReport:
    """Send the rows of ``<EXCHANGE>.unrouted`` to the queues bound to their topic now.

    A chunk per transaction: each row whose topic a registered consumer's queue is bound
    to is inserted there (one row per queue, same message id, headers and body) and
    deleted from the unrouted queue, in one commit (a crash moves all of a chunk or none
    of it).  Rows still without a queue stay, in order.  Bounded by the queue's depth at
    the start (and ``limit``); ``dry_run`` only counts.
    """
    alias = alias_for(url)
    routes = Routes.current()
    queue = f"{routes.exchange}{UNROUTED_SUFFIX}"
    rows = QueuedMessage.objects.using(alias).filter(queue=queue)
    report = RepublishReport(queue=queue, dry_run=dry_run, at_start=rows.count())
    budget = report.at_start if limit is None else min(limit, report.at_start)
    seen, after = 0, 0
    while not dry_run and seen < budget:
        with db_transaction.atomic(using=alias):
            chunk = list(
                rows.select_for_update(skip_locked=True)
                .filter(id__gt=after)
                .order_by("id")[: min(REPUBLISH_CHUNK, budget - seen)]
            )
            if not chunk:
                break
            seen, after = seen + len(chunk), chunk[-1].pk
            moved = [row for row in chunk if routes.for_topic(row.topic)]
            if not moved:
                continue
            insert_rows(
                alias,
                [
                    queue_row(
                        target,
                        message_id=row.message_id,
                        topic=row.topic,
                        headers=row.headers,
                        body=row.body,
                        published_at=row.published_at,
                    )
                    for row in moved
                    for target in routes.for_topic(row.topic)
                ],
            )
            QueuedMessage.objects.using(alias).filter(pk__in=[row.pk for row in moved]).delete()
        for row in moved:
            report.republished += 1
            report.topics[row.topic] += 1
            if progress is not None:
                progress(report.republished, budget, row.topic)
    report.at_end = rows.count()
    return report


# -- consuming ------------------------------------------------------------------------
class _Listener:
    """PostgreSQL ``LISTEN`` on a connection of its own (autocommit; either driver)."""

    def __init__(self, alias: str) -> None:
        self.conn: Any = pg_listen.connect(alias)
        try:
            pg_listen.listen(self.conn, CHANNEL)
        except Exception:
            self.close()
            raise

    def wait(self, seconds: float) -> bool:
        """Whether a notification came within ``seconds`` (the rest are dropped)."""
        return pg_listen.wait(self.conn, seconds)

    def drain(self) -> None:
        pg_listen.drain(self.conn)

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:  # closing a broken connection may fail; it is gone anyway
            logger.debug("reliable_events: closing the LISTEN connection failed", exc_info=True)


class DatabaseTransport(Transport):
    """Claims rows in a transaction that stays open until the delivery is settled.

    Deliveries taken together (``take_more``, for ``CONSUMER_BATCH_SIZE`` > 1) share
    that transaction: it commits when the last of them is acked.  ``requeue`` (and
    :meth:`abandon`, on a database failure) rolls it back: every row of it is back in
    its queue.
    """

    relays_itself = False
    #: The claim and every handler of a batch are one transaction, committed only once
    #: the whole batch is settled: a process killed every few seconds on a slow machine
    #: would lose whole batches over and over.  Batches here are the consumer's choice.
    batches_by_default = False

    def __init__(
        self, url: str, consumers: Sequence[type[EventConsumer]], *, prefetch: int
    ) -> None:
        self.url = url
        self.alias = alias_for(url)
        self.consumer_classes = list(consumers)
        self.prefetch = prefetch
        self.queues = {cls.queue_name(): cls.name for cls in self.consumer_classes}
        #: Queues of ordered consumers: one claiming transaction at a time (PostgreSQL:
        #: a transaction-level advisory lock; SQLite has a single writer anyway).
        self._ordered = {cls.queue_name() for cls in self.consumer_classes if cls.ordered}
        self.connection_errors = (DatabaseError, InterfaceError)
        self._buffer: deque[Delivery] = deque()
        self._dialect: Dialect | None = None
        self._atomic: Any = None
        self._open: set[int] = set()
        self._generation = 0
        self._idle_rounds = 0
        self._turn = 0
        self._listener: _Listener | None = None
        self._listen_retry_at = 0.0
        self._listen_failing = False
        self._drained_at = 0.0

    @property
    def connected(self) -> bool:
        return self._dialect is not None

    def connect(self) -> None:
        if self._dialect is not None:
            return
        dialect = dialect_for(self.alias)
        for cls in self.consumer_classes:
            if cls.get_database() != self.alias:
                raise ConfigurationError(
                    f"consumer {cls.name!r} writes to database {cls.get_database()!r} but "
                    f"the database transport's queues are in {self.alias!r}: they must be "
                    "one database (the claim, the handler and the ack are one transaction)"
                )
        self._dialect = dialect
        logger.info(
            "reliable_events: consuming %s from the database transport (%s)",
            ", ".join(cls.name for cls in self.consumer_classes),
            self.alias,
        )

    # -- claiming -----------------------------------------------------------------
    def get(self, timeout: float) -> Delivery | None:
        if self._atomic is not None:  # a delivery left unsettled: its rows go back
            self._rollback()
        deadline = time.monotonic() + timeout
        while True:
            wait = 0.0
            ready = list(self.queues)
            if self._idle_rounds:  # idle: look (cheaply, no lock) before claiming
                due = self._due()
                ready = [queue for queue in self.queues if due.get(queue, math.inf) <= 0]
                wait = min(due.values(), default=math.inf)
            if ready:
                delivery = self._claim_first(ready)
                if delivery is not None:
                    self._idle_rounds = 0
                    return delivery
                wait = math.inf  # another consumer was faster
            self._idle_rounds += 1
            pause = min(wait, self._backoff(), deadline - time.monotonic())
            if pause <= 0:
                return None
            if self._sleep(pause):
                self._idle_rounds = 1  # woken by a publish: look now, back off afresh
            elif time.monotonic() >= deadline:
                return None

    def take_more(self, consumer: str, limit: int, *, linger: float = 0.0) -> list[Delivery]:
        """Up to ``limit`` more due rows of ``consumer``'s queue, in the same transaction
        (no linger: waiting would hold the claim's transaction open)."""
        if self._atomic is None or limit < 1:
            return []
        queue = next(q for q, name in self.queues.items() if name == consumer)
        return [self._delivery(row) for row in self._delete(queue, limit)]

    def _claim_first(self, queues: list[str]) -> Delivery | None:
        """Open the transaction and claim the oldest due row of one of ``queues`` (tried in
        turn, starting after the last one served, so that no queue starves)."""
        self._turn = (self._turn + 1) % len(queues)
        order = queues[self._turn :] + queues[: self._turn]
        atomic = db_transaction.atomic(using=self.alias)
        atomic.__enter__()
        try:
            rows: list[tuple[Any, ...]] = []
            for queue in order:
                rows = self._delete(queue, 1)
                if rows:
                    break
        except BaseException as exc:
            atomic.__exit__(type(exc), exc, exc.__traceback__)
            raise
        if not rows:
            atomic.__exit__(None, None, None)
            return None
        self._atomic = atomic
        self._generation += 1
        now = time.monotonic()
        if self._listener is not None and now - self._drained_at >= _DRAIN_EVERY:
            self._drained_at = now
            self._listen(lambda listener: listener.drain())
        return self._delivery(rows[0])

    def _delete(self, queue: str, limit: int) -> list[tuple[Any, ...]]:
        dialect = self._dialect
        assert dialect is not None
        if queue in self._ordered and dialect.listens and not self._queue_lock(queue):
            return []  # another process is applying this ordered queue's head
        rows = claim_rows(self.alias, dialect, queue, limit, head_only=queue in self._ordered)
        self._open.update(row[0] for row in rows)
        return rows

    def _queue_lock(self, queue: str) -> bool:
        """Hold ``queue`` for this claim transaction (PostgreSQL), or ``False``."""
        with connections[self.alias].cursor() as cursor:
            cursor.execute(
                "SELECT pg_try_advisory_xact_lock(%s, hashtext(%s))",
                [ORDERED_QUEUE_LOCK_NAMESPACE, queue],
            )
            return bool(cursor.fetchone()[0])

    def _due(self) -> dict[str, float]:
        assert self._dialect is not None
        return due_in(self.alias, self._dialect, list(self.queues), heads=self._ordered)

    def _delivery(self, row: tuple[Any, ...]) -> Delivery:
        pk, queue, message_id, topic, key, headers_text, body, published_at = row
        headers = load_headers(headers_text)
        if key is not None:
            headers.setdefault(KEY_HEADER, key)
        if isinstance(published_at, str):  # SQLite
            published_at = parse_datetime(published_at)
        if published_at is not None:
            published_at = as_instant(from_column(published_at))
        return Delivery(
            consumer=self.queues[queue],
            body=bytes(body),
            properties={
                "message_id": message_id,
                "type": topic,
                "content_type": CONTENT_TYPE,
                "content_encoding": CONTENT_ENCODING,
                "timestamp": published_at,
            },
            headers=headers,
            routing_key=queue,
            tag=(self._generation, pk),
        )

    # -- settling ---------------------------------------------------------------------
    def ack(self, delivery: Delivery) -> None:
        """Settled: commit once every delivery of the transaction is."""
        generation, pk = delivery.tag
        if generation != self._generation or self._atomic is None:
            return  # its transaction was rolled back: the row is in its queue again
        self._open.discard(pk)
        if self._open:
            return
        atomic, self._atomic = self._atomic, None
        if connections[self.alias].needs_rollback:
            logger.warning(
                "reliable_events: the transaction of %s was marked for rollback; the "
                "message stays in its queue",
                delivery.message_id,
            )
            atomic.__exit__(DatabaseUnavailable, DatabaseUnavailable("rolled back"), None)
            return
        atomic.__exit__(None, None, None)

    def requeue(self, delivery: Delivery) -> None:
        self._rollback()

    def abandon(self, delivery: Delivery) -> bool:
        """A database failure: roll back (the rows go back to their queues)."""
        self._rollback()
        return True

    def retry_later(self, delivery: Delivery, delay: float, headers: dict[str, Any]) -> bool:
        """Put the claimed row back under its id (the head of its ordered queue, which
        waits behind it), due after ``delay``, with the next attempt's ``headers``, and
        commit: nothing is held while the retry waits."""
        generation, pk = delivery.tag
        if generation != self._generation or self._atomic is None:
            return False
        row = queue_row(
            delivery.routing_key,
            message_id=delivery.message_id,
            topic=delivery.properties.get("type") or "",
            headers=headers,
            body=delivery.body,
            published_at=delivery.properties.get("timestamp"),
        )
        insert_rows(self.alias, [row], delay=delay, notify=False, ids=[pk])
        self.ack(delivery)
        return True

    def _rollback(self) -> None:
        atomic, self._atomic = self._atomic, None
        self._open.clear()
        self._generation += 1
        if atomic is not None:
            reason = DatabaseUnavailable("claim rolled back")
            try:
                atomic.__exit__(DatabaseUnavailable, reason, None)
            except (DatabaseError, InterfaceError):  # the connection is gone: so is the claim
                logger.debug("reliable_events: rollback failed", exc_info=True)

    def close(self) -> None:
        self._rollback()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._dialect = None

    def make_scheduler(self) -> RetryScheduler:
        return DatabaseRetryScheduler(self.alias)

    # -- idle -------------------------------------------------------------------------
    def _backoff(self) -> float:
        ceiling = float(app_settings.DATABASE_POLL_MAX)
        return min(ceiling, FIRST_PAUSE * 2.0 ** min(self._idle_rounds - 1, 20))

    def _sleep(self, seconds: float) -> bool:
        """Sleep ``seconds``, or less when a publish is notified; whether one was."""
        dialect = self._dialect
        if dialect is None or not dialect.listens:
            time.sleep(seconds)
            return False
        woken = self._listen(lambda listener: listener.wait(seconds))
        if woken is None:
            time.sleep(seconds)
        return bool(woken)

    def _listen(self, action: Any) -> Any:
        """``action(listener)``, (re)connecting the listener; ``None`` when it is down."""
        if self._listener is None:
            if time.monotonic() < self._listen_retry_at:
                return None
            try:
                self._listener = _Listener(self.alias)
            except Exception as exc:  # no notifications: polling still works
                self._listen_retry_at = time.monotonic() + 5.0
                # once per streak of failures: new rows wait for the next poll meanwhile
                log = logger.debug if self._listen_failing else logger.warning
                self._listen_failing = True
                log(
                    "reliable_events: db:// consumers cannot LISTEN on %r (%s); polling "
                    "for new rows until they can",
                    self.alias,
                    type(exc).__name__,
                )
                return None
            self._listen_failing = False
        try:
            return action(self._listener)
        except Exception as exc:  # lost connection: reconnect on the next wait
            logger.debug("reliable_events: LISTEN connection lost (%s)", type(exc).__name__)
            self._listener.close()
            self._listener = None
            return None

    def pump(self, seconds: float, stop: StopFlag) -> None:
        stop.wait(seconds)


class DatabaseRetryScheduler(RetryScheduler):
    """A retry is a row of the consumer's queue, due after the delay, inserted in the
    transaction that claimed (deleted) the failed one."""

    def __init__(self, alias: str) -> None:
        self.alias = alias

    def schedule(
        self,
        consumer: type[EventConsumer],
        delivery: Delivery,
        event: Event,
        failure: Failure,
        *,
        retry: int,
        delay: float,
    ) -> None:
        row = queue_row(
            consumer.queue_name(),
            message_id=event.id,
            topic=event.topic,
            headers=retry_headers(delivery, event, failure),
            body=delivery.body,
            published_at=event.published_at,
        )
        with database_guard(self.alias, "scheduling a retry"):
            insert_rows(self.alias, [row], delay=delay, notify=delay <= 0)
