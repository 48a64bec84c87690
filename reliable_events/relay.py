"""The relay: move due outbox rows to the broker, marking sent only what it confirmed.

One service (:class:`Relay`) backs the Celery task, the ``relay_outbox`` command, the
on-commit hook (:func:`publish_after_commit`) and the admin actions.

How a batch goes (PostgreSQL):

1. **Lanes.**  Every row has a lane (its key's hash modulo ``LANES``).  The relay takes
   a session-level advisory lock on each lane no other relay holds
   (``pg_try_advisory_lock``), so events of one key are only ever published by one
   relay at a time.  A relay that dies loses its connection and with it its locks.
2. **Claim.**  In a short transaction: ``SELECT ... FOR UPDATE SKIP LOCKED`` the due
   pending rows of the held lanes, oldest first, leaving out every row whose key has an
   earlier pending row that is not yet due (a failing event holds back its own key
   and nothing else).
3. **Publish** them in id order through the confirm window (:mod:`reliable_events.broker`).
4. **Mark**: the confirmed rows become ``sent`` in one statement; each failed row gets
   ``attempts + 1``, ``last_error`` and ``next_attempt_at = now() + backoff`` (database
   clock, exponential with jitter), or ``dead`` once it reached ``MAX_ATTEMPTS``.
5. Release the lanes.

On SQLite (the embedded default) there are no advisory locks and ``FOR UPDATE`` is a
no-op: run a single relay there (documented in ``docs/relay.md``).

The on-commit hook publishes the rows its transaction stored.  ``publish_event``
stored them with ``next_attempt_at = now + ON_COMMIT_GRACE_SECONDS``: that reservation
is the hook's claim, so the relay does not take them while the hook (bounded by short
connect and confirm timeouts) is at work.  Whatever the hook could not confirm stays
pending for the relay.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.db import DEFAULT_DB_ALIAS, connections, router, transaction
from django.db.models import Exists, F, OuterRef, TextField
from django.db.models.functions import Cast, Now
from django.utils import timezone

from reliable_events import signals
from reliable_events.broker import KEY_HEADER, OutgoingMessage, Publisher, open_publisher
from reliable_events.conf import app_settings
from reliable_events.models import OutboxMessage

logger = logging.getLogger(__name__)

#: First key of the two-key advisory locks that guard lanes ("RE").
LANE_LOCK_NAMESPACE = 0x5245

_FIELDS = ("id", "message_id", "topic", "key", "queue", "payload_text", "headers", "created_at")


@dataclass
class RelayReport:
    """What one relay call did."""

    claimed: int = 0
    sent: int = 0
    failed: int = 0
    dead: int = 0
    batches: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def add(self, other: RelayReport) -> None:
        self.claimed += other.claimed
        self.sent += other.sent
        self.failed += other.failed
        self.dead += other.dead
        self.batches += other.batches
        self.errors.extend(other.errors[:5])

    def __str__(self) -> str:
        return (
            f"claimed={self.claimed} sent={self.sent} failed={self.failed} "
            f"dead={self.dead} batches={self.batches} seconds={self.seconds:.3f}"
        )


def backoff_seconds(attempts: int) -> float:
    """Delay before attempt ``attempts + 1``: exponential, capped, with equal jitter."""
    base = float(app_settings.BACKOFF_BASE)
    cap = float(app_settings.BACKOFF_MAX)
    exponent = min(max(attempts - 1, 0), 62)
    ceiling = min(cap, base * (2.0**exponent))
    return ceiling * (0.5 + random.random() / 2)


def _alias(using: str | None) -> str:
    return using or router.db_for_write(OutboxMessage) or DEFAULT_DB_ALIAS


def _is_postgres(alias: str) -> bool:
    return connections[alias].vendor == "postgresql"


# -- lanes ------------------------------------------------------------------------------
def lock_lanes(alias: str, lanes: Iterable[int] | None = None) -> list[int]:
    """Try to take the advisory lock of each lane; return the lanes now held.

    On databases without advisory locks every lane counts as held.
    """
    wanted = list(range(int(app_settings.LANES))) if lanes is None else list(lanes)
    if not _is_postgres(alias):
        return wanted
    random.shuffle(wanted)  # spread contention between relays
    with connections[alias].cursor() as cursor:
        cursor.execute(
            "SELECT l FROM unnest(%s::int[]) AS l WHERE pg_try_advisory_lock(%s, l)",
            [wanted, LANE_LOCK_NAMESPACE],
        )
        return sorted(row[0] for row in cursor.fetchall())


def unlock_lanes(alias: str, lanes: Sequence[int]) -> None:
    if not lanes or not _is_postgres(alias):
        return
    with connections[alias].cursor() as cursor:
        cursor.execute(
            "SELECT pg_advisory_unlock(%s, l) FROM unnest(%s::int[]) AS l",
            [LANE_LOCK_NAMESPACE, list(lanes)],
        )


# -- claim / build / mark -----------------------------------------------------------------
def _rows_query(alias: str) -> Any:
    return OutboxMessage.objects.using(alias).annotate(
        payload_text=Cast("payload", output_field=TextField())
    )


def claim_due(alias: str, lanes: Sequence[int], limit: int) -> list[tuple[Any, ...]]:
    """Due pending rows of ``lanes``, oldest first, minus keys held back by a failure."""
    held_back = OutboxMessage.objects.using(alias).filter(
        status=OutboxMessage.Status.PENDING,
        key=OuterRef("key"),
        id__lt=OuterRef("id"),
        next_attempt_at__gt=Now(),
    )
    query = (
        _rows_query(alias)
        .filter(status=OutboxMessage.Status.PENDING, next_attempt_at__lte=Now())
        .filter(~Exists(held_back))
        .order_by("id")
    )
    if len(lanes) < int(app_settings.LANES):
        query = query.filter(lane__in=lanes)
    with transaction.atomic(using=alias):
        return list(
            query.select_for_update(skip_locked=True, of=("self",)).values_list(*_FIELDS)[:limit]
        )


def claim_committed(alias: str, ids: Sequence[int]) -> list[tuple[Any, ...]]:
    """The still-pending rows among ``ids`` that may go now without breaking key order.

    A row is left for the relay when an earlier pending row of its key is not among
    ``ids`` (that row goes first), or when it is delayed.
    """
    earlier = (
        OutboxMessage.objects.using(alias)
        .filter(status=OutboxMessage.Status.PENDING, key=OuterRef("key"), id__lt=OuterRef("id"))
        .exclude(id__in=ids)
    )
    return list(
        _rows_query(alias)
        .filter(id__in=ids, status=OutboxMessage.Status.PENDING)
        .filter(~Exists(earlier))
        .order_by("id")
        .values_list(*_FIELDS)
    )


def build_message(row: tuple[Any, ...]) -> OutgoingMessage:
    pk, message_id, topic, key, queue, payload_text, headers, created_at = row
    all_headers: dict[str, Any] = dict(headers or {})
    if key is not None:
        all_headers[KEY_HEADER] = key
    return OutgoingMessage(
        ref=pk,
        exchange="" if queue else str(app_settings.EXCHANGE),
        routing_key=queue or topic,
        body=payload_text.encode(),
        message_id=message_id,
        topic=topic,
        headers=all_headers,
        timestamp=created_at,
    )


def mark_sent(alias: str, ids: Sequence[Hashable]) -> None:
    if not ids:
        return
    OutboxMessage.objects.using(alias).filter(pk__in=ids).update(
        status=OutboxMessage.Status.SENT,
        sent_at=Now(),
        attempts=F("attempts") + 1,
        last_error="",
    )
    signals.events_sent.send(sender=OutboxMessage, ids=list(ids), using=alias)


def mark_failed(alias: str, failed: dict[Hashable, str]) -> int:
    """Record a failed attempt on each row; return how many rows became dead."""
    if not failed:
        return 0
    max_attempts = max(1, int(app_settings.MAX_ATTEMPTS))
    rows = list(
        OutboxMessage.objects.using(alias)
        .filter(pk__in=list(failed), status=OutboxMessage.Status.PENDING)
        .only("id", "attempts")
    )
    now = _db_now(alias)
    dead = 0
    for row in rows:
        row.attempts += 1
        row.last_error = failed[row.pk][:2000]
        row.next_attempt_at = now + timedelta(seconds=backoff_seconds(row.attempts))
        if row.attempts >= max_attempts:
            row.status = OutboxMessage.Status.DEAD
            dead += 1
    OutboxMessage.objects.using(alias).bulk_update(
        rows, ["attempts", "last_error", "next_attempt_at", "status"], batch_size=500
    )
    if dead:
        logger.error(
            "reliable_events: %d outbox message(s) are dead after %d attempts", dead, max_attempts
        )
    return dead


def _db_now(alias: str) -> datetime:
    """The database's clock (PostgreSQL), else this process's."""
    if _is_postgres(alias):
        with connections[alias].cursor() as cursor:
            cursor.execute("SELECT statement_timestamp()")
            value: datetime = cursor.fetchone()[0]
            return value
    return timezone.now()


def publish_rows(
    alias: str, rows: Sequence[tuple[Any, ...]], publisher: Publisher, *, timeout: float
) -> RelayReport:
    """Publish ``rows`` and record the outcome of each."""
    report = RelayReport(claimed=len(rows), batches=1)
    if not rows:
        return report
    result = publisher.publish([build_message(row) for row in rows], timeout=timeout)
    mark_sent(alias, result.confirmed)
    report.sent = len(result.confirmed)
    report.failed = len(result.failed)
    report.dead = mark_failed(alias, result.failed)
    if result.failed:
        report.errors.append(next(iter(result.failed.values())))
    return report


# -- the relay ----------------------------------------------------------------------------
class Relay:
    """Publishes due outbox rows in batches; reuse one instance in a loop."""

    def __init__(
        self,
        *,
        using: str | None = None,
        batch_size: int | None = None,
        publisher: Publisher | None = None,
    ) -> None:
        self.alias = _alias(using)
        self.batch_size = max(1, int(batch_size or app_settings.RELAY_BATCH_SIZE))
        self.publisher = publisher or open_publisher()

    def run_batch(self) -> RelayReport:
        """Claim, publish and mark one batch.  Returns what it did (``claimed=0``: idle)."""
        started = time.monotonic()
        lanes = lock_lanes(self.alias)
        try:
            if not lanes:
                return RelayReport()
            rows = claim_due(self.alias, lanes, self.batch_size)
            report = publish_rows(
                self.alias, rows, self.publisher, timeout=float(app_settings.CONFIRM_TIMEOUT)
            )
        finally:
            unlock_lanes(self.alias, lanes)
        report.seconds = time.monotonic() - started
        return report

    def drain(self, *, max_seconds: float | None = None) -> RelayReport:
        """Run batches until nothing is due (or ``max_seconds`` passed)."""
        started = time.monotonic()
        total = RelayReport()
        while True:
            report = self.run_batch()
            total.add(report)
            if report.claimed == 0 or report.sent == 0:
                break  # idle, or the broker is failing: let backoff work
            if max_seconds is not None and time.monotonic() - started >= max_seconds:
                break
        total.seconds = time.monotonic() - started
        return total

    def close(self) -> None:
        self.publisher.close()


def relay_once(
    *, using: str | None = None, batch_size: int | None = None, max_seconds: float | None = None
) -> RelayReport:
    """Publish everything due now, then close the connection."""
    relay = Relay(using=using, batch_size=batch_size)
    try:
        return relay.drain(max_seconds=max_seconds)
    finally:
        relay.close()


# -- on-commit dispatch -----------------------------------------------------------------
class _OnCommitDispatcher:
    """Per-process publisher for the on-commit hook, with a circuit breaker."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.publisher: Publisher | None = None
        self.config: tuple[Any, ...] = ()
        self.open_until = 0.0

    def breaker_open(self) -> bool:
        return time.monotonic() < self.open_until

    def trip(self) -> None:
        self.open_until = time.monotonic() + float(app_settings.ON_COMMIT_BREAKER_SECONDS)

    def reset(self) -> None:
        with self.lock:
            if self.publisher is not None:
                self.publisher.close()
            self.publisher = None
            self.open_until = 0.0

    def get_publisher(self) -> Publisher:
        url = str(app_settings.BROKER_URL)
        config = (url, app_settings.EXCHANGE, app_settings.QUEUE_TYPE)
        if self.publisher is None or self.config != config:
            if self.publisher is not None:
                self.publisher.close()
            self.publisher = open_publisher(
                url, connect_timeout=float(app_settings.ON_COMMIT_CONNECT_TIMEOUT)
            )
            self.config = config
        return self.publisher


