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
has one writer), so a key's events are applied in order and an in-place retry holds the
queue.

Not there: a redelivery counter and ``redelivered`` flags (a rolled-back claim leaves no
trace, as on a classic RabbitMQ queue).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from django.db import DEFAULT_DB_ALIAS, DatabaseError, InterfaceError, connections, router
from django.db import transaction as db_transaction
from django.utils.dateparse import parse_datetime

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
from reliable_events.conf import app_settings
from reliable_events.consumer import Event, EventConsumer
from reliable_events.consumer.db import database_guard
from reliable_events.consumer.failures import Failure
from reliable_events.consumer.retries import RetryScheduler, retry_headers
from reliable_events.consumer.wire import ATTEMPT_HEADER, Poison, parse_attempt
from reliable_events.exceptions import ConfigurationError, DatabaseUnavailable
from reliable_events.models import QueuedMessage
from reliable_events.routing import Routes
from reliable_events.runner import StopFlag
from reliable_events.sanitize import describe_error, json_safe
from reliable_events.topology import UNROUTED_SUFFIX, Topology

logger = logging.getLogger(__name__)

SCHEME = "db"
#: PostgreSQL ``NOTIFY`` channel a publish signals on.
CHANNEL = "reliable_events_queue"
#: First pause of an idle consumer, seconds (doubled per empty look, up to DATABASE_POLL_MAX).
FIRST_PAUSE = 0.01
#: A busy consumer reads (and drops) the notifications it has not waited for this often.
_DRAIN_EVERY = 1.0


def alias_for(url: str) -> str:
    """The database alias of a ``db://`` URL (empty host: where ``QueuedMessage`` is routed)."""
    alias = urlsplit(url).netloc
    if not alias:
        return router.db_for_write(QueuedMessage) or DEFAULT_DB_ALIAS
    if alias not in connections:
        raise ConfigurationError(f"{url!r}: there is no database alias {alias!r} in DATABASES")
    return alias


#: Advisory-lock namespace of ordered consumers' queues ("REOQ").
ORDERED_QUEUE_LOCK_NAMESPACE = 0x52454F51


# -- SQL of the two supported databases ---------------------------------------------------
@dataclass(frozen=True)
class Dialect:
    """The statements that differ between PostgreSQL and SQLite."""

    #: The current time, comparable with ``available_at``.
    now: str
    #: The current time plus ``%s`` (PostgreSQL: seconds; SQLite: a ``"+N seconds"`` modifier).
    later: str
    headers_in: str
    headers_out: str
    #: Seconds from now until ``{due}`` (negative: due).
    due_in: str
    lock: str
    listens: bool

    def later_param(self, seconds: float) -> Any:
        return float(seconds) if self.listens else f"+{float(seconds):.6f} seconds"


_SQLITE_NOW = "STRFTIME('%%Y-%%m-%%d %%H:%%M:%%f', 'NOW')"
DIALECTS = {
    "postgresql": Dialect(
        now="statement_timestamp()",
        later="statement_timestamp() + make_interval(secs => %s)",
        headers_in="%s::jsonb",
        headers_out="headers::text",
        due_in="EXTRACT(EPOCH FROM {due} - statement_timestamp())",
        lock="FOR UPDATE SKIP LOCKED",
        listens=True,
    ),
    "sqlite": Dialect(
        now=_SQLITE_NOW,
        later="STRFTIME('%%Y-%%m-%%d %%H:%%M:%%f', 'NOW', %s)",
        headers_in="%s",
        headers_out="headers",
        due_in="(julianday({due}) - julianday('now')) * 86400.0",
        lock="",
        listens=False,
    ),
}


def dialect_for(alias: str) -> Dialect:
    vendor = connections[alias].vendor
    try:
        return DIALECTS[vendor]
    except KeyError:
        raise ConfigurationError(
            f"the database transport (db://) needs PostgreSQL or SQLite; database "
            f"{alias!r} is {vendor}"
        ) from None


def _table(alias: str) -> str:
    return str(connections[alias].ops.quote_name(QueuedMessage._meta.db_table))


_COLUMNS = "id, queue, message_id, topic, key, {headers}, body, published_at"


def insert_rows(
    alias: str, rows: Sequence[tuple[Any, ...]], *, delay: float = 0.0, notify: bool = True
) -> None:
    """Insert queue rows ``(queue, message_id, topic, key, headers_json, body, attempt,
    published_at)`` in the caller's transaction, due after ``delay`` seconds."""
    dialect = dialect_for(alias)
    due = dialect.later if delay > 0 else dialect.now
    sql = (
        f"INSERT INTO {_table(alias)} "  # noqa: S608 - identifiers from the model, values are parameters
        "(queue, message_id, topic, key, headers, body, attempt, published_at, available_at) "
        f"VALUES (%s, %s, %s, %s, {dialect.headers_in}, %s, %s, %s, {due})"
    )
    adapt = connections[alias].ops.adapt_datetimefield_value
    params = [(*row[:7], adapt(row[7])) for row in rows]
    if delay > 0:
        params = [(*row, dialect.later_param(delay)) for row in params]
    with connections[alias].cursor() as cursor:
        cursor.executemany(sql, params)
        if notify and dialect.listens:
            cursor.execute("SELECT pg_notify(%s, '')", [CHANNEL])


