"""The topology as a whole: declare it (events exchange and every registered consumer),
and send again what it kept as unrouted once the consumers are bound."""

from __future__ import annotations

from collections.abc import Callable

from reliable_events.broker import open_publisher
from reliable_events.broker.database import republish_unrouted_rows
from reliable_events.broker_url import is_database_url
from reliable_events.conf import app_settings
from reliable_events.consumer import registry
from reliable_events.topology import Topology, full_topology
from reliable_events.unrouted import RepublishReport, republish_unrouted


def has_topology(url: str | None = None) -> bool:
    """Whether the broker at ``url`` (default ``BROKER_URL``) has a topology to declare:
    not ``db://``, whose queues are rows routed by the registered consumers."""
    return not is_database_url(str(url or app_settings.BROKER_URL))


def declare_all(*, url: str | None = None) -> Topology:
    """Declare the exchange, unrouted queue and all consumer queues; return what was declared."""
    topology = full_topology(registry.queue_specs(), registry.exchange_specs())
    publisher = open_publisher(url)
    try:
        publisher.declare(topology)
    finally:
        publisher.close()
    return topology


def republish(
    url: str | None = None,
    *,
    dry_run: bool = False,
    limit: int | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> RepublishReport:
    """Send the events kept in ``<EXCHANGE>.unrouted`` to the queues bound for them now:
    through the exchange again on RabbitMQ (:func:`~reliable_events.unrouted.
    republish_unrouted`), moved to the bound queues' rows on ``db://``
    (:func:`~reliable_events.broker.database.republish_unrouted_rows`)."""
    url = str(url or app_settings.BROKER_URL)
    if not has_topology(url):
        return republish_unrouted_rows(url, dry_run=dry_run, limit=limit, progress=progress)
    return republish_unrouted(url, dry_run=dry_run, limit=limit, progress=progress)