dispatcher = _OnCommitDispatcher()


def publish_after_commit(ids: Sequence[int], *, using: str | None = None) -> RelayReport:
    """Publish the rows a transaction just committed, bounded in time.

    Skipped while the breaker is open (the broker failed moments ago) or while another
    thread of this process is publishing: the relay sends those rows after the grace.
    """
    alias = _alias(using)
    if dispatcher.breaker_open():
        return RelayReport()
    timeout = float(app_settings.ON_COMMIT_CONFIRM_TIMEOUT)
    if not dispatcher.lock.acquire(timeout=timeout):
        return RelayReport()
    try:
        rows = claim_committed(alias, ids)
        if not rows:
            return RelayReport()
        report = publish_rows(alias, rows, dispatcher.get_publisher(), timeout=timeout)
        if report.failed:
            dispatcher.trip()
        return report
    finally:
        dispatcher.lock.release()


# -- retrying dead rows ---------------------------------------------------------------------
def retry_dead(ids: Iterable[int] | None = None, *, using: str | None = None) -> int:
    """Make dead outbox rows pending again (attempts reset); returns how many."""
    alias = _alias(using)
    query = OutboxMessage.objects.using(alias).dead()
    if ids is not None:
        query = query.filter(pk__in=list(ids))
    return query.update(
        status=OutboxMessage.Status.PENDING, attempts=0, next_attempt_at=Now(), last_error=""
    )
