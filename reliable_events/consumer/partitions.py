"""Which partition queues does an ordered consumer have?

An ordered consumer (``EventConsumer.ordered = True``) does not have one queue but
``N`` partition queues (``partitions``, default ``ORDERED_PARTITIONS``, at most
``KEY_BUCKETS`` = 64):

* the relay stamps every event with its key's bucket, ``re-event-bucket`` =
  ``crc32(key) % 64`` (:func:`reliable_events.topology.key_bucket`; a keyless event:
  of its message id) and still publishes it once, to the topic exchange;
* ``<name>.hash``, a headers exchange, is bound to the events exchange with the
  consumer's topics (its alternate exchange is ``<EXCHANGE>.unrouted``: an event
  without a bucket is kept there, never dropped);
* ``<name>.p<i>`` (``i`` zero-padded), declared with ``x-single-active-consumer``, is
  bound to it for the buckets ``b`` with ``b % N == i``.  So all events of one key go
  to one partition, which the broker delivers to one consumer at a time, in order.

Why not RabbitMQ's consistent-hash exchange: it maps its hash ring to queues in the
order the bindings were added, and a node restart re-adds them in another order
(measured on 3.10.8: 148 of 200 keys moved to another partition after a restart), so a
key's events queued before and after a restart would sit in two partitions and could
be applied out of order.  A bucket computed by the relay and matched by a plain
headers exchange is the same before and after any restart.

How the processes share the partitions: :mod:`reliable_events.consumer.membership`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from reliable_events.conf import app_settings
from reliable_events.topology import (
    BUCKET_HEADER,
    KEY_BUCKETS,
    ExchangeSpec,
    QueueSpec,
    queue_arguments,
    unrouted_name,
)

if TYPE_CHECKING:
    from reliable_events.consumer.base import EventConsumer

#: Deliveries a quorum partition may make of one message (see QUORUM_DELIVERY_LIMIT).
_QUORUM_DELIVERY_LIMIT = 1000


def partition_count(cls: type[EventConsumer]) -> int:
    count = app_settings.ORDERED_PARTITIONS if cls.partitions is None else cls.partitions
    return min(KEY_BUCKETS, max(1, int(count)))


def hash_exchange(cls: type[EventConsumer]) -> str:
    return f"{cls.name}.hash"


def partition_queues(cls: type[EventConsumer]) -> list[str]:
    """``<name>.p<i>``; zero-padded so that name order is partition order."""
    count = partition_count(cls)
    width = len(str(count - 1))
    return [f"{cls.name}.p{i:0{width}d}" for i in range(count)]


def partition_of(cls: type[EventConsumer], headers: Mapping[str, Any]) -> str:
    """The partition queue an event with these headers reaches (by the bucket the relay
    stamped), or the consumer's name when it carries none."""
    queues = partition_queues(cls)
    bucket = str(headers.get(BUCKET_HEADER, ""))
    if not (bucket.isascii() and bucket.isdigit() and int(bucket) < KEY_BUCKETS):
        return cls.name
    return queues[int(bucket) % len(queues)]


def exchange_specs(cls: type[EventConsumer]) -> list[ExchangeSpec]:
    """The partitioning exchange of an ordered consumer, bound to its topics."""
    events = str(app_settings.EXCHANGE)
    return [
        ExchangeSpec(
            hash_exchange(cls),
            "headers",
            {"alternate-exchange": unrouted_name()},
            tuple((events, topic) for topic in cls.topics),
        )
    ]


def queue_specs(cls: type[EventConsumer]) -> list[QueueSpec]:
    """The partition queues (single active consumer), each bound to its buckets."""
    args: dict[str, Any] = {"x-single-active-consumer": True}
    if app_settings.QUEUE_TYPE == "quorum":
        args["x-delivery-limit"] = _QUORUM_DELIVERY_LIMIT
    exchange = hash_exchange(cls)
    queues = partition_queues(cls)
    return [
        QueueSpec(
            name,
            arguments=queue_arguments(**args),
            matches=tuple(
                (exchange, {"x-match": "all", BUCKET_HEADER: str(bucket)})
                for bucket in range(index, KEY_BUCKETS, len(queues))
            ),
        )
        for index, name in enumerate(queues)
    ]
