"""Which rows go out, and what became of them? The claim SQL, building messages, marking
rows sent / failed / dead (with backoff) and retrying dead rows."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from django.db import (
    connections,
)
from django.db.models import Exists, F, OuterRef, TextField
from django.db.models.functions import Cast, Least, Now
from django.utils import timezone

from reliable_events import metrics, signals
from reliable_events.broker import (
    BUCKET_HEADER,
    KEY_HEADER,
    OutgoingMessage,
    Publisher,
    PublishResult,
    key_bucket,
)
from reliable_events.conf import app_settings
from reliable_events.db import is_postgres, own_transaction, write_alias
from reliable_events.models import LaneLease, OutboxMessage
from reliable_events.relay.leases import LANE_LOCK_NAMESPACE, LIVE_LEASE, Fence, lease_filter
from reliable_events.reports import Report

logger = logging.getLogger(__name__)


#: PostgreSQL ``LISTEN``/``NOTIFY`` channel on which idle relay daemons are woken.
WAKE_CHANNEL = "reliable_events_relay"


class ClaimedRow(NamedTuple):
    """One claimed outbox row (``_PG_COLUMNS`` and ``_FIELDS`` select in this order); built from the
    cursor's row tuple with ``_make`` (no per-row work beyond that)."""

    id: int
    message_id: str
    topic: str
    key: str | None
    queue: str
    payload_text: str
    #: A dict (ORM) or JSON text / ``None`` (PostgreSQL's claim SQL).
    headers: Any
    #: A datetime (ORM) or epoch seconds (PostgreSQL's claim SQL).
    created_at: Any
    #: Failed attempts so far (not part of the message).
    attempts: int


#: The claim's columns (ORM version), in ``ClaimedRow`` order.
_FIELDS = ClaimedRow._fields

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
  AND NOT EXISTS (
    SELECT 1 FROM {lease} l
    WHERE l.lane = o.lane AND {live_lease})
ORDER BY o.id
LIMIT %(limit)s
FOR UPDATE OF o SKIP LOCKED"""
# Waits (bounded by lock_timeout) for the lanes of the hook's pending rows, in lane order
# so that two hooks cannot deadlock; released at the end of the hook's transaction.
# Returns the keys of those rows, per lane, how many they are, and whether a relay holds
# the lane's lease.
#: ``lock_timeout`` is set (for the transaction) before the locks: the lanes' subquery
#: reads its result, so it runs first.
_PG_LOCK_HOOK_LANES = """SELECT s.lane, pg_advisory_xact_lock(%(namespace)s, s.lane), s.keys,
  s.pending, EXISTS (SELECT 1 FROM {lease} l WHERE l.lane = s.lane AND {live_lease})
FROM (SELECT set_config('lock_timeout', %(timeout)s, true) AS timeout) t,
LATERAL (SELECT lane, array_agg(DISTINCT key) FILTER (WHERE key IS NOT NULL) AS keys,
      count(*) AS pending
      FROM {table} WHERE t.timeout IS NOT NULL
      AND id = ANY(%(ids)s::bigint[]) AND status = 'pending'
      GROUP BY lane ORDER BY lane) s"""
# Pending rows only: a row published twice (a lease that expired in flight) keeps its
# first mark, and its attempts count the tries of that one.
_PG_MARK_SENT = """UPDATE {table} SET status = 'sent', sent_at = statement_timestamp(),
    attempts = attempts + 1, last_error = ''
