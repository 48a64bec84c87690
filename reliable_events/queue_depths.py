"""How deep is each consumer queue?  Ready messages (and those due later on ``db://``)
and the consumers the broker counts, from a passive declare per queue on AMQP or one
``GROUP BY`` over the queue table on ``db://``; on AMQP with ``BROKER_MANAGEMENT_URL``
also the messages delivered and not yet acked (RabbitMQ's management API); cached
``METRICS_CACHE_SECONDS``.  Liveness, its metrics and the retired consumers' clean-up
read them here."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

import amqp
from django.db import DatabaseError

from reliable_events.broker import management, queue_rows
from reliable_events.broker_url import is_amqp_url
from reliable_events.conf import app_settings
from reliable_events.db import queue_alias
from reliable_events.exceptions import ConfigurationError
from reliable_events.sanitize import describe_error
from reliable_events.unrouted import broker_channel


@dataclass(frozen=True)
class QueueDepth:
    """A consumer queue's ready messages and the consumers the broker counts on it
    (``None``: not known on this transport, or the broker did not answer)."""

    messages: int | None = None
    consumers: int | None = None
    error: str = ""
    #: ``db://``: rows due later (retries waiting for their delay).
    delayed: int | None = None
    #: The broker answered that the queue does not exist (404).
    missing: bool = False
    #: AMQP with ``BROKER_MANAGEMENT_URL``: delivered to a consumer, not yet acked
    #: (``None``: not known; :attr:`unacked_error` says why when the API was asked).
    unacked: int | None = None
    unacked_error: str = ""


_depth_lock = threading.Lock()
_depth_cache: dict[tuple[str, tuple[str, ...]], tuple[float, dict[str, QueueDepth]]] = {}


def queue_depths(queues: list[str], *, url: str | None = None) -> dict[str, QueueDepth]:
    """Depth of each queue, from the broker (AMQP) or the queue table (``db://``);
    cached ``METRICS_CACHE_SECONDS``.  Never raises."""
    url = str(url or app_settings.BROKER_URL)
    key = (url, tuple(queues))
    ttl = float(app_settings.METRICS_CACHE_SECONDS)
    with _depth_lock:
        hit = _depth_cache.get(key)
    if hit is not None and time.monotonic() - hit[0] < ttl:
        return hit[1]
    if is_amqp_url(url):
        depths = _amqp_depths(url, queues)
        if app_settings.BROKER_MANAGEMENT_URL:
            depths = _with_unacked(depths, url, str(app_settings.BROKER_MANAGEMENT_URL))
    elif urlsplit(url).scheme.lower() == "db":
        depths = _table_depths(url, queues)
    else:
        depths = {queue: QueueDepth() for queue in queues}
    with _depth_lock:
        _depth_cache[key] = (time.monotonic(), depths)
    return depths


def clear_cache() -> None:
    with _depth_lock:
        _depth_cache.clear()


def _amqp_depths(url: str, queues: list[str]) -> dict[str, QueueDepth]:
    timeout = min(2.0, float(app_settings.CONNECT_TIMEOUT))
    depths: dict[str, QueueDepth] = {}
    try:
        with broker_channel(url, timeout) as channel:
            for queue in queues:
                if channel.is_closing or not channel.is_open:
                    channel = channel.connection.channel()  # a 404 closed the last one
                try:
                    ok = channel.queue_declare(queue, passive=True)
                except Exception as exc:
                    depths[queue] = QueueDepth(
                        error=describe_error(exc, url)[:200],
                        missing=isinstance(exc, amqp.exceptions.NotFound),
                    )
                    continue
                depths[queue] = QueueDepth(int(ok.message_count), int(ok.consumer_count))
    except Exception as exc:
        error = describe_error(exc, url)[:200]
        return {queue: depths.get(queue, QueueDepth(error=error)) for queue in queues}
    return depths


def _with_unacked(depths: dict[str, QueueDepth], url: str, api: str) -> dict[str, QueueDepth]:
    """``depths`` with the unacked messages the management API counts."""
    timeout = min(2.0, float(app_settings.CONNECT_TIMEOUT))
    stats = management.queue_stats(api, management.vhost_of(url), list(depths), timeout=timeout)
    return {
        queue: replace(depth, unacked=stats[queue].unacked, unacked_error=stats[queue].error)
        for queue, depth in depths.items()
    }


def _table_depths(url: str, queues: list[str]) -> dict[str, QueueDepth]:
    alias = queue_alias(url)
    try:
        counts = queue_rows.depths(alias, queue_rows.dialect_for(alias), queues)
    except (DatabaseError, ConfigurationError) as exc:
        return {queue: QueueDepth(error=describe_error(exc)[:200]) for queue in queues}
    depths = {}
    for queue in queues:
        ready, later = counts.get(queue, (0, 0))
        depths[queue] = QueueDepth(messages=ready, delayed=later)
    return depths


def gone(depths: list[QueueDepth]) -> bool:
    """Whether a retired consumer left nothing behind: its queue deleted (RabbitMQ), or
    no row in it (``db://``)."""
    return all(
        depth.missing or (depth.messages == 0 and depth.delayed == 0 and not depth.error)
        for depth in depths
    )
