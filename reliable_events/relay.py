"""The relay: move due outbox rows to the broker, marking sent only what it confirmed.

One service (:class:`Relay`) backs the Celery task, the ``relay_outbox`` command, the
on-commit hook (:func:`publish_after_commit`) and the admin actions.

How a batch goes (PostgreSQL):

1. **Lanes.**  Every row has a lane (its key's hash modulo ``LANES``).  A relay holds a
   session-level advisory lock on each of its lanes (``pg_try_advisory_lock``), so
   events of one key are only ever published by one relay at a time.  Relays announce
   themselves (one advisory lock each) and each keeps its fair share of the lanes,
   ``ceil(LANES / live relays)`` (:mod:`reliable_events.lanes`).  A relay that dies
   loses its connection and with it its locks; the others take its lanes at their next
   run.
2. **Claim.**  In a short transaction: ``SELECT ... FOR UPDATE SKIP LOCKED`` the due
   pending rows of the held lanes, oldest first, leaving out every row whose key has an
   earlier pending row that is not yet due (a failing event holds back its own key and
   nothing else).  A retried event goes without its key's later events (see
   :func:`_retries_go_alone`), so that if it fails again they are not already on their way.
3. **Publish** them in id order through the confirm window (:mod:`reliable_events.broker`).
4. **Mark**: the confirmed rows become ``sent`` in one statement; each row the broker
   refused (``basic.nack``, ``basic.return``) gets ``attempts + 1``, ``last_error`` and
   ``next_attempt_at = now() + backoff`` (database clock, exponential with jitter), or
   ``dead`` once it reached ``MAX_ATTEMPTS``.  Rows a *broker* failure interrupted
   (connection refused or lost, blocked, confirm timeout) are not charged: they stay due,
   and the relay as a whole pauses (:class:`~reliable_events.relay_breaker.BrokerBreaker`:
   jittered, at most
   ``RELAY_BROKER_RETRY_MAX``) and tries the broker again.

On SQLite (the embedded default) there are no advisory locks and ``FOR UPDATE`` is a
no-op: run a single relay there (documented in ``docs/relay.md``).

The on-commit hook publishes the rows its transaction stored.  On PostgreSQL they are
due at once; the hook holds their lanes (transaction-level advisory locks) and publishes
each of their keys' pending chains in order, so a row it missed goes with the next event
of its key (see :func:`publish_after_commit`).  On SQLite ``publish_event`` stored them
with ``next_attempt_at = now + ON_COMMIT_GRACE_SECONDS``: that reservation is the hook's
claim there.  Whatever the hook could not confirm stays pending for the relay.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.db import (
    DEFAULT_DB_ALIAS,
    DatabaseError,
    OperationalError,
    connections,
    router,
    transaction,
)
from django.db.models import Exists, F, OuterRef, TextField
from django.db.models.functions import Cast, Least, Now
from django.utils import timezone

from reliable_events import signals
from reliable_events.broker import (
    KEY_HEADER,
    OutgoingMessage,
    Publisher,
    PublishResult,
    open_publisher,
)
from reliable_events.conf import app_settings
from reliable_events.exceptions import BrokerError
from reliable_events.lanes import LANE_LOCK_NAMESPACE as LANE_LOCK_NAMESPACE
from reliable_events.lanes import RELAY_LOCK_NAMESPACE as RELAY_LOCK_NAMESPACE
from reliable_events.lanes import LaneShare
from reliable_events.lanes import lock_lanes as lock_lanes
from reliable_events.lanes import unlock_lanes as unlock_lanes
from reliable_events.models import OutboxMessage
from reliable_events.relay_breaker import BrokerBreaker

logger = logging.getLogger(__name__)

#: PostgreSQL ``LISTEN``/``NOTIFY`` channel on which idle relay daemons are woken.
WAKE_CHANNEL = "reliable_events_relay"

_FIELDS = (
    "id",
    "message_id",
    "topic",
    "key",
    "queue",
    "payload_text",
    "headers",
    "created_at",
    "attempts",
)
#: Index of ``attempts`` in a claimed row (not part of the message).
_ATTEMPTS = 8
#: Longest one :meth:`Relay.run` streams batches before it rebalances its lanes, seconds.
RUN_SECONDS = 1.0
#: Longest :meth:`Relay.drain` waits for a share of the lanes when others hold them all.
LANE_WAIT = 3.0

# The claim on PostgreSQL, in SQL rather than through the ORM: it is the relay's hot path.
# Same semantics as the ORM version used elsewhere (see claim_due): due pending rows
# (minus ``exclude``), oldest first, minus the rows whose key has an earlier pending row
# that is not yet due, locked with SKIP LOCKED.  The payload and
# headers come back as JSON text (never decoded), the creation time as whole epoch seconds.
_PG_COLUMNS = """o.id, o.message_id, o.topic, o.key, o.queue, o.payload::text,
    NULLIF(o.headers, '{}'::jsonb)::text, floor(extract(epoch FROM o.created_at))::bigint,
    o.attempts"""
_PG_CLAIM_DUE = """SELECT {columns} FROM {table} o
WHERE o.status = 'pending' AND o.next_attempt_at <= statement_timestamp()
  {lane_filter} {exclude_filter}
  AND NOT EXISTS (
    SELECT 1 FROM {table} e
    WHERE e.status = 'pending' AND e.key = o.key AND e.id < o.id
      AND e.next_attempt_at > statement_timestamp())
