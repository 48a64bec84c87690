"""What do the relay and the consumers count?  Prometheus instruments, when enabled.

Optional: with ``prometheus_client`` not installed, or ``METRICS = False``, every
function here returns at once and :func:`metered` returns the publisher unchanged.
The decision is taken once per process, at the first call (:func:`reset` re-takes it,
for tests).  The instruments live in ``prometheus_client``'s default registry, so
``PROMETHEUS_MULTIPROC_DIR`` (gunicorn, Celery prefork) works as documented by
``prometheus_client``; the figures read from the database at scrape time are in
:mod:`reliable_events.metrics_collector`.

Labels are bounded: a consumer name (from code; at most ``MAX_CONSUMER_LABELS``, the
rest as ``"other"``) and an outcome; never an id, a key or a topic of a message.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any

from reliable_events.broker.base import UNROUTABLE_QUEUE, OutgoingMessage, Publisher, PublishResult
from reliable_events.conf import app_settings
from reliable_events.consumer.base import HandlerResult, Outcome
from reliable_events.topology import Topology

if TYPE_CHECKING:
    from reliable_events.relay.claims import RelayReport

try:  # the optional extra ``reliable-events[prometheus]``
    import prometheus_client
    import prometheus_client.core
    import prometheus_client.multiprocess
except ImportError:  # pragma: no cover - exercised by the packaging test's bare venv
    prometheus_client = None  # type: ignore[assignment]

#: Most distinct consumer labels; later names are counted as ``"other"``.
MAX_CONSUMER_LABELS = 100
OTHER = "other"

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def available() -> bool:
    """Whether ``prometheus_client`` is installed."""
    return prometheus_client is not None


class Instruments:
    """The counters and histograms of this process (created once, on first use)."""

    def __init__(self) -> None:
        assert prometheus_client is not None
        counter, histogram = prometheus_client.Counter, prometheus_client.Histogram
        self.publish_attempts = counter(
            "reliable_events_publish_attempts", "Outbox messages handed to the broker."
        )
        self.publish_confirms = counter(
            "reliable_events_publish_confirms", "Outbox messages the broker confirmed."
        )
        self.publish_nacks = counter(
            "reliable_events_publish_nacks", "Outbox messages the broker refused (basic.nack)."
        )
        self.publish_returns = counter(
            "reliable_events_publish_returns",
            "Outbox messages the broker returned: no such queue (basic.return).",
        )
        self.publish_errors = counter(
            "reliable_events_publish_errors",
            "Outbox messages that failed otherwise, or were interrupted by a broker failure.",
        )
        self.publish_duplicates = counter(
            "reliable_events_publish_duplicates",
            "Outbox messages confirmed after another publisher had marked them sent: they "
            "went out twice (a relay's lane lease expired while it waited for the broker).",
        )
        self.handed_over = counter(
            "reliable_events_on_commit_handed_over",
            "Outbox rows the on-commit hook left to the relay, by reason (HANDOVER_REASONS).",
            ["reason"],
        )
        self.confirm_latency = histogram(
            "reliable_events_confirm_latency_seconds",
            "Seconds from publishing to the broker's confirm (the oldest message of each "
            "confirmed group).",
            buckets=LATENCY_BUCKETS,
        )
        self.relay_batch = histogram(
            "reliable_events_relay_batch_seconds",
            "Seconds one relay run (claim, publish, mark) took, runs that claimed rows.",
            buckets=LATENCY_BUCKETS,
        )
        self.consumed = counter(
            "reliable_events_consumer_messages",
            "Deliveries settled by a consumer, by outcome (processed, duplicate, retried, "
            "dead-lettered, poison).",
            ["consumer", "outcome"],
        )
        self.handler = histogram(
            "reliable_events_handler_seconds",
            "Seconds a consumer's transaction (idempotency record + handle) took.",
            ["consumer"],
            buckets=LATENCY_BUCKETS,
        )
        self._children: dict[tuple[str, Outcome], Any] = {}
        self._handlers: dict[str, Any] = {}
        self._labels: set[str] = set()

    def consumer_label(self, name: str) -> str:
        if name in self._labels:
            return name
        if len(self._labels) >= MAX_CONSUMER_LABELS:
            return OTHER
        self._labels.add(name)
        return name

    def consumed_child(self, consumer: str, outcome: Outcome) -> Any:
        child = self._children.get((consumer, outcome))
        if child is None:
            child = self.consumed.labels(self.consumer_label(consumer), outcome.value)
            self._children[(consumer, outcome)] = child
        return child

    def handler_child(self, consumer: str) -> Any:
        child = self._handlers.get(consumer)
        if child is None:
            child = self.handler.labels(self.consumer_label(consumer))
            self._handlers[consumer] = child
        return child


_lock = threading.Lock()
_resolved = False
_active: Instruments | None = None
_created: Instruments | None = None


def instruments() -> Instruments | None:
    """This process's instruments, or ``None`` when metrics are off."""
    global _resolved, _active, _created
    if _resolved:
        return _active
    with _lock:
        if not _resolved:
            wanted = app_settings.METRICS
            on = available() if wanted is None else bool(wanted) and available()
            if on and _created is None:
                _created = Instruments()
            _active = _created if on else None
            _resolved = True
    return _active


