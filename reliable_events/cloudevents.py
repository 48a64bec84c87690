"""How does an event look to other languages? CloudEvents 1.0 on the wire, by setting.

``CLOUDEVENTS`` (read when a publisher is opened):

* ``"off"`` (default): the body is the payload (JSON), the metadata AMQP properties
  (``message_id``, ``type`` = topic, ``timestamp``) and headers, as before;
* ``"binary"``: the same message plus the CloudEvents attributes as ``cloudEvents:``
  application properties (headers), per the CloudEvents AMQP protocol binding
  (``cloudEvents:specversion``, ``:id``, ``:source``, ``:type``, ``:time``, ``:subject``
  = the key); ``datacontenttype`` is the ``content_type`` property (``application/json``),
  the payload stays the body;
* ``"structured"``: the body is an ``application/cloudevents+json`` envelope (the
  attributes, ``traceparent``/``tracestate`` as extensions, the payload as ``data``).

Applied by the publishers of ``amqp://`` and kombu URLs (the wire other languages
read); ``db://`` keeps its own rows.  :func:`normalize` is what every consumer applies
first: it reads all three forms (and the ``cloudEvents_`` / ``ce-`` binary prefixes of
other bindings), so producers can switch modes while consumers run.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from reliable_events.broker.base import (
    CONTENT_TYPE,
    KEY_HEADER,
    Delivery,
    OutgoingMessage,
    Publisher,
    PublisherWrapper,
    PublishResult,
)
from reliable_events.conf import app_settings
from reliable_events.exceptions import ConfigurationError

SPECVERSION = "1.0"
#: The AMQP binding's prefix (what binary mode writes).
PREFIX = "cloudEvents:"
#: Binary-mode prefixes :func:`normalize` reads: the AMQP binding's two, the RabbitMQ /
#: Kafka / HTTP bindings' ``ce-``.
PREFIXES = ("cloudEvents:", "cloudEvents_", "ce-", "ce_")
STRUCTURED_CONTENT_TYPE = "application/cloudevents+json"
MODES = ("off", "binary", "structured")
#: Trace headers carried as CloudEvents extensions (distributed tracing extension).
_EXTENSIONS = ("traceparent", "tracestate")


def mode() -> str:
    value = str(app_settings.CLOUDEVENTS).lower()
    if value not in MODES:
        raise ConfigurationError(f"CLOUDEVENTS is {value!r}: use one of {', '.join(MODES)}")
    return value


def source() -> str:
    return str(app_settings.CLOUDEVENTS_SOURCE) or f"/reliable-events/{app_settings.EXCHANGE}"


def _time(stamp: datetime | int | None) -> str:
    if stamp is None:
        stamp = datetime.now(UTC)
    elif isinstance(stamp, int):
        stamp = datetime.fromtimestamp(stamp, tz=UTC)
    return stamp.isoformat().replace("+00:00", "Z")


def attributes(message: OutgoingMessage, event_source: str) -> dict[str, str]:
    """The CloudEvents context attributes of ``message`` (``source`` given)."""
    attrs = {
        "specversion": SPECVERSION,
        "id": message.message_id,
        "source": event_source,
        "type": message.topic,
        "time": _time(message.timestamp),
    }
    key = message.headers.get(KEY_HEADER)
    if isinstance(key, str):
        attrs["subject"] = key
    return attrs


def binary(message: OutgoingMessage, event_source: str) -> OutgoingMessage:
    headers = dict(message.headers)
    for name, value in attributes(message, event_source).items():
        headers[PREFIX + name] = value
    return dataclasses.replace(message, headers=headers)


def structured(message: OutgoingMessage, event_source: str) -> OutgoingMessage:
    envelope: dict[str, Any] = {**attributes(message, event_source)}
    envelope["datacontenttype"] = CONTENT_TYPE
    for name in _EXTENSIONS:
        value = message.headers.get(name)
        if isinstance(value, str):
            envelope[name] = value
    head = json.dumps(envelope, ensure_ascii=False, separators=(",", ":"))[:-1].encode()
    # The payload is JSON text already: spliced in as ``data``, never decoded.
    body = head + b',"data":' + message.body + b"}"
    return dataclasses.replace(message, body=body, content_type=STRUCTURED_CONTENT_TYPE)


class CloudEventsPublisher(PublisherWrapper):
    """Publishes every message as a CloudEvent (``binary`` or ``structured``); everything
    else is the wrapped publisher's."""

    def __init__(self, inner: Publisher, event_mode: str) -> None:
        super().__init__(inner)
        self.encode = binary if event_mode == "binary" else structured
        self.source = source()

    def publish(
        self, messages: Sequence[OutgoingMessage], *, timeout: float, wait: bool = True
    ) -> PublishResult:
        encode, event_source = self.encode, self.source
        return self.inner.publish(
            [encode(m, event_source) for m in messages], timeout=timeout, wait=wait
        )


