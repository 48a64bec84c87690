"""What publishes an event right after its transaction commits? The on-commit
dispatcher (one publisher per process, with a circuit breaker) and
:func:`publish_after_commit`."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from django.db import (
    OperationalError,
)

from reliable_events import metrics
from reliable_events.broker import (
    Publisher,
    PublishResult,
    open_publisher,
)
from reliable_events.conf import app_settings
from reliable_events.db import is_postgres, own_transaction
from reliable_events.models import OutboxMessage
from reliable_events.relay.claims import (
    ClaimedRow,
    RelayReport,
    build_message,
    claim_committed,
    lock_hook_lanes,
    mark_interrupted,
    outbox_alias,
    record_result,
    wake_relays,
)
from reliable_events.relay.leases import leased
from reliable_events.relay.traced import traced

logger = logging.getLogger(__name__)


# -- on-commit dispatch -----------------------------------------------------------------
class _OnCommitDispatcher:
    """Per-process publisher for the on-commit hook, with a circuit breaker."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.publisher: Publisher | None = None
        self.config: tuple[Any, ...] = ()
        self.open_until = 0.0
        #: Until then (monotonic) this process's hooks leave the lanes a relay holds to
        #: it at once: the last wait for one ran out (a relay draining a backlog).
        self.relays_busy_until = 0.0

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
            self.relays_busy_until = 0.0

    def wait_for_relays(self, alias: str, lanes: list[int], wait: float) -> None:
        """Wait up to ``wait`` seconds for the relays that lease ``lanes`` (the hook's,
        whose locks it holds) to give them back; none of them can take a lane back
        meanwhile.  A relay that catches up gives its lanes back at once
        (:meth:`~reliable_events.relay.engine.Relay.run`): the hook then publishes its
        rows itself, and the relay, having had nothing handed to it, goes idle.  After a
        wait that ran out, waits are skipped for ``HOOK_LEASE_PAUSE``."""
        if time.monotonic() < self.relays_busy_until:
            return
        deadline = time.monotonic() + wait
        pause = 0.001
        while lanes:
            if time.monotonic() + pause > deadline:
                self.relays_busy_until = time.monotonic() + HOOK_LEASE_PAUSE
                return
            time.sleep(pause)
            pause = min(2 * pause, 0.01)
            lanes = leased(alias, lanes)

    def get_publisher(self) -> Publisher:
        url = str(app_settings.BROKER_URL)
        config = (url, app_settings.EXCHANGE, app_settings.QUEUE_TYPE)
        if self.publisher is None or self.config != config:
            if self.publisher is not None:
                self.publisher.close()
            self.publisher = metrics.metered(
                traced(
                    open_publisher(
                        url, connect_timeout=float(app_settings.ON_COMMIT_CONNECT_TIMEOUT)
                    ),
                    "on-commit",
                )
            )
            self.config = config
        return self.publisher


dispatcher = _OnCommitDispatcher()


#: Longest the on-commit hook waits for the lanes of its rows (seconds; bounded by
#: ``ON_COMMIT_CONFIRM_TIMEOUT``).  Another hook holds a lane for milliseconds; a relay
#: that holds it for longer is draining it and takes the hook's rows in its next claim.
HOOK_LANE_WAIT = 0.1
#: Longest the on-commit hook waits for a relay to give back a lane it leases (seconds;
#: bounded by ``ON_COMMIT_CONFIRM_TIMEOUT``).  A relay gives its lanes back as soon as
#: it caught up: without the wait, the rows committed meanwhile would go to it, and a
#: relay slower than the rate of commits would keep every lane (and every event would
#: wait for its next batch).
HOOK_LEASE_WAIT = 0.1
#: How long a process's hooks leave leased lanes to their relay at once after a wait for
#: one ran out (seconds): that relay is draining a backlog.
HOOK_LEASE_PAUSE = 1.0


def publish_after_commit(ids: Sequence[int], *, using: str | None = None) -> RelayReport:
    """Publish the rows a transaction just committed, bounded in time.

    On PostgreSQL the hook holds the lanes of its rows (so no relay or other hook
    publishes those keys meanwhile; a relay takes a lane's lease only with that lock)
    and publishes each key's pending chain in order: its own rows and any earlier row of
    their keys that was missed.  A relay that leases one of those lanes is given up to
    ``HOOK_LEASE_WAIT`` to give it back (it does once caught up); rows of a lane it still
    holds are left to it (woken by ``NOTIFY``).  Skipped while the
    breaker is open (the broker failed moments ago), while another thread of this
    process is publishing, or while a lane stays busy (a relay draining it): the rows
    are due at once there, and the relay sends them (woken by ``NOTIFY``).  On SQLite
    the rows are reserved for the hook for ``ON_COMMIT_GRACE_SECONDS`` and only
    published when no earlier row of their key is pending; rows it does not publish are
    handed to the relay at once (their reservation ends).
    """
    alias = outbox_alias(using)
    if dispatcher.breaker_open():
        # The broker failed moments ago: the relay takes these rows now, woken, not at
        # its next poll (nothing is charged to them; the relay's breaker paces the broker).
        left = mark_interrupted(
            alias, ids, "on-commit publish skipped: the broker failed moments ago"
        )
        _hand_over(alias, "breaker_open", left)
        return RelayReport()
    timeout = float(app_settings.ON_COMMIT_CONFIRM_TIMEOUT)
    if not dispatcher.lock.acquire(timeout=timeout):
        _hand_over(alias, "publisher_busy", mark_interrupted(alias, ids, None))
        return RelayReport()
    try:
        if not is_postgres(alias):
            rows = claim_committed(alias, ids)
            if len(rows) < len(ids):
                claimed = {row.id for row in rows}
                left = mark_interrupted(alias, [pk for pk in ids if pk not in claimed], None)
                metrics.handed_over("not_claimed", left)
            return _publish_committed(alias, rows, timeout)
        locking = True
        try:
            with own_transaction(alias):
                held = lock_hook_lanes(alias, ids, min(HOOK_LANE_WAIT, timeout))
                if held is None:
                    return RelayReport()
                locking = False
                if held.leased:
                    dispatcher.wait_for_relays(alias, held.leased, min(HOOK_LEASE_WAIT, timeout))
                rows = claim_committed(alias, ids, held.keys)
                missed = held.pending - len(set(ids).intersection(row.id for row in rows))
                if missed > 0:  # a relay holds a lane's lease, or a key waits
                    _hand_over(alias, "not_claimed", missed)
                return _publish_committed(alias, rows, timeout)
        except OperationalError:
            if locking:  # a lane stayed busy: its holder (a relay) sends these rows
                # (how many were still pending costs a query: only when it is counted)
                pending = OutboxMessage.objects.using(alias).filter(pk__in=list(ids)).pending()
                _hand_over(alias, "lane_busy", pending.count() if metrics.enabled() else 0)
                return RelayReport()
            raise
    finally:
        dispatcher.lock.release()


def _publish_committed(alias: str, rows: list[ClaimedRow], timeout: float) -> RelayReport:
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
        _hand_over(alias, "broker_failure", report.interrupted)
    return report


def _hand_over(alias: str, reason: str, count: int) -> None:
    """Rows the hook leaves to the relay: wake the relay daemons (``NOTIFY``, so they do
    not wait for a poll) and count them (``metrics.HANDOVER_REASONS``)."""
    wake_relays(alias)
    metrics.handed_over(reason, count)
