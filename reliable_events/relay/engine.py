"""How does the relay run? It moves due outbox rows to the broker, marking sent only what
it confirmed.

One service (:class:`Relay`) backs the Celery task, the ``relay_outbox`` command, the
on-commit hook (:func:`publish_after_commit`) and the admin actions.

How a batch goes (PostgreSQL):

1. **Lanes.**  Every row has a lane (its key's hash modulo ``LANES``).  A relay holds a
   lease on each of its lanes (a row with an expiry and a fencing token, taken and
   renewed in short transactions: :mod:`reliable_events.relay.leases`), so events of one
   key are only ever published by one relay at a time, also through a
   transaction-pooling pooler.  Relays announce themselves (a presence row each) and
   each keeps its fair share of the lanes, ``ceil(LANES / live relays)``
   (:mod:`reliable_events.relay.lanes`).  A relay that dies stops renewing; the others
   take its lanes once its leases expired (``RELAY_LEASE_SECONDS``).
2. **Claim.**  In a short transaction: ``SELECT ... FOR UPDATE SKIP LOCKED`` the due
   pending rows of the lanes whose lease (and token) the relay still holds with half
   the lease time left, oldest first, leaving out every row whose key has an
   earlier pending row that is not yet due (a failing event holds back its own key and
   nothing else).  A retried event goes without its key's later events (see
   :func:`reliable_events.relay.claims._retries_go_alone`), so that if it fails again they
   are not already on their way.
3. **Publish** them in id order through the confirm window (:mod:`reliable_events.broker`).
4. **Mark**: the confirmed rows become ``sent`` in one statement (if the relay still
   holds their lane's token; otherwise they stay pending for the lane's new holder and a
   warning says so); each row the broker
   refused (``basic.nack``, ``basic.return``) gets ``attempts + 1``, ``last_error`` and
   ``next_attempt_at = now() + backoff`` (database clock, exponential with jitter), or
   ``dead`` once it reached ``MAX_ATTEMPTS``.  Rows a *broker* failure interrupted
   (connection refused or lost, blocked, confirm timeout) are not charged: they stay due,
   and the relay as a whole pauses (:class:`~reliable_events.relay.breaker.BrokerBreaker`:
   jittered, at most
   ``RELAY_BROKER_RETRY_MAX``) and tries the broker again.

On SQLite (the embedded default) ``FOR UPDATE`` is a no-op: one relay at a time holds
every lane, through one lease row (a second relay waits; ``docs/relay.md``).

The on-commit hook publishes the rows its transaction stored.  On PostgreSQL they are
due at once; the hook holds their lanes (transaction-level advisory locks), leaves the
lanes a relay holds a lease on to that relay, and publishes
each of their keys' pending chains in order, so a row it missed goes with the next event
of its key (see :func:`reliable_events.relay.on_commit.publish_after_commit`).  On SQLite
``publish_event`` stored them with ``next_attempt_at = now + ON_COMMIT_GRACE_SECONDS``:
that reservation is the hook's claim there.  Whatever the hook could not confirm stays
pending for the relay.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from django.db import (
    DatabaseError,
    connections,
)

from reliable_events import metrics, pg_listen, signals
from reliable_events.broker import (
    Publisher,
    PublishResult,
    open_publisher,
)
from reliable_events.conf import app_settings
from reliable_events.db import is_postgres
from reliable_events.exceptions import BrokerError
from reliable_events.models import OutboxMessage
from reliable_events.relay.breaker import BrokerBreaker
from reliable_events.relay.claims import (
    WAKE_CHANNEL,
    RelayReport,
    build_message,
    claim_due,
    outbox_alias,
    publish_rows,
    record_result,
    set_sent,
)
from reliable_events.relay.lanes import LaneShare
from reliable_events.relay.leases import lease_seconds
from reliable_events.relay.pooling import listen_works
from reliable_events.relay.traced import traced

logger = logging.getLogger(__name__)


#: Longest one :meth:`Relay.run` streams batches before it rebalances its lanes, seconds.
RUN_SECONDS = 1.0
#: Longest :meth:`Relay.drain` waits for a share of the lanes when others hold them all
#: (live relays give up their surplus between runs); at least a lease and a second,
#: when the leases of a relay that died must run out.
LANE_WAIT = 3.0
#: Runs in a row :meth:`Relay.drain` retries after an empty claim that found its leases
#: due for renewal (not an empty outbox: the claim needs half a lease left).
MAX_LAPSES = 3


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
        self.alias = outbox_alias(using)
        self.batch_size = max(1, int(batch_size or app_settings.RELAY_BATCH_SIZE))
        self.publisher = metrics.metered(traced(publisher or open_publisher(), "relay"))
        self.lanes = LaneShare(self.alias)
        self.breaker = BrokerBreaker()
        self._workers: tuple[_DatabaseWorker, _DatabaseWorker] | None = None
        self._listening: Any = None  # the raw connection this relay LISTENs on

    def _database_workers(self) -> tuple[_DatabaseWorker, _DatabaseWorker] | None:
        """The (claims, marks) helper threads, when this run may use other connections."""
        if not is_postgres(self.alias) or connections[self.alias].in_atomic_block:
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
        fence = self.lanes.fence()
        timeout = float(app_settings.CONFIRM_TIMEOUT)
        with self.lanes.kept(timeout):
            rows = claim_due(self.alias, lanes, self.batch_size, fence=fence)
            report = publish_rows(self.alias, rows, self.publisher, timeout=timeout, fence=fence)
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
        are rebalanced (:class:`LaneShare`) before the run, never during it, and given
        back after a run that caught up (to the on-commit hooks).

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
        max_seconds = min(max_seconds, self.lanes.run_budget())
        fence = self.lanes.fence()
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
        caught_up = False  # the last claim was short: nothing more is due
        retried = False

        def claim() -> Future[Any]:
            while marking and marking[0][0].done() and not marking[0][0].exception():
                unsettled.difference_update(marking.pop(0)[1])
            exclude = sorted(unsettled)
            if workers is None:
                return _done(claim_due(alias, lanes, limit, exclude=exclude, fence=fence))
            return workers[0].submit(claim_due, alias, lanes, limit, exclude=exclude, fence=fence)

        def record(result: PublishResult) -> None:
            if result.confirmed:
                ids: list[int] = list(result.confirmed)  # type: ignore[arg-type]
                if workers is None:
                    left = set_sent(alias, ids, fence)
                    unsettled.difference_update(ids)
                    marks.append((_done(left), ids))
                else:
                    marks.append((workers[1].submit(set_sent, alias, ids, fence), ids))
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

        # While rows are in flight a thread keeps the leases (see LaneShare.kept), at most
        # as long as the run may wait on the broker: its last publish and its flush.
        with self.lanes.kept(max_seconds + 2 * timeout):
            try:
                next_claim = claim()
                while next_claim is not None:
                    rows = next_claim.result()
                    next_claim = None
                    # a retried row holds its key's later rows back while it is in flight
                    retried = retried or any(row.attempts for row in rows)
                    caught_up = len(rows) < limit and not retried
                    if not rows:
                        break
                    report.claimed += len(rows)
                    report.batches += 1
                    unsettled.update(row.id for row in rows)
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
                    left = future.result()
                    if left:  # the lease was lost: those rows stay pending for the new holder
                        report.sent -= len(left)
                        report.interrupted += len(left)
                        gone = set(left)
                        ids = [pk for pk in ids if pk not in gone]
                    signals.events_sent.send(sender=OutboxMessage, ids=ids, using=alias)
            except BaseException:
                # Outstanding messages are abandoned with the connection: their rows stay
                # pending and go again later (at-least-once), never marked without a confirm.
                self.publisher.close()
                for future in [f for f, _ in marks] + ([next_claim] if next_claim else []):
                    future.exception()  # let the helper finish before the lanes change hands
                raise
        report.caught_up = caught_up and not self.lanes.lapsed()
        if report.caught_up:
            # The rows committed from now on are the on-commit hooks' to publish: those
            # waiting for these lanes (HOOK_LEASE_WAIT) take them now, and this relay
            # takes them back (what no hook holds) at its next run.
            self.rest()
        self._settle_breaker(report)
        report.seconds = time.monotonic() - started
        metrics.relay_run(report)
        return report

    def drain(self, *, max_seconds: float | None = None) -> RelayReport:
        """Publish until nothing is due (or ``max_seconds`` passed), pipelined.

        Stops at once while the broker is unavailable (``broker_error`` in the report).
        A relay that finds every lane held by others waits up to ``LANE_WAIT`` seconds
        (at least a lease and a second: a dead relay's leases run out) for its share.
        """
        started = time.monotonic()
        total = RelayReport()
        lapses = 0
        lane_wait = max(LANE_WAIT, lease_seconds() + 1.0)
        while True:
            elapsed = time.monotonic() - started
            budget = RUN_SECONDS
            if max_seconds is not None:
                budget = min(budget, max(0.0, max_seconds - elapsed))
            report = self.run(max_seconds=budget)
            total.add(report)
            if report.broker_error:
                break
            if report.lanes == 0 and elapsed < lane_wait and self.lanes.relays > 1:
                time.sleep(0.1)  # the other relays give up their surplus between runs
                continue
            if report.claimed == 0 and self.lanes.lapsed() and lapses < MAX_LAPSES:
                lapses += 1  # the leases ran short before the claim (a slow host): renew
                continue
            if report.claimed == 0 or report.sent == 0 or report.caught_up:
                break  # idle or caught up, or the broker refused rows: let backoff work
            lapses = 0
            if max_seconds is not None and time.monotonic() - started >= max_seconds:
                break
        total.seconds = time.monotonic() - started
        return total

    def wait_for_work(self, seconds: float, stop: Callable[[], bool] | None = None) -> None:
        """Idle: wait up to ``seconds``, returning early when :func:`wake_relays` is
        called (PostgreSQL ``LISTEN`` on this relay's connection) or ``stop()`` is true.
        Without ``NOTIFY`` (SQLite), or behind a transaction-pooling pooler where a
        ``LISTEN`` would be lost (``RELAY_LISTEN``, see
        :func:`reliable_events.relay.pooling.listen_works`), it just sleeps: a poll every
        ``seconds``.  The lanes are given back first; the relay's presence is renewed
        while it waits."""
        self.rest()
        deadline = time.monotonic() + seconds
        if not is_postgres(self.alias):
            while not (stop and stop()) and time.monotonic() < deadline:
                self.lanes.keep_alive()
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
            return
        connection = connections[self.alias]
        connection.ensure_connection()
        raw = connection.connection
        # driver errors (the session was dropped) as Django's, which the loop handles
        with connection.wrap_database_errors:
            listen = self._listening is raw or listen_works(connection)
            if listen and self._listening is not raw:  # a new session: LISTEN again
                pg_listen.listen(raw, WAKE_CHANNEL)
                self._listening = raw
            while not (stop and stop()):
                self.lanes.keep_alive()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                # short slices, so that a stop request is seen within 0.2 s
                if not listen:
                    time.sleep(min(0.2, remaining))
                    continue
                if pg_listen.wait(raw, min(0.2, remaining)):
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
        except DatabaseError:  # the leases expire on their own
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