WHERE id = ANY(%(ids)s::bigint[]) AND status = 'pending' {fence_filter}"""
# The rows among ``ids`` a fenced mark left pending (rare: the lease was lost).
_PG_NOT_MARKED = """SELECT id FROM {table}
WHERE id = ANY(%(ids)s::bigint[]) AND status = 'pending' ORDER BY id"""


#: Errors a :class:`RelayReport` keeps.
MAX_ERRORS = 5


@dataclass
class RelayReport(Report):
    """What one relay call did."""

    TEXT_FIELDS = ("claimed", "sent", "failed", "dead", "interrupted", "batches", "seconds")

    claimed: int = 0
    sent: int = 0
    #: Rows the broker refused (each counted as an attempt).
    failed: int = 0
    dead: int = 0
    #: Rows a broker failure interrupted (not counted as attempts; they go again).
    interrupted: int = 0
    batches: int = 0
    seconds: float = 0.0
    #: A few of the errors (the first :data:`MAX_ERRORS`: a daemon's totals add up forever).
    errors: list[str] = field(default_factory=list)
    #: Why the broker was unavailable, when it was (nothing was charged to the rows).
    broker_error: str = ""
    #: Lanes the relay held.
    lanes: int = 0
    #: The last claim was short: nothing more was due (the run gave its lanes back).
    caught_up: bool = False

    def add(self, other: RelayReport) -> None:
        self.claimed += other.claimed
        self.sent += other.sent
        self.failed += other.failed
        self.dead += other.dead
        self.interrupted += other.interrupted
        self.batches += other.batches
        self.seconds += other.seconds
        self.errors.extend(other.errors[: max(0, MAX_ERRORS - len(self.errors))])
        self.broker_error = other.broker_error or self.broker_error
        self.lanes = max(self.lanes, other.lanes)
        self.caught_up = other.caught_up


def backoff_seconds(attempts: int) -> float:
    """Delay before attempt ``attempts + 1``: exponential, capped, with equal jitter
    (on the relay's clock: ``TIME_SCALE`` applies)."""
    base = app_settings.seconds("BACKOFF_BASE")
    cap = app_settings.seconds("BACKOFF_MAX")
    exponent = min(max(attempts - 1, 0), 62)
    ceiling = min(cap, base * (2.0**exponent))
    return ceiling * (0.5 + random.random() / 2)


def outbox_alias(using: str | None) -> str:
    return write_alias(OutboxMessage, using)


# -- claim / build / mark -----------------------------------------------------------------
def _rows_query(alias: str) -> Any:
    return OutboxMessage.objects.using(alias).annotate(
        payload_text=Cast("payload", output_field=TextField())
    )


def _table(alias: str) -> str:
    return connections[alias].ops.quote_name(OutboxMessage._meta.db_table)


def _lease_table(alias: str) -> str:
    return connections[alias].ops.quote_name(LaneLease._meta.db_table)


def claim_due(
    alias: str,
    lanes: Sequence[int],
    limit: int,
    *,
    exclude: Sequence[int] = (),
    fence: Fence | None = None,
) -> list[ClaimedRow]:
    """Due pending rows of ``lanes``, oldest first, minus keys held back by a failure.

    ``exclude``: ids to leave out (the rows this relay is publishing already).
    ``fence`` (PostgreSQL, a relay's leases): only rows of the lanes it still holds with
    its tokens and enough lease left (``lanes`` is then ignored).
    """
    if is_postgres(alias):
        all_lanes = len(lanes) >= int(app_settings.LANES)
        if fence is not None:
            lane_filter = f"AND o.lane = ANY({lease_filter(_lease_table(alias), margin=True)})"
        else:
            lane_filter = "" if all_lanes else "AND o.lane = ANY(%(lanes)s::int[])"
        sql = _PG_CLAIM_DUE.format(
            columns=_PG_COLUMNS,
            table=_table(alias),
            lane_filter=lane_filter,
            exclude_filter="AND o.id <> ALL(%(exclude)s::bigint[])" if exclude else "",
        )
        params: dict[str, Any] = {"limit": limit, "lanes": list(lanes), "exclude": list(exclude)}
        if fence is not None:
            params.update(fence.params())
        with own_transaction(alias), connections[alias].cursor() as cursor:
            cursor.execute(_PG_CLAIM_PLAN)
            cursor.execute(sql, params)
            rows = list(map(ClaimedRow._make, cursor.fetchall()))
            return _retries_go_alone(alias, rows)
    query = (
        _rows_query(alias)
        .filter(status=OutboxMessage.Status.PENDING, next_attempt_at__lte=Now())
        .exclude(id__in=list(exclude))
        .filter(~Exists(OutboxMessage.objects.using(alias).holding_back()))
        .order_by("id")
    )
    if len(lanes) < int(app_settings.LANES):
        query = query.filter(lane__in=lanes)
    with own_transaction(alias):
        return _retries_go_alone(
            alias,
            list(
                map(
                    ClaimedRow._make,
                    query.select_for_update(skip_locked=True, of=("self",)).values_list(*_FIELDS)[
                        :limit
                    ],
                )
            ),
        )


def _retries_go_alone(alias: str, rows: list[ClaimedRow]) -> list[ClaimedRow]:
    """Leave out the rows whose key has a retried row (one that failed before) earlier in
    the batch, and lease that row (``next_attempt_at`` pushed past the confirm timeout).

    A retried event thus goes without its key's later events, in this batch and, through
    the lease (an earlier row not due holds back its key), in the batches claimed while
    it is in flight: if it fails again (a ``basic.nack``), they cannot overtake it.  The
    outcome replaces the lease: sent, or the next backoff.  Called inside the claim's
    transaction; costs nothing when no claimed row failed before (``attempts`` comes
    with the claim).
    """
    retried = {row.id for row in rows if row.attempts}
    if not retried:
        return rows
    waiting: set[str] = set()
    kept, leased = [], []
    for row in rows:
        pk, key = row.id, row.key
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


def claim_committed(alias: str, ids: Sequence[int], keys: Sequence[str] = ()) -> list[ClaimedRow]:
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
    if is_postgres(alias):
        sql = _PG_CLAIM_CHAINS.format(
            columns=_PG_COLUMNS,
            table=_table(alias),
            lease=_lease_table(alias),
            live_lease=LIVE_LEASE,
        )
        limit = len(ids) + int(app_settings.ON_COMMIT_CHAIN_LIMIT)
        with connections[alias].cursor() as cursor:
            cursor.execute(sql, {"ids": list(ids), "keys": list(keys), "limit": limit})
            chains = list(map(ClaimedRow._make, cursor.fetchall()))
            return _retries_go_alone(alias, chains)
    earlier = (
        OutboxMessage.objects.using(alias)
        .filter(status=OutboxMessage.Status.PENDING, key=OuterRef("key"), id__lt=OuterRef("id"))
        .exclude(id__in=ids)
    )
    return list(
        map(
            ClaimedRow._make,
            _rows_query(alias)
            .filter(id__in=ids, status=OutboxMessage.Status.PENDING)
            .filter(~Exists(earlier))
            .order_by("id")
            .values_list(*_FIELDS),
        )
    )


class HookLanes(NamedTuple):
    """The lanes :func:`lock_hook_lanes` took: the keys of the hook's pending rows, and
    the lanes among them a relay held a lease on (those rows are the relay's while it
    holds it)."""

    keys: list[str]
    leased: list[int]
    #: How many of the hook's rows were pending (the others: sent already, or rolled back).
    pending: int


def lock_hook_lanes(alias: str, ids: Sequence[int], wait: float) -> HookLanes | None:
    """Take (for the current transaction) the lanes of the pending rows among ``ids``,
    waiting at most ``wait`` seconds (``None``: none of them is pending any more).

    Raises :class:`django.db.OperationalError` when a lane stays busy that long.
    """
    with connections[alias].cursor() as cursor:
        cursor.execute(
            _PG_LOCK_HOOK_LANES.format(
                table=_table(alias), lease=_lease_table(alias), live_lease=LIVE_LEASE
            ),
            {
                "ids": list(ids),
                "namespace": LANE_LOCK_NAMESPACE,
                "timeout": f"{max(1, int(wait * 1000))}ms",
            },
        )
        lanes = cursor.fetchall()
    if not lanes:
        return None
    return HookLanes(
        keys=sorted({key for _lane, _lock, keys, _pending, _leased in lanes for key in keys or ()}),
        leased=[lane for lane, _lock, _keys, _pending, leased in lanes if leased],
        pending=sum(pending for _lane, _lock, _keys, pending, _leased in lanes),
    )


def build_message(row: ClaimedRow, exchange: str | None = None) -> OutgoingMessage:
    """The message of a claimed row (headers as a dict or JSON text).

    ``exchange`` is the configured ``EXCHANGE`` (read from the settings when omitted).
    """
    headers, key, queue = row.headers, row.key, row.queue
    all_headers: dict[str, Any] = (
        json.loads(headers) if isinstance(headers, str) else dict(headers or {})
    )
    if key is not None:
        all_headers[KEY_HEADER] = key
    all_headers[BUCKET_HEADER] = key_bucket(row.message_id if key is None else key)
    return OutgoingMessage(
        ref=row.id,
        exchange="" if queue else (exchange or str(app_settings.EXCHANGE)),
        routing_key=queue or row.topic,
        body=row.payload_text.encode(),
        message_id=row.message_id,
        topic=row.topic,
        headers=all_headers,
        timestamp=row.created_at,
    )


def mark_sent(alias: str, ids: Sequence[Hashable], fence: Fence | None = None) -> list[int]:
    """Mark confirmed rows sent (one statement) and send ``events_sent``; returns the
    ids a ``fence`` left pending (see :func:`set_sent`)."""
    if not ids:
        return []
    left = set_sent(alias, ids, fence)
    marked = [pk for pk in ids if pk not in set(left)] if left else list(ids)
    signals.events_sent.send(sender=OutboxMessage, ids=marked, using=alias)
    return left


def set_sent(alias: str, ids: Sequence[Hashable], fence: Fence | None = None) -> list[int]:
    """The ``UPDATE`` of :func:`mark_sent`, without the signal.

    ``fence`` (PostgreSQL, a relay's leases): only rows of lanes it still holds with its
    tokens are marked; returns the ids left pending because their lane changed hands (the
    new holder publishes them again: a duplicate, never a loss), normally none.
    """
    if is_postgres(alias):
        params: dict[str, Any] = {"ids": list(ids)}
        fence_filter = ""
        if fence is not None:
            fence_filter = f"AND lane = ANY({lease_filter(_lease_table(alias), margin=False)})"
            params.update(fence.params())
        with connections[alias].cursor() as cursor:
            sql = _PG_MARK_SENT.format(table=_table(alias), fence_filter=fence_filter)
            cursor.execute(sql, params)
            marked = cursor.rowcount
            if marked >= len(ids):
                return []
            cursor.execute(_PG_NOT_MARKED.format(table=_table(alias)), {"ids": list(ids)})
            left = [int(row[0]) for row in cursor.fetchall()]
        _sent_twice(len(ids) - marked - len(left))
        if left:
            logger.warning(
                "reliable_events: %d confirmed outbox row(s) left pending: this relay lost "
                "the lease of their lane while publishing (they go again: duplicates)",
                len(left),
            )
        return left
    marked = (
        OutboxMessage.objects.using(alias)
        .filter(pk__in=ids, status=OutboxMessage.Status.PENDING)
        .update(
            status=OutboxMessage.Status.SENT,
            sent_at=Now(),
            attempts=F("attempts") + 1,
            last_error="",
        )
    )
    _sent_twice(len(ids) - marked)
    return []


def _sent_twice(count: int) -> None:
    """Rows confirmed again after another publisher marked them: they keep that mark."""
    if count > 0:
        metrics.sent_twice(count)
        logger.warning(
            "reliable_events: %d confirmed outbox row(s) had been sent already: they went "
            "out twice (a lane's lease expired while its relay waited for the broker); "
            "consumers skip the second copy",
            count,
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
    if len(rows) > dead:
        first = next(row for row in rows if row.status != OutboxMessage.Status.DEAD)
        logger.warning(
            "reliable_events: the broker did not take %d outbox message(s) (e.g. #%s, "
            "attempt %d: %s); each is tried again after its backoff (its key's later "
            "events wait), dead after %d attempts",
            len(rows) - dead,
            first.pk,
            first.attempts,
            first.last_error[:300],
            max_attempts,
        )
    if dead:
        logger.error(
            "reliable_events: %d outbox message(s) are dead after %d attempts", dead, max_attempts
        )
    return dead


def wake_relays(alias: str) -> None:
    """Wake the idle relay daemons of ``alias`` (PostgreSQL ``NOTIFY``; elsewhere they
    poll).  Called when rows are handed to the relay, so they do not wait for its poll."""
    if is_postgres(alias):
        with connections[alias].cursor() as cursor:
            cursor.execute(f"NOTIFY {WAKE_CHANNEL}")


def _db_now(alias: str) -> datetime:
    """The database's clock (PostgreSQL), else this process's."""
    if is_postgres(alias):
        with connections[alias].cursor() as cursor:
            cursor.execute("SELECT statement_timestamp()")
            value: datetime = cursor.fetchone()[0]
            return value
    return timezone.now()


def publish_rows(
    alias: str,
    rows: Sequence[ClaimedRow],
    publisher: Publisher,
    *,
    timeout: float,
    fence: Fence | None = None,
) -> RelayReport:
    """Publish ``rows`` and record the outcome of each."""
    report = RelayReport(claimed=len(rows), batches=1)
    if not rows:
        return report
    result = publisher.publish([build_message(row) for row in rows], timeout=timeout)
    record_result(alias, result, report, fence)
    return report


def record_result(
    alias: str, result: PublishResult, report: RelayReport, fence: Fence | None = None
) -> None:
    """Mark what ``result`` settled: confirmed rows sent; refused rows an attempt
    (backoff or dead); rows a broker failure interrupted nothing but ``last_error`` (they
    are due again at once, see :func:`mark_interrupted`)."""
    if result.confirmed:
        left = mark_sent(alias, result.confirmed, fence)
        report.sent += len(result.confirmed) - len(left)
        report.interrupted += len(left)
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


def mark_interrupted(alias: str, ids: Iterable[Hashable], reason: str | None) -> int:
    """Rows whose publish a broker failure interrupted, or that the on-commit hook left:
    no attempt is counted.

    They keep ``attempts`` and become due now (a reservation of the on-commit hook or
    the lease of a retried row ends: the row is no longer in flight), and ``last_error``
    says why they wait (when ``reason`` is given).  One statement; returns how many of
    ``ids`` were pending.
    """
    changes: dict[str, Any] = {"next_attempt_at": Least(F("next_attempt_at"), Now())}
    if reason is not None:
        changes["last_error"] = reason[:2000]
    return (
        OutboxMessage.objects.using(alias)
        .filter(pk__in=list(ids), status=OutboxMessage.Status.PENDING)
        .update(**changes)
    )


# -- retrying dead rows ---------------------------------------------------------------------
def retry_dead(ids: Iterable[int] | None = None, *, using: str | None = None) -> int:
    """Make dead outbox rows pending again (attempts reset); returns how many."""
    alias = outbox_alias(using)
    query = OutboxMessage.objects.using(alias).dead()
    if ids is not None:
        query = query.filter(pk__in=list(ids))
    return query.update(
        status=OutboxMessage.Status.PENDING, attempts=0, next_attempt_at=Now(), last_error=""
    )
