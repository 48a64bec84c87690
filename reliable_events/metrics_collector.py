"""What does a scrape show?  The database and broker figures (gauges computed at scrape
time), the exposition for the web process (:func:`metrics_view`) and the opt-in port of
the long-running commands (:func:`serve_metrics`).

The gauges come from a handful of bounded queries (status counts, two ``GROUP BY
topic`` capped at ``METRICS_MAX_TOPICS`` rows with the rest summed as ``"other"``, the
open dead letters by consumer, the heartbeats) and a passive declare per consumer queue;
a scrape within ``METRICS_CACHE_SECONDS`` of the previous one reuses them.  A database
that does not answer gives ``reliable_events_database_up 0``, never an error page.

With ``PROMETHEUS_MULTIPROC_DIR`` set (gunicorn, Celery prefork) the exposition merges
every process's files (``prometheus_client.multiprocess``); otherwise it shows this
process's registry.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from django.db import DatabaseError, connections
from django.db.models import Count
from django.http import HttpRequest, HttpResponse
from django.views.decorators.http import require_safe

from reliable_events import metrics
from reliable_events.conf import app_settings
from reliable_events.db import read_alias
from reliable_events.exceptions import ConfigurationError
from reliable_events.liveness import Liveness, liveness
from reliable_events.models import OutboxMessage
from reliable_events.sanitize import describe_error
from reliable_events.status import OutboxStatus, outbox_status
from reliable_events.unrouted import UnroutedCount, cached_unrouted_count

try:  # the optional extra; only used once ``metrics.enabled()`` said it is there
    import prometheus_client
    import prometheus_client.core
    import prometheus_client.multiprocess
except ImportError:  # pragma: no cover - exercised by the packaging test's bare venv
    prometheus_client = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)


def capped(counts: list[tuple[str, int]], total: int, limit: int) -> dict[str, int]:
    """The ``limit`` largest ``(label, count)`` pairs, and ``"other"`` for the rest of
    ``total`` (so that the labels stay bounded whatever the data)."""
    top = sorted(counts, key=lambda item: (-item[1], item[0]))[: max(0, limit)]
    result = dict(top)
    rest = total - sum(result.values())
    if rest > 0 or len(counts) > len(top):
        result[metrics.OTHER] = result.get(metrics.OTHER, 0) + max(rest, 0)
    return result


def _by_topic(query: Any, limit: int) -> dict[str, int]:
    rows = list(
        query.order_by()
        .values_list("topic")
        .annotate(n=Count("id"))
        .order_by("-n", "topic")[: limit + 1]
    )
    total = query.count() if len(rows) > limit else sum(n for _, n in rows)
    return capped([(str(topic), int(n)) for topic, n in rows], total, limit)


@dataclass
class Snapshot:
    """The figures of one scrape."""

    database_up: bool = True
    error: str = ""
    status: OutboxStatus | None = None
    pending_by_topic: dict[str, int] = field(default_factory=dict)
    dead_by_topic: dict[str, int] = field(default_factory=dict)
    liveness: Liveness | None = None
    unrouted: UnroutedCount | None = None


def take_snapshot(*, using: str | None = None) -> Snapshot:
    alias = read_alias(OutboxMessage, using)
    limit = max(1, int(app_settings.METRICS_MAX_TOPICS))
    try:
        outbox = OutboxMessage.objects.using(alias)
        return Snapshot(
            status=outbox_status(using=alias),
            pending_by_topic=_by_topic(outbox.pending(), limit),
            dead_by_topic=_by_topic(outbox.dead(), limit),
            liveness=liveness(using=using),
            unrouted=cached_unrouted_count(),
        )
    except DatabaseError as exc:
        # This thread's connection may be broken: the next scrape opens a new one.
        connections[alias].close()
        return Snapshot(database_up=False, error=describe_error(exc)[:300])


class DatabaseCollector:
    """The scrape-time gauges (see the module doc); cached ``METRICS_CACHE_SECONDS``."""

    def __init__(self, using: str | None = None) -> None:
        self.using = using
        self._lock = threading.Lock()
        self._cached: tuple[float, Snapshot] | None = None

    def snapshot(self) -> Snapshot:
        ttl = float(app_settings.METRICS_CACHE_SECONDS)
        with self._lock:
            if self._cached is None or time.monotonic() - self._cached[0] >= ttl:
                self._cached = (time.monotonic(), take_snapshot(using=self.using))
            return self._cached[1]

    def describe(self) -> list[Any]:
        return []  # computed at scrape time: no names to check at registration

    def collect(self) -> Iterator[Any]:
        assert prometheus_client is not None
        gauge = prometheus_client.core.GaugeMetricFamily
        snap = self.snapshot()
        yield gauge(
            "reliable_events_database_up",
            "1 when the last scrape could read the database.",
            value=1 if snap.database_up else 0,
        )
        if snap.status is None:
            return
        status = snap.status
        for name, doc, values in (
            (
                "reliable_events_outbox_pending",
                "Pending outbox rows by topic.",
                snap.pending_by_topic,
            ),
            ("reliable_events_outbox_dead", "Dead outbox rows by topic.", snap.dead_by_topic),
        ):
            family = gauge(name, doc, labels=["topic"])
            for topic, count in values.items():
                family.add_metric([topic], count)
            yield family
        age = status.oldest_pending_age_seconds
        yield gauge(
            "reliable_events_outbox_oldest_pending_age_seconds",
            "Seconds the oldest due pending outbox row has waited (0 when none).",
            value=age or 0.0,
        )
        yield gauge(
            "reliable_events_outbox_scheduled",
            "Pending rows published with delay= that are not due yet.",
            value=status.scheduled,
        )
        yield gauge(
            "reliable_events_held_keys",
            "Keys an ordered consumer holds behind a dead letter.",
            value=status.held_keys,
        )
        yield gauge(
            "reliable_events_parked_events",
            "Events parked behind a held key (ordered consumers).",
            value=status.parked_events,
        )
        if snap.unrouted is not None:
            yield gauge(
                "reliable_events_broker_up",
                "1 when the last scrape could ask the broker (the unrouted queue's depth).",
                value=1 if snap.unrouted.count is not None else 0,
            )
        if snap.unrouted is not None and snap.unrouted.count is not None:
            yield gauge(
                "reliable_events_unrouted_messages",
                "Events the broker confirmed but routed to no queue: they wait in "
                "<EXCHANGE>.unrouted for republish_unrouted.",
                value=snap.unrouted.count,
            )
        letters = gauge(
            "reliable_events_dead_letters_open",
            "Open dead letters by consumer.",
            labels=["consumer"],
        )
        # Every known consumer has a series (0 when none), so that growth shows as a delta.
        known = [c.name for c in snap.liveness.consumers] if snap.liveness else []
        open_letters = {**dict.fromkeys(known, 0), **status.open_dead_letters_by_consumer}
        for consumer, count in metrics_labels(open_letters).items():
            letters.add_metric([consumer], count)
        yield letters
        if snap.liveness is not None:
            yield from _liveness_families(snap.liveness, gauge)


def metrics_labels(counts: dict[str, int]) -> dict[str, int]:
    """Per-consumer counts with at most ``MAX_CONSUMER_LABELS`` labels."""
    return capped(list(counts.items()), sum(counts.values()), metrics.MAX_CONSUMER_LABELS)


def _liveness_families(state: Liveness, gauge: Any) -> Iterator[Any]:
    yield gauge(
        "reliable_events_relays_alive",
        "Relay daemons whose heartbeat is fresh.",
        value=state.relays_alive,
    )
    yield gauge(
        "reliable_events_relays_failing",
        "Relay daemons alive but unable to reach the broker (publishing nothing).",
        value=state.relays_failing,
    )
    alive = gauge(
        "reliable_events_consumer_alive",
        "1 when a live process runs the consumer and its queue is consumed, else 0.",
        labels=["consumer"],
    )
    processes = gauge(
        "reliable_events_consumer_processes",
        "Live processes running the consumer.",
        labels=["consumer"],
    )
    seen = gauge(
        "reliable_events_consumer_last_seen_age_seconds",
        "Seconds since a process running the consumer last beat.",
        labels=["consumer"],
    )
    depth = gauge(
        "reliable_events_queue_messages",
        "Messages ready in the consumer's queue (broker or db:// table).",
        labels=["consumer"],
    )
    unacked = gauge(
        "reliable_events_queue_messages_unacked",
        "Messages of the consumer's queue delivered to a process and not yet acked "
        "(RabbitMQ's management API: only with BROKER_MANAGEMENT_URL).",
        labels=["consumer"],
    )
    retrying = gauge(
        "reliable_events_consumer_retrying",
        "Messages of the consumer waiting for a later attempt (its delay queues, or due "
        "later in its db:// queue).",
        labels=["consumer"],
    )
    silent = gauge(
        "reliable_events_consumer_processes_silent",
        "Processes that ran the consumer and stopped beating without a clean stop "
        "lately: killed, frozen (still holding their unacked messages), or cut off from "
        "the database.",
        labels=["consumer"],
    )
    recreated = gauge(
        "reliable_events_consumer_queues_recreated",
        "Queues of the consumer deleted and declared again by the topology check in the "
        "last hour: what they held is lost (replay_events re-delivers it).",
        labels=["consumer"],
    )
    for consumer in state.consumers[: metrics.MAX_CONSUMER_LABELS]:
        silent.add_metric([consumer.name], consumer.silent)
        recreated.add_metric([consumer.name], len(consumer.recreated))
        alive.add_metric([consumer.name], 0 if consumer.problem else 1)
        processes.add_metric([consumer.name], consumer.processes)
        if consumer.age_seconds is not None:
            seen.add_metric([consumer.name], consumer.age_seconds)
        if consumer.messages is not None:
            depth.add_metric([consumer.name], consumer.messages)
        if consumer.unacked is not None:
            unacked.add_metric([consumer.name], consumer.unacked)
        if consumer.retrying is not None:
            retrying.add_metric([consumer.name], consumer.retrying)
    yield from (alive, processes, seen, depth, unacked, retrying, silent, recreated)


# -- exposition ----------------------------------------------------------------------------
class _ProcessRegistry:
    """This process's default registry, as one collector of another registry."""

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        assert prometheus_client is not None
        yield from prometheus_client.REGISTRY.collect()


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR")


