"""What an ordered consumer does differently in the consume loop.

* **In-place retries**: a failed event of an ordered consumer is not re-published to a
  delay queue (later events of its key would pass it): the worker keeps it unacked,
  waits the retry delay (serving heartbeats, :class:`RetryInPlace`) and runs it again,
  holding its partition.  The attempt count and the failure history travel in the
  headers the retry would have carried (:class:`InPlaceRetries`); a crash restarts the
  count (the broker's redelivery counter still bounds it, ``MAX_DELIVERIES``).
* **Held keys** (``hold_key_on_dead_letter``): :mod:`reliable_events.consumer.holds`.
* **Partitions and heartbeats**: :class:`OrderedRuntime` beats, recomputes this
  process's share (:mod:`reliable_events.consumer.membership`), makes the transport
  subscribe again when it changed, and releases the keys whose dead letter was retried
  or discarded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from django.db import DatabaseError, InterfaceError

from reliable_events.broker.base import Delivery, Transport
from reliable_events.consumer.base import Event, EventConsumer
from reliable_events.consumer.failures import Failure
from reliable_events.consumer.holds import release_due
from reliable_events.consumer.membership import PartitionShare
from reliable_events.consumer.retries import retry_headers
from reliable_events.exceptions import DatabaseUnavailable

logger = logging.getLogger(__name__)


class RetryInPlace(Exception):
    """Run this delivery again after ``delay`` seconds, keeping it (and its partition)."""

    def __init__(self, delay: float) -> None:
        super().__init__(f"retry in place in {delay:g}s")
        self.delay = delay


class InPlaceRetries:
    """The headers of the next in-place attempt of each failing delivery."""

    def __init__(self) -> None:
        self._headers: dict[tuple[str, str], dict[str, Any]] = {}

    def current(self, delivery: Delivery) -> Delivery:
        """``delivery`` with the headers of its next attempt, if it failed before here."""
        headers = self._headers.get((delivery.consumer, delivery.message_id))
        return delivery if headers is None else replace(delivery, headers=headers)

    def failed(self, delivery: Delivery, event: Event, failure: Failure, delay: float) -> None:
        self._headers[(delivery.consumer, delivery.message_id)] = {
            **delivery.headers,
            **retry_headers(delivery, event, failure),
        }
        raise RetryInPlace(delay)

    def settled(self, delivery: Delivery) -> None:
        if self._headers:
            self._headers.pop((delivery.consumer, delivery.message_id), None)


class OrderedRuntime:
    """The periodic work of a worker running ordered consumers."""

    def __init__(self, consumers: Iterable[EventConsumer], transport: Transport) -> None:
        self.consumers = [consumer for consumer in consumers if type(consumer).ordered]
        self.transport = transport
        self.share = PartitionShare(type(consumer) for consumer in self.consumers)
        if hasattr(transport, "partition_share"):
            transport.partition_share = self.share

    def tick(self) -> None:
        """Heartbeat (resubscribe when this process's share changed) and release keys."""
        if not self.share.due():
            return
        lost, gained = self.share.heartbeat()
        if (lost or gained) and self.transport.connected:
            # Closing is the one safe release: the broker puts back what this process
            # holds unacked *before* it activates the next consumer of the partition.
            # Gained partitions are subscribed on a fresh channel too (connect()).
            self.transport.close()
        for consumer in self.consumers:
            try:
                release_due(consumer)
            except (DatabaseUnavailable, DatabaseError, InterfaceError) as exc:
                logger.warning(
                    "reliable_events: %s: releasing held keys failed: %s",
                    type(consumer).name,
                    type(exc).__name__,
                )

    def close(self) -> None:
        if self.consumers:
            self.share.leave()
