"""The broker topology the app owns, described as data and declared idempotently.

* the durable topic exchange ``EXCHANGE`` whose ``alternate-exchange`` is
  ``<EXCHANGE>.unrouted`` (fanout), feeding the durable queue ``<EXCHANGE>.unrouted``:
  an event no queue is bound for is kept there, never dropped;
* per consumer (see :mod:`reliable_events.consumer`): a durable queue bound to its
  topics, and delay queues ``<name>.retry.<n>`` whose TTL dead-letters back into it;
* per *ordered* consumer (:mod:`reliable_events.consumer.partitions`) instead: a
  headers exchange ``<name>.hash`` bound to the events exchange with its topics, and
  its partition queues ``<name>.p<i>`` (single active consumer) bound to it by the
  key's bucket (``re-event-bucket``).

Declaring the same thing twice is a no-op on RabbitMQ; declaring it with other
arguments is a ``PRECONDITION_FAILED`` channel error, reported as a
:class:`~reliable_events.exceptions.ConfigurationError`.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from reliable_events.conf import app_settings

UNROUTED_SUFFIX = ".unrouted"
#: The key's bucket, ``crc32(key) % KEY_BUCKETS`` (keyless: of the message id), set by
#: the relay: ordered consumers' partitions are bound to buckets (headers exchange;
#: not ``x-``: a headers exchange ignores such keys when it matches).
BUCKET_HEADER = "re-event-bucket"
KEY_BUCKETS = 64


@dataclass(frozen=True)
class ExchangeSpec:
    name: str
    type: str
    arguments: dict[str, Any] = field(default_factory=dict)
    #: (source exchange, routing key) pairs: exchange-to-exchange bindings.
    bindings: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class QueueSpec:
    name: str
    #: (exchange, routing key) pairs.
    bindings: tuple[tuple[str, str], ...] = ()
    arguments: dict[str, Any] = field(default_factory=dict)
    #: (headers exchange, binding arguments) pairs.
    matches: tuple[tuple[str, dict[str, Any]], ...] = ()


@dataclass(frozen=True)
class Topology:
    exchanges: tuple[ExchangeSpec, ...]
    queues: tuple[QueueSpec, ...]


def key_bucket(key: str) -> str:
    """The bucket of ``key`` (a string, for a headers-exchange binding to match)."""
    return str(zlib.crc32(key.encode("utf-8", "surrogatepass")) % KEY_BUCKETS)


def queue_arguments(**extra: Any) -> dict[str, Any]:
    """Arguments of a queue of the configured ``QUEUE_TYPE``."""
    args: dict[str, Any] = {}
    if app_settings.QUEUE_TYPE == "quorum":
        args["x-queue-type"] = "quorum"
    args.update(extra)
    return args


def unrouted_name() -> str:
    return f"{app_settings.EXCHANGE}{UNROUTED_SUFFIX}"


def events_topology() -> Topology:
    """The exchange, its alternate exchange and the unrouted queue."""
    exchange = str(app_settings.EXCHANGE)
    unrouted = unrouted_name()
    return Topology(
        exchanges=(
            ExchangeSpec(unrouted, "fanout"),
            ExchangeSpec(exchange, "topic", {"alternate-exchange": unrouted}),
        ),
        queues=(QueueSpec(unrouted, ((unrouted, ""),), queue_arguments()),),
    )


def full_topology(
    consumer_queues: Iterable[QueueSpec] = (), consumer_exchanges: Iterable[ExchangeSpec] = ()
) -> Topology:
    base = events_topology()
    return Topology(
        base.exchanges + tuple(consumer_exchanges), base.queues + tuple(consumer_queues)
    )


def declare_on_amqp_channel(channel: Any, topology: Topology) -> None:
    """Declare ``topology`` on a py-amqp channel (durable, never auto-deleted)."""
    for exchange in topology.exchanges:
        channel.exchange_declare(
            exchange.name,
            exchange.type,
            durable=True,
            auto_delete=False,
            arguments=exchange.arguments or None,
        )
    for exchange in topology.exchanges:
        for source, routing_key in exchange.bindings:
            channel.exchange_bind(exchange.name, source, routing_key)
    for queue in topology.queues:
        channel.queue_declare(
            queue.name,
            durable=True,
            auto_delete=False,
            exclusive=False,
            arguments=queue.arguments or None,
        )
        for exchange_name, routing_key in queue.bindings:
            channel.queue_bind(queue.name, exchange_name, routing_key)
        for exchange_name, arguments in queue.matches:
            channel.queue_bind(queue.name, exchange_name, "", arguments=arguments)


def declare_on_kombu_channel(channel: Any, topology: Topology) -> None:
    """Declare ``topology`` through kombu (used for the embedded, server-less transports)."""
    from kombu import Exchange, Queue

    exchanges = {
        spec.name: Exchange(spec.name, spec.type, durable=True, arguments=spec.arguments or None)
        for spec in topology.exchanges
    }
    for exchange in exchanges.values():
        exchange(channel).declare()
    for spec in topology.queues:
        if not spec.bindings:
            Queue(spec.name, durable=True, queue_arguments=spec.arguments or None)(
                channel
            ).declare()
        for exchange_name, routing_key in spec.bindings:
            bound = exchanges.get(exchange_name) or Exchange(exchange_name, "topic", durable=True)
            Queue(
                spec.name,
                bound,
                routing_key=routing_key,
                durable=True,
                queue_arguments=spec.arguments or None,
            )(channel).declare()
