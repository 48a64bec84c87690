"""Consumers: the :class:`EventConsumer` base class, its registry and the consume loop.

``from reliable_events.consumer import EventConsumer`` is the public entry point; the
package's modules each answer one question:

- :mod:`~reliable_events.consumer.base`: what is a consumer? ``Event``, ``EventConsumer``,
  the registry and each consumer's queues.
- :mod:`~reliable_events.consumer.idempotency`: has this consumer applied this message?
- :mod:`~reliable_events.consumer.savepoints`: how does each handler of a batch get its
  own savepoint, cheaply?
- :mod:`~reliable_events.consumer.db`: is the database there?
- :mod:`~reliable_events.consumer.wire`: what arrived? Headers, poison reasons, decoding.
- :mod:`~reliable_events.consumer.failures`: what does a failed attempt record?
- :mod:`~reliable_events.consumer.retries`: how does a failed message come back later?
- :mod:`~reliable_events.consumer.processor`: what happens to one delivery?
- :mod:`~reliable_events.consumer.worker`: how does the consume loop run?

Only the names of the former ``reliable_events/consumer.py`` module are re-exported here
(importing the package does not load the broker or the worker).  Deliveries come from
the consuming transports in :mod:`reliable_events.broker`; untrusted text is cleaned by
:mod:`reliable_events.sanitize`.
"""

from __future__ import annotations

from reliable_events.consumer.base import (
    QUORUM_DELIVERY_LIMIT,
    ConsumerRegistry,
    Event,
    EventConsumer,
    HandlerResult,
    Outcome,
    registry,
)
from reliable_events.consumer.db import database_lost, raw_connection
from reliable_events.consumer.idempotency import record_processed

__all__ = [
    "QUORUM_DELIVERY_LIMIT",
    "ConsumerRegistry",
    "Event",
    "EventConsumer",
    "HandlerResult",
    "Outcome",
    "database_lost",
    "raw_connection",
    "record_processed",
    "registry",
]
