"""Declare the whole topology (events exchange and every registered consumer)."""

from __future__ import annotations

from reliable_events.broker import open_publisher
from reliable_events.consumer import registry
from reliable_events.topology import Topology, full_topology


def declare_all(*, url: str | None = None) -> Topology:
    """Declare the exchange, unrouted queue and all consumer queues; return what was declared."""
    topology = full_topology(registry.queue_specs(), registry.exchange_specs())
    publisher = open_publisher(url)
    try:
        publisher.declare(topology)
    finally:
        publisher.close()
    return topology
