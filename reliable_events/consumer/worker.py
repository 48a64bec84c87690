"""How does the consume loop run? Deliveries in; effects, acks, delayed retries and dead
letters out.

One :class:`Worker` runs one or more :class:`~reliable_events.consumer.EventConsumer`
subclasses over one broker connection (``consume_events``, the Celery
``ConsumerStep``).  For each delivery, in order:

1. **Decode** (:func:`decode_event`).  A body over ``MAX_PAYLOAD_BYTES``, a content type
   other than JSON, a body that is not UTF-8 JSON, a missing message id or an
   ``x-event-attempt`` header that is not a number from 1 to ``MAX_ATTEMPT`` is *poison*:
   it becomes a ``DeadLetter`` with that reason, is acked, and the loop goes on.  So is a
   message the transport itself could not read (``undecodable``: e.g. a kombu virtual
   transport's stored message that fails to decode inside ``drain_events``).
2. **Process** (:meth:`EventConsumer.process`): in one ``transaction.atomic()``, insert
   ``ProcessedMessage(consumer, message_id)`` and run ``handle``.  Already processed:
   nothing runs.
   With ``batch_size`` > 1 (the default, ``CONSUMER_BATCH_SIZE`` 100) up to that many
   deliveries of one consumer share one transaction: the batch's records in one insert,
   each ``handle`` in its own savepoint (a failing one is rolled back alone and settled
   on its own below), one commit, then one ``multiple`` ack for the batch.
3. **Settle.**  Processed or duplicate: ack (only now, after the commit).  ``handle``
   raised: with retries left, re-publish the message (same body and message id, the
   attempt count in ``x-event-attempt``) to the delay queue ``<name>.retry.<n>`` and wait
   for the broker's confirm, then ack; otherwise, or at once on ``PermanentError``,
   write a ``DeadLetter`` (payload, headers, error, traceback, attempts, history), then
   ack.  If the retry publish is not confirmed the message is rejected back to its queue
   (never acked), so it is delivered again.

Faults: a crash anywhere before the ack means the broker delivers the message again,
and the idempotency record makes that harmless.  A lost broker connection is re-opened
with exponential backoff (the unacked messages are redelivered).  A database that goes
away mid-handler leaves the message unacked; the worker waits (with backoff, keeping
the broker connection alive) until the database answers, then processes it again.
SIGTERM (through a :class:`~reliable_events.runner.StopFlag`) lets the current message
finish and be acked; prefetched messages not yet started go back to the queue.

Transports: on ``amqp://`` the worker speaks py-amqp directly (manual acks, ``basic.qos``
prefetch, delay queues with TTL).  On ``db://`` (:mod:`reliable_events.broker.database`)
the claim, the handler and the "ack" are one database transaction, and a retry is a row
due later.  On the in-process ``memory://`` transport, which has no TTL
dead-lettering, a retry is an ``OutboxMessage`` row
addressed to the consumer's queue with ``next_attempt_at = now + delay``: the relay
delivers it when it is due (on ``memory://`` the worker runs that relay itself when
idle, since no other process can reach its queues).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from django.db import (
    DatabaseError,
    InterfaceError,
)

from reliable_events import metrics, queue_loss, tracing
from reliable_events.broker.base import POLL_SECONDS, Delivery
from reliable_events.broker.connect import open_transport
from reliable_events.conf import app_settings
from reliable_events.consumer.base import Event, EventConsumer, HandlerResult, Outcome, registry
from reliable_events.consumer.db import (
    close_all_connections,
    close_stale_connections,
    database_answers,
)
from reliable_events.consumer.ordering import OrderedRuntime, RetryInPlace
from reliable_events.consumer.processor import Processor
from reliable_events.consumer.retries import RetryPublishFailed, retry_scheduler
from reliable_events.consumer.wire import log_duplicate, log_redelivery
from reliable_events.exceptions import (
    ConfigurationError,
    DatabaseUnavailable,
    ReliableEventsError,
)
from reliable_events.heartbeats import HeartbeatWriter, left_behind, topology_of
from reliable_events.relay.engine import Relay
from reliable_events.reports import Report
from reliable_events.runner import StopFlag
from reliable_events.sanitize import describe_error

logger = logging.getLogger(__name__)

#: The same delivery failing on a lost database connection this many times in a row while
#: the database answers at once is sent back to its queue instead of retried in place.
_MAX_OUTAGES_PER_DELIVERY = 10
#: A batch transaction takes no further message after it has been open this long, so
#: that slow handlers are not held in one long transaction (and its locks).
BATCH_MAX_SECONDS = 0.25


# -- the worker --------------------------------------------------------------------------
@dataclass
class WorkerStats(Report):
    """Counters of one :meth:`Worker.run`."""

    TEXT_FIELDS = (
        "processed",
        "duplicates",
        "retried",
        "dead_lettered",
        "poison",
        "parked",
        "requeued",
        "reconnects",
        "database_outages",
    )

    received: int = 0
    processed: int = 0
    duplicates: int = 0
    retried: int = 0
    dead_lettered: int = 0
    poison: int = 0
    parked: int = 0
    requeued: int = 0
    reconnects: int = 0
    database_outages: int = 0
    handler_seconds: float = 0.0
    slowest_seconds: float = 0.0
    started: float = field(default_factory=time.monotonic)
    #: monotonic time of the first and the last settled delivery.
    first_settled: float | None = None
    last_settled: float | None = None
    #: The broker could not be reached when the run ended (``--until-idle`` expired).
    disconnected: bool = False

    @property
    def settled(self) -> int:
        return (
            self.processed
            + self.duplicates
            + self.retried
            + self.dead_lettered
            + self.poison
            + self.parked
        )

    def rate(self) -> float:
        """Settled deliveries per second, between the first and the last one."""
        if self.first_settled is None or self.last_settled is None or self.settled < 2:
            return 0.0
        span = self.last_settled - self.first_settled
        return (self.settled - 1) / span if span > 0 else 0.0

    def count(self, outcome: Outcome) -> None:
        if outcome is Outcome.PROCESSED:
            self.processed += 1
        elif outcome is Outcome.DUPLICATE:
            self.duplicates += 1
        elif outcome is Outcome.RETRIED:
            self.retried += 1
        elif outcome is Outcome.DEAD_LETTERED:
            self.dead_lettered += 1
        elif outcome is Outcome.POISON:
            self.poison += 1
        elif outcome is Outcome.PARKED:
            self.parked += 1
        now = time.monotonic()
        if self.first_settled is None:
            self.first_settled = now
        self.last_settled = now

    def extra_text(self) -> dict[str, str]:
        mean = self.handler_seconds / self.processed * 1000 if self.processed else 0.0
        return {"handler_mean_ms": f"{mean:.2f}", "rate": f"{self.rate():.0f}/s"}


class Worker:
    """Runs consumers until stopped (or idle for ``until_idle`` seconds).

    ``consumers``: consumer classes or names (default: every registered consumer).
    """

    def __init__(
        self,
        consumers: Iterable[type[EventConsumer] | str] | None = None,
        *,
        url: str | None = None,
        prefetch: int | None = None,
        stop: StopFlag | None = None,
        progress: Callable[[str], None] | None = None,
        log_every: int | None = None,
    ) -> None:
        classes: list[type[EventConsumer]] = []
        for item in registry.all() if consumers is None else consumers:
            cls = registry.get(item) if isinstance(item, str) else item
            cls.validate()
            if cls not in classes:
                classes.append(cls)
        if not classes:
            raise ConfigurationError(
                "no consumers to run: define EventConsumer subclasses in <app>/consumers.py"
            )
        names = [cls.name for cls in classes]
        if len(set(names)) != len(names):
            raise ConfigurationError(f"two consumers share a name: {names}")
        self.consumer_classes = classes
        self.consumers = {cls.name: cls() for cls in classes}
        self.url = str(url or app_settings.BROKER_URL)
        self.stop = stop or StopFlag()
        self.progress = progress
        self.log_every = max(1, int(log_every or app_settings.CONSUMER_LOG_EVERY))
        self.transport = open_transport(self.url, classes, prefetch=prefetch)
        self.scheduler = retry_scheduler(self.transport)
        self.processor = Processor(self.consumers, self.scheduler)
        self.ordered = OrderedRuntime(self.consumers.values(), self.transport)
        # An ordered consumer takes one message at a time: a failed handler is retried in
        # place, so no later event of its key may commit in the same batch before it.
        self._batch_sizes = {
            cls.name: cls.get_batch_size()
            if not cls.ordered and (self.transport.batches_by_default or cls.batch_size is not None)
            else 1
            for cls in classes
        }
        self.linger = max(0.0, float(app_settings.CONSUMER_BATCH_LINGER))
        self.stats = WorkerStats()
        self._relay: Any = None
        self._failures = 0
        self._last_activity = time.monotonic()
        self._max_messages: int | None = None
        self._recreated: dict[str, Any] = {}
        self.heartbeat = HeartbeatWriter(
            "consumer", self.consumers, topology={cls.name: topology_of(cls) for cls in classes}
        )

    # -- the loop --------------------------------------------------------------------------------
    def run(
        self, *, until_idle: float | None = None, max_messages: int | None = None
    ) -> WorkerStats:
        """Consume until the stop flag is set, ``until_idle`` seconds pass without a
        delivery, or ``max_messages`` deliveries were settled."""
        stats = self.stats = WorkerStats()
        self._max_messages = max_messages
        self._failures = 0
        self._last_activity = time.monotonic()
        try:
            while not self.stop.is_set():
                if max_messages is not None and stats.settled >= max_messages:
                    break
                if until_idle is not None and self._idle_for() >= until_idle:
                    break
                try:
                    self._step(until_idle)
                except self.transport.connection_errors as exc:
                    self._connection_lost(exc)
        finally:
            self.close()
        self._report(final=True)
        return stats

    def _idle_for(self) -> float:
        return time.monotonic() - self._last_activity

    def _step(self, until_idle: float | None) -> None:
        """Take one delivery (waiting at most a poll interval) and settle it."""
        self.ordered.tick()
        self.transport.connect()
        self.transport.check_topology()
        self._note_recreated()
        self.heartbeat.broker_state("")
        self.heartbeat.tick(self.stats)
        self._failures = 0
        self.stats.disconnected = False
        # memory:// relays its own retries when idle: look for due ones more often.
        timeout = POLL_SECONDS / 5 if self.transport.relays_itself else POLL_SECONDS
        if until_idle is not None:
            timeout = max(0.01, min(timeout, until_idle - self._idle_for()))
        delivery = self.transport.get(timeout)
        if delivery is None:
            self._idle()
            return
        limit = self._batch_sizes[delivery.consumer]
        if self._max_messages is not None:
            limit = max(1, min(limit, self._max_messages - self.stats.settled))
        more = (
            self.transport.take_more(delivery.consumer, limit - 1, linger=self.linger)
            if limit > 1
            else []
        )
        if more:
            self._settle_batch([delivery, *more])
        else:
            self._settle(delivery)
        self.transport.flush_acks()
        self._last_activity = time.monotonic()

    def _note_recreated(self) -> None:
        """Keep the queues the topology check had to declare again in the heartbeat
        (:mod:`reliable_events.queue_loss`): liveness shows what a deletion lost."""
        found = self.transport.recreated_queues()
        if found == self._recreated:
            return
        self._recreated = dict(found)
        self.heartbeat.note("recreated", queue_loss.lost_queues(found, self._recorded_queues))

    def _recorded_queues(self) -> set[str]:
        """The queues of this worker's consumers their last heartbeats recorded (before
        this process wrote its own): they existed."""
        found: set[str] = set()
        try:
            for name in self.consumers:
                found.update(
                    (left_behind(name, using=self.heartbeat.alias) or {}).get("queues", [])
                )
        except DatabaseError as exc:  # not known: no warning rather than a false one
            logger.debug("reliable_events: heartbeats not read: %s", type(exc).__name__)
        return found

    def _connection_lost(self, exc: BaseException) -> None:
        """Drop the connection and wait before the next attempt (exponential, jittered)."""
        self._failures += 1
        self.stats.reconnects += 1
        self.stats.disconnected = True
        self.transport.close()
        self.scheduler.close()
        ceiling = min(
            float(app_settings.CONSUMER_RECONNECT_MAX), 0.25 * 2 ** min(self._failures, 10)
        )
        pause = ceiling * (0.5 + random.random() / 2)
        error = describe_error(exc, self.url)
        logger.warning(
            "reliable_events: broker connection lost or refused (%s); reconnecting in %.1fs",
            error,
            pause,
        )
        # Alive, but consuming nothing: liveness says why instead of "not seen".
        self.heartbeat.broker_state(error)
        self.heartbeat.tick(self.stats)
        self.stop.wait(pause)

    def close(self) -> None:
        self.heartbeat.stop(self.stats)
        self.ordered.close()
        self.transport.close()
        self.scheduler.close()
        if self._relay is not None:
            self._relay.close()
            self._relay = None

    def _idle(self) -> None:
        close_stale_connections()
        if self.transport.relays_itself and self._relay_embedded():
            self._last_activity = time.monotonic()  # it just delivered something

    def _relay_embedded(self) -> bool:
        """Publish due outbox rows (retries) on ``memory://``; whether any went out."""
        try:
            if self._relay is None:
                self._relay = Relay()
            return bool(self._relay.run_batch().sent)
        except (DatabaseError, InterfaceError, ReliableEventsError):
            logger.warning("reliable_events: embedded relay failed", exc_info=True)
            return False

    def _settle_batch(self, deliveries: list[Delivery]) -> None:
        """Settle deliveries of one consumer in one transaction (``batch_size`` > 1).

        Poison and over-delivered messages are settled on their own first.  Each handler
        runs in its own savepoint (:meth:`EventConsumer.process_batch`): after the commit
        the applied messages are acked, and each failed one is retried or dead-lettered
        on its own, then acked.
        """
        self.stats.received += len(deliveries)
        for delivery in deliveries:
            log_redelivery(delivery)
        consumer = self.consumers[deliveries[0].consumer]
        batch: list[tuple[Delivery, Event]] = []
        for delivery in deliveries:
            event = self.processor.decode(delivery)
            if event is None:
                self._settle(delivery, counted=True)
            else:
                batch.append((delivery, event))
        while batch:
            done = self._commit_batch(consumer, batch)
            if done is None:
                return
            batch = batch[done:]
            # A batch commits every BATCH_MAX_SECONDS: beat between its parts, or slow
            # handlers would look like a dead process (100 events of 0.6 s each pass the
            # 60 s HEARTBEAT_TIMEOUT_SECONDS).
            self.heartbeat.tick(self.stats)
            if batch and self.stop.is_set():
                for delivery, _ in batch:  # not started: back to the queue
                    self.transport.requeue(delivery)
                self.stats.requeued += len(batch)
                return

    def _commit_batch(
        self, consumer: EventConsumer, batch: list[tuple[Delivery, Event]]
    ) -> int | None:
        """One transaction over (a prefix of) ``batch``; how many it settled, or ``None``
        when the rest must not be processed now (stopping, or handed back)."""
        outages = 0
        spans = tracing.handler_spans(consumer.name, batch)
        while True:
            try:
                results = consumer.process_batch(
                    [event for _, event in batch],
                    max_seconds=BATCH_MAX_SECONDS,
                    stop=self.stop.is_set,
                    spans=spans,
                )
            except DatabaseUnavailable as exc:
                outages += 1
                self.stats.database_outages += 1
                logger.warning("reliable_events: %s; waiting for the database", exc)
                if self.transport.abandon(batch[0][0]):
                    self.stats.requeued += len(batch)
                    self._wait_for_database()
                    return None
                if outages >= _MAX_OUTAGES_PER_DELIVERY:
                    for delivery, _ in batch:
                        self.transport.requeue(delivery)
                    self.stats.requeued += len(batch)
                    return None
                if not self._wait_for_database():
                    return None  # stopping: unacked, the broker delivers them again
                continue
            break
        if results is None:  # the commit was refused: nothing applied, one by one now
            for delivery, _ in batch:
                self._settle(delivery, counted=True)
            return len(batch)
        # The spans end before the acks: a process killed after its ack loses no span.
        kept = [i for i, result in enumerate(results) if result.outcome is not Outcome.FAILED]
        tracing.batch_processed([batch[i] for i in kept], [results[i] for i in kept])
        for (delivery, event), result in zip(batch, results, strict=False):
            if result.outcome is Outcome.FAILED:
                self._settle(
                    delivery,
                    counted=True,
                    work=tracing.traced_failure(
                        delivery,
                        partial(self.processor.fail, delivery, event, result),
                        result.span,
                    ),
                )
                continue
            if result.outcome is Outcome.DUPLICATE:
                log_duplicate(delivery.consumer, event.id)
            self.transport.ack(delivery)
            self._count(result.outcome, result)
            metrics.consumed(delivery.consumer, result.outcome, result)
        return len(results)

    def _count(self, outcome: Outcome, result: HandlerResult | None) -> None:
        if result is not None:
            self.stats.handler_seconds += result.seconds
            self.stats.slowest_seconds = max(self.stats.slowest_seconds, result.seconds)
        self.stats.count(outcome)
        if self.stats.settled % self.log_every == 0:
            self._report()

    def _settle(
        self,
        delivery: Delivery,
        *,
        counted: bool = False,
        work: Callable[[], tuple[Outcome, HandlerResult | None]] | None = None,
    ) -> None:
        """Process ``delivery`` and ack it, or leave it for the broker to deliver again.

        ``work``: what settles it instead of :meth:`Processor.process` (a handler that
        failed in a batch: its retry or dead letter).
        """
        if not counted:
            self.stats.received += 1
            log_redelivery(delivery)
        outages = 0
        while True:
            try:
                outcome, result = work() if work is not None else self.processor.process(delivery)
            except DatabaseUnavailable as exc:
                outages += 1
                self.stats.database_outages += 1
                logger.warning("reliable_events: %s; waiting for the database", exc)
                if self.transport.abandon(delivery):
                    self.stats.requeued += 1
                    self._wait_for_database()
                    return
                if outages >= _MAX_OUTAGES_PER_DELIVERY:
                    self.transport.requeue(delivery)
                    self.stats.requeued += 1
                    return
                if not self._wait_for_database():
                    return  # stopping: unacked, the broker delivers it again
                continue
            except RetryInPlace as retry:  # an ordered consumer: keep it, wait, again
                retrying = self.processor.in_place.current(delivery)
                if self.transport.retry_later(delivery, retry.delay, retrying.headers):
                    self.processor.in_place.settled(delivery)  # its headers are in the row
                    self._count(Outcome.RETRIED, None)
                    metrics.consumed(delivery.consumer, Outcome.RETRIED, None)
                    return
                self.transport.pump(retry.delay, self.stop)
                if self.stop.is_set():
                    return  # unacked: the broker delivers it again
                continue
            except RetryPublishFailed as exc:
                logger.warning("reliable_events: %s; the message goes back to its queue", exc)
                self.transport.requeue(delivery)
                self.stats.requeued += 1
                self.transport.pump(1.0, self.stop)
                return
            break
        self.transport.ack(delivery)
        self._count(outcome, result)
        metrics.consumed(delivery.consumer, outcome, result)

    def _wait_for_database(self) -> bool:
        """Wait (keeping the broker connection alive) until every consumer's database
        answers; ``False`` if the worker was stopped first."""
        aliases = sorted({cls.get_database() for cls in self.consumer_classes})
        failures = 0
        while not self.stop.is_set():
            close_all_connections(aliases)
            if all(database_answers(alias) for alias in aliases):
                return True
            failures += 1
            pause = min(30.0, 0.25 * 2 ** min(failures, 8))
            logger.warning("reliable_events: database unavailable; retrying in %.1fs", pause)
            self.transport.pump(pause, self.stop)
        return False

    def _report(self, *, final: bool = False) -> None:
        text = f"{'stopped' if final else 'progress'}: {self.stats}"
        logger.info("reliable_events: consumers %s", text)
        if self.progress is not None:
            self.progress(text)