def queue_row(queue: str, message: OutgoingMessage | None = None, **values: Any) -> tuple[Any, ...]:
    """One row for :func:`insert_rows` (from ``message``, or from ``values``)."""
    if message is not None:
        values = {
            "message_id": message.message_id,
            "topic": message.topic,
            "headers": message.headers,
            "body": message.body,
            "published_at": message.timestamp,
        }
    headers = json_safe(dict(values["headers"] or {}))
    key = headers.get(KEY_HEADER)
    try:
        attempt = parse_attempt(headers.get(ATTEMPT_HEADER))
    except Poison:
        attempt = 1  # the consumer dead-letters it; the column is informative only
    stamp = values["published_at"]
    if isinstance(stamp, int | float) and not isinstance(stamp, bool):
        stamp = datetime.fromtimestamp(stamp, tz=UTC)
    return (
        queue,
        values["message_id"],
        values["topic"] or "",
        key if isinstance(key, str) and key else None,
        json.dumps(headers, separators=(",", ":")),
        bytes(values["body"]),
        attempt,
        stamp if isinstance(stamp, datetime) else None,
    )


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
                cursor.execute(f"SELECT 1 FROM {_table(self.alias)} WHERE 1 = 0", [])  # noqa: S608
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


# -- consuming ------------------------------------------------------------------------
class _Listener:
    """PostgreSQL ``LISTEN`` on a connection of its own (autocommit)."""

    def __init__(self, alias: str) -> None:
        import psycopg

        params = connections[alias].get_connection_params()
        self.conn: Any = psycopg.connect(**params, autocommit=True)
        self.conn.execute(f"LISTEN {CHANNEL}")

    def wait(self, seconds: float) -> bool:
        """Whether a notification came within ``seconds`` (the rest are dropped)."""
        woken = any(True for _ in self.conn.notifies(timeout=seconds, stop_after=1))
        self.drain()
        return woken

    def drain(self) -> None:
        for _ in self.conn.notifies(timeout=0):
            pass

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

    def take_more(self, consumer: str, limit: int) -> list[Delivery]:
        """Up to ``limit`` more due rows of ``consumer``'s queue, in the same transaction."""
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
        """Delete (claim) up to ``limit`` due rows of ``queue``, oldest first.

        The ``(queue, id)`` index is walked, so other queues' rows (an unrouted backlog, a
        stopped consumer's queue) are never scanned.  The queue is written as a range:
        with ``queue = %s`` PostgreSQL's planner may walk the primary key instead,
        expecting this queue's rows to be spread evenly among the others.
        """
        dialect = self._dialect
        assert dialect is not None
        if queue in self._ordered and dialect.listens and not self._queue_lock(queue):
            return []  # another process is applying this ordered queue's head
        table = _table(self.alias)
        sql = (
            f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} "  # noqa: S608
            f"WHERE queue >= %s AND queue <= %s AND available_at <= {dialect.now} "
            f"ORDER BY queue, id LIMIT %s {dialect.lock}) "
            f"RETURNING {_COLUMNS.format(headers=dialect.headers_out)}"
        )
        with connections[self.alias].cursor() as cursor:
            cursor.execute(sql, [queue, queue, limit])
            rows = sorted(cursor.fetchall())
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
        """Seconds until the next row of each non-empty queue is due (one query; each
        ``MIN`` is read from the ``(queue, available_at)`` index)."""
        dialect = self._dialect
        assert dialect is not None
        table = _table(self.alias)
        due_in = dialect.due_in.format(due="MIN(available_at)")
        queues = list(self.queues)
        sql = " UNION ALL ".join(
            f"SELECT {index}, {due_in} FROM {table} WHERE queue = %s"  # noqa: S608
            for index in range(len(queues))
        )
        with connections[self.alias].cursor() as cursor:
            cursor.execute(sql, queues)
            rows = cursor.fetchall()
        return {queues[index]: float(seconds) for index, seconds in rows if seconds is not None}

    def _delivery(self, row: tuple[Any, ...]) -> Delivery:
        pk, queue, message_id, topic, key, headers_text, body, published_at = row
        headers = _load_headers(headers_text)
        if key is not None:
            headers.setdefault(KEY_HEADER, key)
        if isinstance(published_at, str):  # SQLite
            parsed = parse_datetime(published_at)
            published_at = parsed.replace(tzinfo=UTC) if parsed and not parsed.tzinfo else parsed
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
                logger.debug("reliable_events: cannot LISTEN (%s); polling", type(exc).__name__)
                return None
        try:
            return action(self._listener)
        except Exception as exc:  # lost connection: reconnect on the next wait
            logger.debug("reliable_events: LISTEN connection lost (%s)", type(exc).__name__)
            self._listener.close()
            self._listener = None
            return None

    def pump(self, seconds: float, stop: StopFlag) -> None:
        stop.wait(seconds)


def _load_headers(text: Any) -> dict[str, Any]:
    if isinstance(text, dict):
        return text
    try:
        value = json.loads(text) if text else {}
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


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