def build_registry(*, database: bool) -> Any:
    """A registry of this process's (or, multiprocess, every process's) instruments,
    with the database gauges when ``database``."""
    client = prometheus_client
    assert client is not None
    registry = client.CollectorRegistry(auto_describe=False)
    if multiprocess_dir():
        client.multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry.register(_ProcessRegistry())
    if database:
        registry.register(DatabaseCollector())
    return registry


_registry_lock = threading.Lock()
_registries: dict[bool, Any] = {}


def shared_registry(*, database: bool) -> Any:
    with _registry_lock:
        if database not in _registries:
            _registries[database] = build_registry(database=database)
        return _registries[database]


def clear_cache() -> None:
    """Forget the registries and their cached figures (tests)."""
    with _registry_lock:
        _registries.clear()


class _Restricted:
    """The families of ``registry`` asked for by ``name[]`` (a family or sample name)."""

    def __init__(self, registry: Any, names: set[str]) -> None:
        self.registry = registry
        self.names = names

    def collect(self) -> Iterator[Any]:
        for family in self.registry.collect():
            if family.name in self.names or any(s.name in self.names for s in family.samples):
                yield family


@require_safe
def metrics_view(request: HttpRequest) -> HttpResponse:
    """``GET``: the Prometheus exposition (text, or OpenMetrics when asked), with the
    database gauges; 404 when metrics are off."""
    if not metrics.enabled():
        return HttpResponse(
            "metrics are off (prometheus_client missing or METRICS = False)\n",
            status=404,
            content_type="text/plain",
        )
    client = prometheus_client
    assert client is not None
    registry = shared_registry(database=True)
    names = [name[:200] for name in request.GET.getlist("name[]")[:50]]
    if names:
        registry = _Restricted(registry, set(names))
    encoder, content_type = client.exposition.choose_encoder(
        request.headers.get("Accept", "")[:1000]
    )
    return HttpResponse(encoder(registry), content_type=content_type)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("reliable_events: metrics %s", format % args)


def serve_metrics(port: int | None, *, address: str = "") -> WSGIServer | None:
    """Serve this process's metrics on ``port`` (``None``: ``METRICS_PORT``; unset:
    nothing) from a daemon thread; the server, or ``None`` when not serving.  Only
    this process's instruments: the database gauges are the web endpoint's."""
    port = port if port is not None else app_settings.METRICS_PORT
    if port is None or not metrics.enabled():
        return None
    client = prometheus_client
    assert client is not None
    app = client.make_wsgi_app(shared_registry(database=False))
    try:
        server = make_server(address, int(port), app, handler_class=_QuietHandler)
    except (OSError, OverflowError) as exc:  # in use, not allowed, out of range
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigurationError(f"cannot serve metrics on port {port}: {reason}") from exc
    thread = threading.Thread(
        target=server.serve_forever, name="reliable-events-metrics", daemon=True
    )
    thread.start()
    logger.info("reliable_events: metrics on port %d", server.server_port)
    return server