def enabled() -> bool:
    return instruments() is not None


def reset() -> None:
    """Decide again from the settings at the next call (tests)."""
    global _resolved
    with _lock:
        _resolved = False


# -- consumers -----------------------------------------------------------------------------
def consumed(consumer: str, outcome: Outcome, result: HandlerResult | None) -> None:
    """One delivery settled by ``consumer`` (after its ack)."""
    found = _active if _resolved else instruments()
    if found is None:
        return
    # the handler's time first: a scrape that sees the delivery counted sees its time too
    if result is not None and result.seconds > 0:
        found.handler_child(consumer).observe(result.seconds)
    found.consumed_child(consumer, outcome).inc()


# -- the relay -----------------------------------------------------------------------------
def relay_run(report: RelayReport) -> None:
    """One relay run ended."""
    found = _active if _resolved else instruments()
    if found is not None and report.claimed:
        found.relay_batch.observe(report.seconds)


#: Why the on-commit hook left rows to the relay (``reliable_events_on_commit_handed_over``):
#: its breaker was open (the broker failed moments ago); another thread of the process was
#: publishing; a lane stayed locked (``HOOK_LANE_WAIT``); the claim left them (a relay kept
#: their lane past ``HOOK_LEASE_WAIT``, an earlier row of their key was not due, or another
#: publisher took them first); a broker failure interrupted their publish.
HANDOVER_REASONS = ("breaker_open", "publisher_busy", "lane_busy", "not_claimed", "broker_failure")


def handed_over(reason: str, count: int) -> None:
    """``count`` rows the on-commit hook left to the relay (one of :data:`HANDOVER_REASONS`)."""
    found = _active if _resolved else instruments()
    if found is not None and count > 0:
        found.handed_over.labels(reason).inc(count)


def sent_twice(count: int) -> None:
    """``count`` confirmed rows had been marked sent by another publisher already."""
    found = _active if _resolved else instruments()
    if found is not None:
        found.publish_duplicates.inc(count)


def metered(publisher: Publisher) -> Publisher:
    """``publisher``, counting what it publishes when metrics are on."""
    found = instruments()
    if found is None or isinstance(publisher, MeteredPublisher):
        return publisher
    return MeteredPublisher(publisher, found)


class MeteredPublisher(Publisher):
    """A publisher that counts attempts and outcomes and times the confirms."""

    def __init__(self, inner: Publisher, found: Instruments) -> None:
        self.inner = inner
        self.instruments = found
        self._sent_at: dict[Hashable, float] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @property
    def url(self) -> str:  # type: ignore[override]
        return self.inner.url

    def connect(self) -> None:
        self.inner.connect()

    @property
    def connected(self) -> bool:
        return self.inner.connected

    def declare(self, topology: Topology) -> None:
        self.inner.declare(topology)

    def close(self) -> None:
        self.inner.close()
        self._sent_at.clear()

    def publish(
        self, messages: Sequence[OutgoingMessage], *, timeout: float, wait: bool = True
    ) -> PublishResult:
        if messages:
            self._sent_at.update(dict.fromkeys([m.ref for m in messages], time.monotonic()))
            self.instruments.publish_attempts.inc(len(messages))
        return self._count(self.inner.publish(messages, timeout=timeout, wait=wait))

    def flush(self, *, timeout: float) -> PublishResult:
        return self._count(self.inner.flush(timeout=timeout))

    def _count(self, result: PublishResult) -> PublishResult:
        found, sent_at = self.instruments, self._sent_at
        now = time.monotonic()
        if result.confirmed:
            found.publish_confirms.inc(len(result.confirmed))
            oldest = min([sent_at.pop(ref, now) for ref in result.confirmed])
            found.confirm_latency.observe(now - oldest)
        if result.failed:
            nacks = returns = 0
            for ref, reason in result.failed.items():
                sent_at.pop(ref, None)
                if reason == UNROUTABLE_QUEUE:
                    returns += 1
                elif "basic.nack" in reason:
                    nacks += 1
            found.publish_nacks.inc(nacks)
            found.publish_returns.inc(returns)
            found.publish_errors.inc(len(result.failed) - nacks - returns)
        if result.interrupted:
            for ref in result.interrupted:
                sent_at.pop(ref, None)
            found.publish_errors.inc(len(result.interrupted))
        return result