ORDER BY o.id
LIMIT %(limit)s
FOR UPDATE OF o SKIP LOCKED"""
# The claim's plan does not depend on the table's statistics.  The good plan walks
# ``re_outbox_pending_id`` in id order and stops after ``limit`` rows; with statistics that
# are stale after a bulk of new pending rows (ANALYZE lag: the table "is empty"),
# PostgreSQL instead read every due row, anti-joined them and sorted them all (measured: 3 s
# per claim at 200,000 pending rows, drain at 1,355 events/s instead of 7,700).  These
# settings, local to the claim's transaction, rule out the sort and the full scans.
_PG_CLAIM_PLAN = """SELECT set_config('enable_sort', 'off', true),
    set_config('enable_bitmapscan', 'off', true), set_config('enable_seqscan', 'off', true),
    set_config('enable_hashjoin', 'off', true), set_config('enable_mergejoin', 'off', true)"""
# The on-commit hook's claim (PostgreSQL), with the lanes of its rows held: the pending
# chain of each of its keys (walked in id order through re_outbox_pending_key, at most
# ``limit`` rows a key, so a backlog on the key costs nothing) and its keyless rows, in
# id order, minus those behind an earlier row of their key that is not due (a delayed
# event, a backoff).  Its own rows are due whatever the clocks say; earlier rows of the
# keys that another hook or relay missed go with them, first.
_PG_CLAIM_CHAINS = """SELECT {columns} FROM {table} o
WHERE o.id IN (
    SELECT c.id FROM unnest(%(keys)s::text[]) AS k(key) CROSS JOIN LATERAL (
      SELECT p.id FROM {table} p WHERE p.status = 'pending' AND p.key = k.key
      ORDER BY p.id LIMIT %(limit)s) c
    UNION ALL
    SELECT q.id FROM {table} q WHERE q.id = ANY(%(ids)s::bigint[]) AND q.key IS NULL)
  AND o.status = 'pending'
  AND (o.next_attempt_at <= statement_timestamp()
       OR (o.id = ANY(%(ids)s::bigint[]) AND o.attempts = 0))
  AND NOT EXISTS (
    SELECT 1 FROM {table} e
    WHERE e.status = 'pending' AND e.key = o.key AND e.next_attempt_at > statement_timestamp()
      AND e.id < o.id AND NOT (e.id = ANY(%(ids)s::bigint[]) AND e.attempts = 0))
ORDER BY o.id
LIMIT %(limit)s
FOR UPDATE OF o SKIP LOCKED"""
# Waits (bounded by lock_timeout) for the lanes of the hook's pending rows, in lane order
# so that two hooks cannot deadlock; released at the end of the hook's transaction.
# Returns the keys of those rows, per lane.
_PG_LOCK_HOOK_LANES = """SELECT s.lane, pg_advisory_xact_lock(%(namespace)s, s.lane), s.keys
FROM (SELECT lane, array_agg(DISTINCT key) FILTER (WHERE key IS NOT NULL) AS keys
      FROM {table} WHERE id = ANY(%(ids)s::bigint[]) AND status = 'pending'
      GROUP BY lane ORDER BY lane) s"""
_PG_MARK_SENT = """UPDATE {table} SET status = 'sent', sent_at = statement_timestamp(),
    attempts = attempts + 1, last_error = ''
