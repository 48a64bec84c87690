"""Which publisher or consuming transport serves a broker URL?"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from django.utils.module_loading import import_string

from reliable_events import cloudevents
from reliable_events.broker.amqp import AmqpPublisher, AmqpTransport
from reliable_events.broker.base import (
    Publisher,
    Transport,
)
from reliable_events.broker.kombu import KombuPublisher, KombuTransport
from reliable_events.broker_url import (
    is_amqp_url,
    own_transport,
)
from reliable_events.conf import app_settings
from reliable_events.consumer import EventConsumer

logger = logging.getLogger(__name__)


def open_publisher(
    url: str | None = None,
    *,
    connect_timeout: float | None = None,
    window: int | None = None,
) -> Publisher:
    """A publisher for ``url`` (default: the configured ``BROKER_URL``); not yet connected.

    With ``CLOUDEVENTS`` on, it publishes CloudEvents (:mod:`reliable_events.cloudevents`).
    """
    return cloudevents.wrap(_publisher(url, connect_timeout=connect_timeout, window=window))


def _publisher(url: str | None, *, connect_timeout: float | None, window: int | None) -> Publisher:
    url = str(url or app_settings.BROKER_URL)
    if is_amqp_url(url):
        return AmqpPublisher(url, connect_timeout=connect_timeout, window=window)
    own = own_transport(url)
    if own is not None:
        publisher: Publisher = import_string(own[0])(
            url, connect_timeout=connect_timeout, window=window
        )
        return publisher
    return KombuPublisher(url)


def open_transport(
    url: str, consumers: Sequence[type[EventConsumer]], *, prefetch: int | None = None
) -> Transport:
    count = max(1, int(prefetch_count(consumers) if prefetch is None else prefetch))
    largest = max((cls.get_batch_size() for cls in consumers), default=1)
    if count < largest:
        logger.warning(
            "reliable_events: prefetch %d is below the batch size %d: batches hold at most "
            "%d messages and wait for the broker between them; raise PREFETCH_COUNT (or "
            "leave it unset: twice the batch size)",
            count,
            largest,
            count,
        )
    own = own_transport(url)
    if own is not None:
        transport: Transport = import_string(own[1])(url, consumers, prefetch=count)
        return transport
    if is_amqp_url(url):
        return AmqpTransport(
            url,
            consumers,
            prefetch=count,
            heartbeat=float(app_settings.CONSUMER_HEARTBEAT),
            connect_timeout=float(app_settings.CONNECT_TIMEOUT),
        )
    return KombuTransport(url, consumers, prefetch=count)


#: Smallest default prefetch (``PREFETCH_COUNT`` ``None``).
MIN_PREFETCH = 20


def prefetch_count(consumers: Sequence[type[EventConsumer]]) -> int:
    """``PREFETCH_COUNT``, or when it is ``None`` twice the largest batch size of
    ``consumers`` (at least :data:`MIN_PREFETCH`): while one batch is processed the
    broker already sends the next."""
    configured = app_settings.PREFETCH_COUNT
    if configured is not None:
        return int(configured)
    largest = max((cls.get_batch_size() for cls in consumers), default=1)
    return max(MIN_PREFETCH, 2 * largest)