def wrap(publisher: Publisher) -> Publisher:
    """``publisher`` itself with ``CLOUDEVENTS = "off"`` (and on ``db://``), else wrapped."""
    event_mode = mode()
    if event_mode == "off" or publisher.url.startswith("db:"):
        return publisher
    return CloudEventsPublisher(publisher, event_mode)


# -- consuming ----------------------------------------------------------------------------------
def normalize(delivery: Delivery) -> Delivery:
    """``delivery`` in the legacy shape: a structured CloudEvent becomes its ``data`` as
    the body with its attributes as properties; a binary one gets ``message_id`` and
    ``type`` from its attributes when the AMQP properties lack them.  Anything else is
    returned as it is.  A broken envelope comes back ``undecodable`` (a dead letter)."""
    props = delivery.properties
    content_type = props.get("content_type")
    if isinstance(content_type, str) and content_type.lower().startswith(STRUCTURED_CONTENT_TYPE):
        return _from_structured(delivery)
    headers = delivery.headers
    for prefix in PREFIXES:
        if prefix + "specversion" in headers:
            return _from_binary(delivery, prefix)
    return delivery


def identified(delivery: Delivery) -> Delivery:
    """``delivery`` with its CloudEvent's ``id`` and ``type`` as ``message_id`` and
    ``type`` where its properties lack them, its body as it is: a CloudEvent that is
    poison (say, binary ``data_base64``) becomes a dead letter found by its event id."""
    content_type = delivery.properties.get("content_type")
    if isinstance(content_type, str) and content_type.lower().startswith(STRUCTURED_CONTENT_TYPE):
        try:
            envelope = json.loads(delivery.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return delivery
        return _with_ids(delivery, envelope if isinstance(envelope, dict) else {}, "")
    for prefix in PREFIXES:
        if prefix + "specversion" in delivery.headers:
            return _from_binary(delivery, prefix)
    return delivery


def _with_ids(delivery: Delivery, attributes: Mapping[str, Any], prefix: str) -> Delivery:
    """``message_id`` and ``type`` from the CloudEvent's ``id`` and ``type`` attributes
    where the properties lack them."""
    props = dict(delivery.properties)
    for prop, name in (("message_id", "id"), ("type", "type")):
        value = attributes.get(prefix + name)
        if not props.get(prop) and isinstance(value, str):
            props[prop] = value
    return dataclasses.replace(delivery, properties=props)


def _from_binary(delivery: Delivery, prefix: str) -> Delivery:
    return _with_ids(delivery, delivery.headers, prefix)


def _from_structured(delivery: Delivery) -> Delivery:
    try:
        envelope = json.loads(delivery.body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        envelope = None
    if not isinstance(envelope, dict) or envelope.get("specversion") != SPECVERSION:
        return _broken(delivery, "the CloudEvents envelope is not a JSON object of spec 1.0")
    data_type = envelope.get("datacontenttype")
    if "data_base64" in envelope or (
        isinstance(data_type, str) and not data_type.lower().startswith(CONTENT_TYPE)
    ):
        return _broken(delivery, f"the CloudEvent's data is not JSON ({str(data_type)[:80]})")
    props = dict(delivery.properties, content_type=CONTENT_TYPE)
    for prop, name in (("message_id", "id"), ("type", "type")):
        if not props.get(prop) and isinstance(envelope.get(name), str):
            props[prop] = envelope[name]
    headers = dict(delivery.headers)
    for name in _EXTENSIONS:
        if isinstance(envelope.get(name), str):
            headers.setdefault(name, envelope[name])
    body = json.dumps(envelope.get("data"), ensure_ascii=False, separators=(",", ":"))
    return dataclasses.replace(delivery, body=body.encode(), properties=props, headers=headers)


def _broken(delivery: Delivery, why: str) -> Delivery:
    return dataclasses.replace(delivery, undecodable=why)