WHERE id = ANY(%(ids)s::bigint[])"""


@dataclass
class RelayReport:
    """What one relay call did."""

    claimed: int = 0
    sent: int = 0
    #: Rows the broker refused (each counted as an attempt).
    failed: int = 0
    dead: int = 0
    #: Rows a broker failure interrupted (not counted as attempts; they go again).
    interrupted: int = 0
    batches: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    #: Why the broker was unavailable, when it was (nothing was charged to the rows).
    broker_error: str = ""
    #: Lanes the relay held.
    lanes: int = 0

    def add(self, other: RelayReport) -> None:
        self.claimed += other.claimed
        self.sent += other.sent
        self.failed += other.failed
        self.dead += other.dead
        self.interrupted += other.interrupted
        self.batches += other.batches
        self.errors.extend(other.errors[:5])
        self.broker_error = other.broker_error or self.broker_error
        self.lanes = max(self.lanes, other.lanes)

    def __str__(self) -> str:
        return (
            f"claimed={self.claimed} sent={self.sent} failed={self.failed} "
            f"dead={self.dead} interrupted={self.interrupted} batches={self.batches} "
            f"seconds={self.seconds:.3f}"
        )


def backoff_seconds(attempts: int) -> float:
    """Delay before attempt ``attempts + 1``: exponential, capped, with equal jitter
    (on the relay's clock: ``TIME_SCALE`` applies)."""
    base = app_settings.seconds("BACKOFF_BASE")
    cap = app_settings.seconds("BACKOFF_MAX")
    exponent = min(max(attempts - 1, 0), 62)
    ceiling = min(cap, base * (2.0**exponent))
    return ceiling * (0.5 + random.random() / 2)


def _alias(using: str | None) -> str:
    return using or router.db_for_write(OutboxMessage) or DEFAULT_DB_ALIAS


def _is_postgres(alias: str) -> bool:
    return connections[alias].vendor == "postgresql"


# -- claim / build / mark -----------------------------------------------------------------
def _rows_query(alias: str) -> Any:
    return OutboxMessage.objects.using(alias).annotate(
        payload_text=Cast("payload", output_field=TextField())
    )


def _table(alias: str) -> str:
    return connections[alias].ops.quote_name(OutboxMessage._meta.db_table)


def claim_due(
    alias: str, lanes: Sequence[int], limit: int, *, exclude: Sequence[int] = ()
) -> list[tuple[Any, ...]]:
    """Due pending rows of ``lanes``, oldest first, minus keys held back by a failure.

    ``exclude``: ids to leave out (the rows this relay is publishing already).
    """
    if _is_postgres(alias):
        all_lanes = len(lanes) >= int(app_settings.LANES)
        sql = _PG_CLAIM_DUE.format(
            columns=_PG_COLUMNS,
            table=_table(alias),
            lane_filter="" if all_lanes else "AND o.lane = ANY(%(lanes)s::int[])",
            exclude_filter="AND o.id <> ALL(%(exclude)s::bigint[])" if exclude else "",
        )
        params: dict[str, Any] = {"limit": limit, "lanes": list(lanes), "exclude": list(exclude)}
        with transaction.atomic(using=alias), connections[alias].cursor() as cursor:
            cursor.execute(_PG_CLAIM_PLAN)
            cursor.execute(sql, params)
            rows: list[tuple[Any, ...]] = cursor.fetchall()
            return _retries_go_alone(alias, rows)
    held_back = OutboxMessage.objects.using(alias).filter(
        next_attempt_at__gt=Now(),
        status=OutboxMessage.Status.PENDING,
        key=OuterRef("key"),
        id__lt=OuterRef("id"),
    )
    query = (
        _rows_query(alias)
        .filter(status=OutboxMessage.Status.PENDING, next_attempt_at__lte=Now())
        .exclude(id__in=list(exclude))
        .filter(~Exists(held_back))
        .order_by("id")
    )
    if len(lanes) < int(app_settings.LANES):
        query = query.filter(lane__in=lanes)
    with transaction.atomic(using=alias):
        return _retries_go_alone(
            alias,
            list(
                query.select_for_update(skip_locked=True, of=("self",)).values_list(*_FIELDS)[
                    :limit
                ]
            ),
        )


def _retries_go_alone(alias: str, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Leave out the rows whose key has a retried row (one that failed before) earlier in
    the batch, and lease that row (``next_attempt_at`` pushed past the confirm timeout).

    A retried event thus goes without its key's later events, in this batch and, through
    the lease (an earlier row not due holds back its key), in the batches claimed while
    it is in flight: if it fails again (a ``basic.nack``), they cannot overtake it.  The
    outcome replaces the lease: sent, or the next backoff.  Called inside the claim's
    transaction; costs nothing when no claimed row failed before (``attempts`` comes
    with the claim).
    """
    retried = {row[0] for row in rows if row[_ATTEMPTS]}
    if not retried:
        return rows
    waiting: set[str] = set()
    kept, leased = [], []
    for row in rows:
        pk, key = row[0], row[3]
        if key is not None and key in waiting:
            continue
        kept.append(row)
        if pk in retried and key is not None:
            waiting.add(key)
            leased.append(pk)
    if leased:
        lease = timedelta(seconds=2 * float(app_settings.CONFIRM_TIMEOUT) + 1)
        OutboxMessage.objects.using(alias).filter(pk__in=leased).update(
            next_attempt_at=_db_now(alias) + lease
        )
    return kept


def claim_committed(
    alias: str, ids: Sequence[int], keys: Sequence[str] = ()
) -> list[tuple[Any, ...]]:
    """The rows the on-commit hook publishes for the just-committed ``ids``.

    PostgreSQL (call it with the lanes of ``ids`` held; ``keys``: the keys of ``ids``, see
    :func:`lock_hook_lanes`): the pending rows of ``keys`` and the keyless rows among
    ``ids``, oldest first, minus any row behind an earlier row of its key that is not
    due.  An earlier row of the key that nobody published (another hook missed it, or a
    delayed event fell due) goes first, with them: a miss never leaves a key waiting.  At
    most ``len(ids) + ON_COMMIT_CHAIN_LIMIT`` rows: a longer chain is a backlog, left to
    the relay (with the rows of ``ids`` behind it).

    Elsewhere (SQLite: no lane locks, the grace period keeps the relay off these rows):
    the still-pending rows among ``ids``, minus those whose key has an earlier pending row
    outside ``ids`` (that one goes first, sent by the relay).
    """
    if _is_postgres(alias):
        sql = _PG_CLAIM_CHAINS.format(columns=_PG_COLUMNS, table=_table(alias))
        limit = len(ids) + int(app_settings.ON_COMMIT_CHAIN_LIMIT)
        with connections[alias].cursor() as cursor:
            cursor.execute(sql, {"ids": list(ids), "keys": list(keys), "limit": limit})
            chains: list[tuple[Any, ...]] = cursor.fetchall()
            return _retries_go_alone(alias, chains)
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


def lock_hook_lanes(alias: str, ids: Sequence[int], wait: float) -> list[str] | None:
    """Take (for the current transaction) the lanes of the pending rows among ``ids``,
    waiting at most ``wait`` seconds; return the keys of those rows (``None``: none of
    them is pending any more).

    Raises :class:`django.db.OperationalError` when a lane stays busy that long.
    """
    with connections[alias].cursor() as cursor:
        cursor.execute(
            "SELECT set_config('lock_timeout', %s, true)", [f"{max(1, int(wait * 1000))}ms"]
        )
        cursor.execute(
            _PG_LOCK_HOOK_LANES.format(table=_table(alias)),
            {"ids": list(ids), "namespace": LANE_LOCK_NAMESPACE},
        )
        lanes = cursor.fetchall()
    if not lanes:
        return None
    return sorted({key for _lane, _lock, keys in lanes for key in keys or ()})


def build_message(row: tuple[Any, ...], exchange: str | None = None) -> OutgoingMessage:
    """The message of a claimed row (headers as a dict or JSON text).

    ``exchange`` is the configured ``EXCHANGE`` (read from the settings when omitted).
    """
    pk, message_id, topic, key, queue, payload_text, headers, created_at = row[:_ATTEMPTS]
    all_headers: dict[str, Any] = (
        json.loads(headers) if isinstance(headers, str) else dict(headers or {})
    )
    if key is not None:
        all_headers[KEY_HEADER] = key
    return OutgoingMessage(
        ref=pk,
        exchange="" if queue else (exchange or str(app_settings.EXCHANGE)),
        routing_key=queue or topic,
        body=payload_text.encode(),
        message_id=message_id,
        topic=topic,
        headers=all_headers,
        timestamp=created_at,
    )


def mark_sent(alias: str, ids: Sequence[Hashable]) -> None:
    """Mark confirmed rows sent (one statement) and send ``events_sent``."""
    if not ids:
        return
    set_sent(alias, ids)
    signals.events_sent.send(sender=OutboxMessage, ids=list(ids), using=alias)


def set_sent(alias: str, ids: Sequence[Hashable]) -> None:
    """The ``UPDATE`` of :func:`mark_sent`, without the signal."""
    if _is_postgres(alias):
        with connections[alias].cursor() as cursor:
            cursor.execute(_PG_MARK_SENT.format(table=_table(alias)), {"ids": list(ids)})
        return
    OutboxMessage.objects.using(alias).filter(pk__in=ids).update(
        status=OutboxMessage.Status.SENT,
        sent_at=Now(),
        attempts=F("attempts") + 1,
        last_error="",
    )


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


def wake_relays(alias: str) -> None:
    """Wake the idle relay daemons of ``alias`` (PostgreSQL ``NOTIFY``; elsewhere they
    poll).  Called when rows are handed to the relay, so they do not wait for its poll."""
    if _is_postgres(alias):
        with connections[alias].cursor() as cursor:
            cursor.execute(f"NOTIFY {WAKE_CHANNEL}")


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
    record_result(alias, result, report)
    return report


def record_result(alias: str, result: PublishResult, report: RelayReport) -> None:
    """Mark what ``result`` settled: confirmed rows sent; refused rows an attempt
    (backoff or dead); rows a broker failure interrupted nothing but ``last_error`` (they
    are due again at once, see :func:`mark_interrupted`)."""
    if result.confirmed:
        mark_sent(alias, result.confirmed)
        report.sent += len(result.confirmed)
    if result.failed:
        report.failed += len(result.failed)
        report.dead += mark_failed(alias, result.failed)
        report.errors.append(next(iter(result.failed.values())))
    if result.interrupted:
        reason = result.broker_error or next(iter(result.interrupted.values()))
        report.interrupted += len(result.interrupted)
        report.broker_error = result.broker_error or report.broker_error
        report.errors.append(reason)
        mark_interrupted(alias, list(result.interrupted), reason)


def mark_interrupted(alias: str, ids: Iterable[Hashable], reason: str | None) -> None:
    """Rows whose publish a broker failure interrupted, or that the on-commit hook left:
    no attempt is counted.

    They keep ``attempts`` and become due now (a reservation of the on-commit hook or
    the lease of a retried row ends: the row is no longer in flight), and ``last_error``
    says why they wait (when ``reason`` is given).  One statement.
    """
    changes: dict[str, Any] = {"next_attempt_at": Least(F("next_attempt_at"), Now())}
    if reason is not None:
        changes["last_error"] = reason[:2000]
    OutboxMessage.objects.using(alias).filter(
        pk__in=list(ids), status=OutboxMessage.Status.PENDING
    ).update(**changes)


# -- the relay ----------------------------------------------------------------------------
class _DatabaseWorker:
    """A helper thread with its own database connection (a relay has two: one for its
    claims, one for its mark-sent updates): the relay's thread keeps publishing while
    PostgreSQL works.

    Only used on PostgreSQL outside an atomic block (rows must be visible to a second
    connection).  A task that fails closes the thread's connection, so the next task
    reconnects.
    """

    def __init__(self, alias: str) -> None:
        self.alias = alias
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reliable-events")

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any]:
        return self._executor.submit(self._call, fn, *args, **kwargs)

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BaseException:
            connections[self.alias].close()
            raise

    def close(self) -> None:
        # ``connections[alias]`` must be looked up in the helper thread: it is thread-local.
        self._executor.submit(self._close_connection)
        self._executor.shutdown(wait=True)

    def _close_connection(self) -> None:
        connections[self.alias].close()


def _done(value: Any) -> Future[Any]:
    future: Future[Any] = Future()
    future.set_result(value)
    return future


class Relay:
    """Publishes due outbox rows in batches; reuse one instance in a loop, then
    :meth:`close` it (which gives its lanes back)."""

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
        self.lanes = LaneShare(self.alias)
        self.breaker = BrokerBreaker()
        self._workers: tuple[_DatabaseWorker, _DatabaseWorker] | None = None
        self._listening: Any = None  # the raw connection this relay LISTENs on

    def _database_workers(self) -> tuple[_DatabaseWorker, _DatabaseWorker] | None:
        """The (claims, marks) helper threads, when this run may use other connections."""
        if not _is_postgres(self.alias) or connections[self.alias].in_atomic_block:
            return None
        if self._workers is None:
            self._workers = (_DatabaseWorker(self.alias), _DatabaseWorker(self.alias))
        return self._workers

    def _broker_ready(self, report: RelayReport) -> bool:
        """Whether to publish now: the breaker is closed and the broker answers.

        Checked before claiming, so that while the broker is down no row is touched.
        """
        if self.breaker.remaining() > 0:
            report.broker_error = self.breaker.error
            return False
        try:
            self.publisher.connect()
        except BrokerError as exc:
            report.broker_error = str(exc)
            self.breaker.trip(str(exc))
            return False
        if self.breaker.down_since is not None:
            self.breaker.reset()  # it answers again (logged); a new failure trips it anew
        return True

    def _settle_breaker(self, report: RelayReport) -> None:
        if report.broker_error:
            self.breaker.trip(report.broker_error)
        elif report.sent or report.failed:
            self.breaker.reset()

    def run_batch(self) -> RelayReport:
        """Claim, publish and mark one batch, waiting for every confirm (stop-and-wait;
        :meth:`run` is the fast path).  Returns what it did (``claimed=0``: idle)."""
        started = time.monotonic()
        report = RelayReport()
        if not self._broker_ready(report):
            return report
        lanes = self.lanes.refresh()
        if not lanes:
            return report
        rows = claim_due(self.alias, lanes, self.batch_size)
        report = publish_rows(
            self.alias, rows, self.publisher, timeout=float(app_settings.CONFIRM_TIMEOUT)
        )
        report.lanes = len(lanes)
        self._settle_breaker(report)
        report.seconds = time.monotonic() - started
        return report

    def run(self, *, max_seconds: float = RUN_SECONDS) -> RelayReport:
        """Stream batches of this relay's lanes through the confirm window.

        The next batch is claimed and the confirmed rows are marked while the broker
        works on the outstanding window, so the broker is never idle waiting for the
        database.  Each claim is the one a lone batch would make, minus the rows this
        run is still publishing (claimed, not yet confirmed or failed): rows of a key go
        out in id order on one channel, and a key's rows are only ever in one relay's
        lanes.  Stops when caught up (a short claim), after a failure, or after
        ``max_seconds``; then waits for every outstanding confirm and marks.  The lanes
        are rebalanced (:class:`LaneShare`) before the run, never during it.

        While the broker is unavailable (:class:`BrokerBreaker` open, or it does not
        answer) it returns at once with ``broker_error`` set and nothing claimed.
        """
        started = time.monotonic()
        report = RelayReport()
        if not self._broker_ready(report):
            return report
        lanes = self.lanes.refresh()
        report.lanes = len(lanes)
        if not lanes:
            return report
        alias, limit = self.alias, self.batch_size
        timeout = float(app_settings.CONFIRM_TIMEOUT)
        exchange = str(app_settings.EXCHANGE)
        workers = self._database_workers()
        # (future of the UPDATE, its ids): on PostgreSQL a helper thread writes the
        # confirmed rows while this thread publishes, and another claims the next batch.
        marks: list[tuple[Future[Any], list[int]]] = []
        next_claim: Future[Any] | None = None
        # Claimed by this run and not yet failed or known to be marked sent: the next
        # claim leaves them out (a row still pending in the database while its mark is
        # in flight must not be claimed twice).
        unsettled: set[int] = set()
        marking: list[tuple[Future[Any], list[int]]] = []

        def claim() -> Future[Any]:
            while marking and marking[0][0].done() and not marking[0][0].exception():
                unsettled.difference_update(marking.pop(0)[1])
            exclude = sorted(unsettled)
            if workers is None:
                return _done(claim_due(alias, lanes, limit, exclude=exclude))
            return workers[0].submit(claim_due, alias, lanes, limit, exclude=exclude)

        def record(result: PublishResult) -> None:
            if result.confirmed:
                ids: list[int] = list(result.confirmed)  # type: ignore[arg-type]
                if workers is None:
                    set_sent(alias, ids)
                    unsettled.difference_update(ids)
                    marks.append((_done(None), ids))
                else:
                    marks.append((workers[1].submit(set_sent, alias, ids), ids))
                    marking.append(marks[-1])
                report.sent += len(ids)
            if result.failed or result.interrupted:
                record_result(
                    alias,
                    PublishResult(
                        failed=result.failed,
                        interrupted=result.interrupted,
                        broker_error=result.broker_error,
                    ),
                    report,
                )
                unsettled.difference_update(result.failed)
                unsettled.difference_update(result.interrupted)

        try:
            next_claim = claim()
            while next_claim is not None:
                rows = next_claim.result()
                next_claim = None
                if not rows:
                    break
                report.claimed += len(rows)
                report.batches += 1
                unsettled.update(row[0] for row in rows)
                last = len(rows) < limit or time.monotonic() - started >= max_seconds
                if not last:  # claim the next batch while this one goes out
                    next_claim = claim()
                messages = [build_message(row, exchange) for row in rows]
                result = self.publisher.publish(messages, timeout=timeout, wait=False)
                record(result)
                if result.failed or result.interrupted or last:
                    break
            if next_claim is not None:
                next_claim.result()  # unused after a failure: those rows stay pending
                next_claim = None
            record(self.publisher.flush(timeout=timeout))
            for future, ids in marks:
                future.result()
                signals.events_sent.send(sender=OutboxMessage, ids=ids, using=alias)
        except BaseException:
            # Outstanding messages are abandoned with the connection: their rows stay
            # pending and go again later (at-least-once), never marked without a confirm.
            self.publisher.close()
            for future in [f for f, _ in marks] + ([next_claim] if next_claim else []):
                future.exception()  # let the helper finish before the lanes change hands
            raise
        self._settle_breaker(report)
        report.seconds = time.monotonic() - started
        return report

    def drain(self, *, max_seconds: float | None = None) -> RelayReport:
        """Publish until nothing is due (or ``max_seconds`` passed), pipelined.

        Stops at once while the broker is unavailable (``broker_error`` in the report).
        A relay that finds every lane held by others waits up to ``LANE_WAIT`` seconds
        for them to release its share.
        """
        started = time.monotonic()
        total = RelayReport()
        while True:
            elapsed = time.monotonic() - started
            budget = RUN_SECONDS
            if max_seconds is not None:
                budget = min(budget, max(0.0, max_seconds - elapsed))
            report = self.run(max_seconds=budget)
            total.add(report)
            if report.broker_error:
                break
            if report.lanes == 0 and elapsed < LANE_WAIT and self.lanes.relays > 1:
                time.sleep(0.1)  # the other relays give up their surplus between runs
                continue
            if report.claimed == 0 or report.sent == 0:
                break  # idle, or the broker refused rows: let backoff work
            if max_seconds is not None and time.monotonic() - started >= max_seconds:
                break
        total.seconds = time.monotonic() - started
        return total

    def wait_for_work(self, seconds: float, stop: Callable[[], bool] | None = None) -> None:
        """Idle: wait up to ``seconds``, returning early when :func:`wake_relays` is
        called (PostgreSQL ``LISTEN`` on this relay's connection) or ``stop()`` is true.
        Without ``NOTIFY`` (SQLite) it just sleeps.  The lanes are given back first."""
        self.rest()
        deadline = time.monotonic() + seconds
        if not _is_postgres(self.alias):
            while not (stop and stop()) and time.monotonic() < deadline:
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
            return
        connection = connections[self.alias]
        connection.ensure_connection()
        raw = connection.connection
        # driver errors (the session was dropped) as Django's, which the loop handles
        with connection.wrap_database_errors:
            if self._listening is not raw:  # a new session: LISTEN again
                raw.execute(f"LISTEN {WAKE_CHANNEL}")
                self._listening = raw
            while not (stop and stop()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                # short slices, so that a stop request is seen within 0.2 s
                for _notify in raw.notifies(timeout=min(0.2, remaining), stop_after=1):
                    return

    def rest(self) -> None:
        """Nothing to do for now (idle, or the broker unavailable): give the lanes back,
        so that on-commit hooks publish their keys without waiting for this relay."""
        self.lanes.rest()

    def close(self) -> None:
        self.publisher.close()
        if self._workers is not None:
            for worker in self._workers:
                worker.close()
            self._workers = None
        try:
            self.lanes.release()
        except DatabaseError:  # the connection is gone, and with it the locks
            logger.debug("reliable_events: releasing lanes failed", exc_info=True)


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
        self.open_until = time.monotonic() + app_settings.seconds("ON_COMMIT_BREAKER_SECONDS")

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


#: Longest the on-commit hook waits for the lanes of its rows (seconds; bounded by
#: ``ON_COMMIT_CONFIRM_TIMEOUT``).  Another hook holds a lane for milliseconds; a relay
#: that holds it for longer is draining it and takes the hook's rows in its next claim.
HOOK_LANE_WAIT = 0.1


def publish_after_commit(ids: Sequence[int], *, using: str | None = None) -> RelayReport:
    """Publish the rows a transaction just committed, bounded in time.

    On PostgreSQL the hook holds the lanes of its rows (so no relay or other hook
    publishes those keys meanwhile) and publishes each key's pending chain in order:
    its own rows and any earlier row of their keys that was missed.  Skipped while the
    breaker is open (the broker failed moments ago), while another thread of this
    process is publishing, or while a lane stays busy (a relay draining it): the rows
    are due at once there, and the relay sends them (woken by ``NOTIFY``).  On SQLite
    the rows are reserved for the hook for ``ON_COMMIT_GRACE_SECONDS`` and only
    published when no earlier row of their key is pending; rows it does not publish are
    handed to the relay at once (their reservation ends).
    """
    alias = _alias(using)
    if dispatcher.breaker_open():
        # The broker failed moments ago: the relay takes these rows now, not after the
        # grace (nothing is charged to them; the relay's breaker paces the broker).
        mark_interrupted(alias, ids, "on-commit publish skipped: the broker failed moments ago")
        return RelayReport()
    timeout = float(app_settings.ON_COMMIT_CONFIRM_TIMEOUT)
    if not dispatcher.lock.acquire(timeout=timeout):
        mark_interrupted(alias, ids, None)
        wake_relays(alias)
        return RelayReport()
    try:
        if not _is_postgres(alias):
            rows = claim_committed(alias, ids)
            if len(rows) < len(ids):
                claimed = {row[0] for row in rows}
                mark_interrupted(alias, [pk for pk in ids if pk not in claimed], None)
            return _publish_committed(alias, rows, timeout)
        locking = True
        try:
            with transaction.atomic(using=alias):
                keys = lock_hook_lanes(alias, ids, min(HOOK_LANE_WAIT, timeout))
                if keys is None:
                    return RelayReport()
                locking = False
                return _publish_committed(alias, claim_committed(alias, ids, keys), timeout)
        except OperationalError:
            if locking:  # a lane stayed busy: its holder (a relay) sends these rows
                wake_relays(alias)
                return RelayReport()
            raise
    finally:
        dispatcher.lock.release()


def _publish_committed(alias: str, rows: list[tuple[Any, ...]], timeout: float) -> RelayReport:
    """Publish the hook's rows; a kept connection found dead is replaced once at once.

    A connection that served earlier publishes may have died since (a broker restart,
    a reset, an idle timeout): that is no reason to leave the rows (and their keys) to
    the relay when a fresh connection works.  A failed fresh connection trips the breaker.
    """
    report = RelayReport(claimed=len(rows), batches=1 if rows else 0)
    if not rows:
        return report
    publisher = dispatcher.get_publisher()
    kept = publisher.connected
    messages = [build_message(row) for row in rows]
    result = publisher.publish(messages, timeout=timeout)
    if result.interrupted and kept and not publisher.connected:
        again = publisher.publish(
            [m for m in messages if m.ref in result.interrupted], timeout=timeout
        )
        result = PublishResult(
            confirmed=[*result.confirmed, *again.confirmed],
            failed={**result.failed, **again.failed},
            interrupted=again.interrupted,
            broker_error=again.broker_error,
        )
    record_result(alias, result, report)
    if report.failed or report.interrupted:
        dispatcher.trip()
    if report.interrupted:
        wake_relays(alias)
    return report


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
