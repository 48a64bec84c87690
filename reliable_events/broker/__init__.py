"""Broker connections, by technology: confirmed publishing and consuming transports.

- :mod:`~reliable_events.broker.base`: what publishers and transports share (messages
  out and in, ``PublishResult``, the ``Publisher`` and ``Transport`` interfaces).
- :mod:`~reliable_events.broker.amqp`: RabbitMQ over py-amqp, both directions (what
  production uses).
- :mod:`~reliable_events.broker.writes`: the AMQP publisher's coalesced socket writes.
- :mod:`~reliable_events.broker.kombu`: kombu's server-less transports (``memory://``).
- :mod:`~reliable_events.broker.database`: the ``db://`` transport (queue rows in the
  application's database; loaded when a ``db://`` URL is used).
- :mod:`~reliable_events.broker.connect`: which publisher or transport serves a URL.
- :mod:`~reliable_events.broker.management`: RabbitMQ's management API (HTTP), read for
  the messages a passive declare does not count (``BROKER_MANAGEMENT_URL``).

Several nodes of a RabbitMQ cluster (``BROKER_URL`` as a list or ``"h1;h2"``) are tried
in turn by :class:`reliable_events.broker_nodes.BrokerNodes`.

Every message is persistent (``delivery_mode=2``), JSON (``application/json``, UTF-8),
and carries its ``message_id``, a timestamp and its topic as the AMQP ``type`` property.
The names below keep ``from reliable_events.broker import ...`` working.
"""

from __future__ import annotations

from reliable_events.broker.amqp import AmqpPublisher, AmqpTransport
from reliable_events.broker.base import (
    CONTENT_ENCODING,
    CONTENT_TYPE,
    KEY_HEADER,
    PERSISTENT,
    UNROUTABLE_QUEUE,
    Delivery,
    OutgoingMessage,
    Publisher,
    PublishResult,
    Transport,
    is_broker_failure,
    is_connection_failure,
)
from reliable_events.broker.connect import open_publisher, open_transport
from reliable_events.broker.kombu import KombuPublisher, KombuTransport
from reliable_events.broker_url import (
    AMQP_SCHEMES,
    OWN_TRANSPORTS,
    is_amqp_url,
    own_transport,
    safe_url,
)
from reliable_events.sanitize import describe_error, redact
from reliable_events.topology import BUCKET_HEADER, key_bucket

__all__ = [
    "AMQP_SCHEMES",
    "BUCKET_HEADER",
    "CONTENT_ENCODING",
    "CONTENT_TYPE",
    "KEY_HEADER",
    "OWN_TRANSPORTS",
    "PERSISTENT",
    "UNROUTABLE_QUEUE",
    "AmqpPublisher",
    "AmqpTransport",
    "Delivery",
    "KombuPublisher",
    "KombuTransport",
    "OutgoingMessage",
    "PublishResult",
    "Publisher",
    "Transport",
    "describe_error",
    "is_amqp_url",
    "is_broker_failure",
    "is_connection_failure",
    "key_bucket",
    "open_publisher",
    "open_transport",
    "own_transport",
    "redact",
    "safe_url",
]
