"""kombu's server-less transports (``memory://``, ``filesystem://``): the publisher
and the consuming transport.  Their publish stores the message before it returns."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, NoReturn

from reliable_events.broker.base import (
    _NO_WAIT,
    CONTENT_ENCODING,
    PERSISTENT,
    Delivery,
    OutgoingMessage,
    Publisher,
    PublishResult,
    Transport,
    is_broker_failure,
    quiet_release,
    undecodable_delivery,
)
from reliable_events.broker_url import (
    safe_url,
)
from reliable_events.conf import app_settings
from reliable_events.consumer import EventConsumer, registry
from reliable_events.exceptions import BrokerError, ConfigurationError
from reliable_events.sanitize import describe_error, error_summary
from reliable_events.topology import (
    Topology,
    declare_on_kombu_channel,
    full_topology,
    unrouted_name,
)

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)


class KombuPublisher(Publisher):
    """Publisher over kombu's server-less transports (embedded default and tests)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: Any = None
        self._producer: Any = None
        self._pid = os.getpid()
        self.last_used = 0.0

    @property
    def connected(self) -> bool:
        return self._producer is not None and self._pid == os.getpid()

    def connect(self) -> None:
        if self.connected:
            return
        from kombu import Connection, Producer

        options = {"deadletter_queue": unrouted_name()}
        options.update(app_settings.BROKER_TRANSPORT_OPTIONS)
        conn = None
        try:
            conn = Connection(self.url, transport_options=options)
            channel = conn.default_channel
            self._producer = Producer(channel, serializer=None, auto_declare=False)
        except Exception as exc:
            if conn is not None:
                quiet_release(conn)
            raise BrokerError(
                f"cannot connect to broker {safe_url(self.url)}: {describe_error(exc, self.url)}"
            ) from exc
        self._conn, self._pid = conn, os.getpid()
        self.declare(_embedded_topology())

    def declare(self, topology: Topology) -> None:
        self.connect()
        declare_on_kombu_channel(self._conn.default_channel, topology)

    def close(self) -> None:
        conn, self._conn, self._producer = self._conn, None, None
        if conn is not None:
            quiet_release(conn)

    def publish(
        self, messages: Sequence[OutgoingMessage], *, timeout: float, wait: bool = True
    ) -> PublishResult:
        """Publish and store each message before returning (``wait`` changes nothing)."""
        result = PublishResult()
        if not messages:
            return result
        try:
            self.connect()
        except BrokerError as exc:
            result.interrupt([m.ref for m in messages], str(exc))
            return result
        for index, message in enumerate(messages):
            properties: dict[str, Any] = {"message_id": message.message_id, "type": message.topic}
            stamp = message.timestamp
            if stamp is not None:
                properties["timestamp"] = stamp if isinstance(stamp, int) else stamp.timestamp()
            try:
                self._producer.publish(
                    message.body,
                    exchange=self._exchange_for(message),
                    routing_key=message.routing_key,
                    content_type=message.content_type,
                    content_encoding=CONTENT_ENCODING,
                    delivery_mode=PERSISTENT,
                    headers=dict(message.headers),
                    retry=False,
                    **properties,
                )
            except Exception as exc:
                reason = describe_error(exc, self.url)
                if is_broker_failure(exc):
                    result.interrupt([m.ref for m in messages[index:]], reason)
                else:  # this message could not be published: the rest is not to blame
                    result.fail([message.ref], reason)
                    result.interrupt(
                        [m.ref for m in messages[index + 1 :]],
                        f"not sent: another message of the batch failed ({reason})",
                        broker=False,
                    )
                self.close()
                break
            result.confirmed.append(message.ref)
        self.last_used = time.monotonic()
        return result

    def _exchange_for(self, message: OutgoingMessage) -> str:
        """The events exchange, or the unrouted one when no queue is bound for the topic.

        kombu's virtual transports drop such a message (topic routing skips their
        ``deadletter_queue``), so the alternate exchange RabbitMQ applies is applied here.
        """
        exchange = message.exchange
        if exchange != str(app_settings.EXCHANGE):
            return exchange
        channel = self._conn.default_channel
        try:
            table = channel.get_table(exchange)
            queues = channel.typeof(exchange).lookup(table, exchange, message.routing_key, None)
        except (AttributeError, KeyError):  # not a virtual transport, or no such exchange
            return exchange
        return exchange if queues else unrouted_name()


def _embedded_topology() -> Topology:
    """On server-less transports, routing state lives in each process: declare every
    consumer queue too, so that this process routes events to them."""
    return full_topology(
        spec for cls in registry.all() if not cls.ordered for spec in cls.queue_specs()
    )


# -- consuming ---------------------------------------------------------------------------
class KombuTransport(Transport):
    """kombu's server-less transports (``memory://``, ``filesystem://``)."""

    def __init__(
        self, url: str, consumers: Sequence[type[EventConsumer]], *, prefetch: int
    ) -> None:
        self.url = url
        self.consumer_classes = list(consumers)
        ordered = [cls.name for cls in self.consumer_classes if cls.ordered]
        if ordered:
            raise ConfigurationError(
                f"ordered consumers ({', '.join(ordered)}) need a RabbitMQ (amqp://) or the "
                "database (db://) transport"
            )
        self.prefetch = prefetch
        self.relays_itself = url.split(":", 1)[0].lower() == "memory"
        self._conn: Any = None
        self._consumers: list[Any] = []
        self._buffer: deque[Delivery] = deque()
        from kombu.exceptions import KombuError

        self.connection_errors = (KombuError, OSError)

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def connect(self) -> None:
        if self.connected:
            return
        from kombu import Connection, Consumer, Queue

        options: dict[str, Any] = {"deadletter_queue": unrouted_name(), "polling_interval": 0.05}
        options.update(app_settings.BROKER_TRANSPORT_OPTIONS)
        conn = Connection(self.url, transport_options=options)
        try:
            channel: Any = conn.channel()
            specs = [spec for cls in self.consumer_classes for spec in cls.queue_specs()]
            declare_on_kombu_channel(channel, full_topology(specs))
            channel.basic_qos(0, self.prefetch, False)
            consumers = []
            for cls in self.consumer_classes:
                consumer = Consumer(
                    channel,
                    [Queue(cls.queue_name(), no_declare=True)],
                    no_ack=False,
                    accept=["application/json"],
                    on_message=partial(self._on_message, cls.name),
                    on_decode_error=partial(self._on_decode_error, cls.name),
                    prefetch_count=self.prefetch,
                )
                consumer.consume()
                consumers.append(consumer)
            self._guard_fetch(channel)
        except BaseException:
            quiet_release(conn, "consumer")
            raise
        self._conn, self._consumers = conn, consumers

    def _guard_fetch(self, channel: Any) -> None:
        """Make the transport's own decoding failures poison deliveries.

        A kombu virtual transport takes a stored message off its queue (``_get``: the
        ``filesystem://`` transport moves and deletes the file), *then* decodes its
        envelope, and builds a message from it inside ``drain_events``; a zero-length or
        truncated file raised ``JSONDecodeError`` there and stopped the consumer, the
        message already gone.  Wrapped, such a failure becomes a delivery that is
        dead-lettered (``undecodable``) with the bytes the error still holds.
        """
        fetch = channel._get
        queues = {cls.queue_name(): cls.name for cls in self.consumer_classes}

        def guarded_get(queue: str, *args: Any, **kwargs: Any) -> Any:
            try:
                payload = fetch(queue, *args, **kwargs)
            except (ValueError, LookupError, TypeError) as exc:
                # Not ``Empty``: the message was taken off the queue and failed to decode.
                self._fetched_undecodable(queues, queue, exc, _error_bytes(exc))
            try:
                channel.Message(payload, channel=channel)  # what kombu does next, unguarded
            except Exception as exc:
                self._fetched_undecodable(queues, queue, exc, _envelope_bytes(payload))
            return payload

        channel._get = guarded_get

    def _fetched_undecodable(
        self, queues: dict[str, str], queue: str, exc: BaseException, raw: bytes
    ) -> NoReturn:
        consumer = queues.get(queue)
        if consumer is None:  # pragma: no cover - only our consumers' queues are polled
            logger.warning(
                "reliable_events: an undecodable message was taken off queue %s, which no "
                "consumer of this worker reads; it is lost: %s",
                queue,
                error_summary(exc),
            )
        else:
            self._buffer.append(undecodable_delivery(consumer, exc, raw, routing_key=queue))
        raise _FetchedUndecodable() from exc

    def _on_message(self, consumer: str, message: Any) -> None:
        try:
            props = dict(message.properties)
            props["content_type"] = message.content_type
            props["content_encoding"] = message.content_encoding
            info = message.delivery_info or {}
            body = message.body
            if isinstance(body, str):
                body = body.encode("utf-8")
            delivery = Delivery(
                consumer=consumer,
                body=bytes(body),
                properties=props,
                headers=dict(message.headers or {}),
                exchange=str(info.get("exchange") or ""),
                routing_key=str(info.get("routing_key") or ""),
                redelivered=bool(info.get("redelivered")),
                tag=message,
            )
        except Exception as exc:  # raised here it would stop the loop
            delivery = undecodable_delivery(
                consumer, exc, getattr(message, "body", b""), tag=message, message=message
            )
        self._buffer.append(delivery)

    def _on_decode_error(self, consumer: str, message: Any, exc: Exception) -> None:
        """kombu found the message broken (e.g. a compression it cannot undo)."""
        self._buffer.append(
            undecodable_delivery(
                consumer, exc, getattr(message, "body", b""), tag=message, message=message
            )
        )

    def get(self, timeout: float) -> Delivery | None:
        if not self._buffer:
            with contextlib.suppress(TimeoutError, _FetchedUndecodable):
                self._conn.drain_events(timeout=timeout)
        return self._buffer.popleft() if self._buffer else None

    def _poll(self) -> None:
        with contextlib.suppress(TimeoutError, _FetchedUndecodable):
            self._conn.drain_events(timeout=_NO_WAIT)

    def _wait(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError, _FetchedUndecodable):
            self._conn.drain_events(timeout=seconds)
        return True

    def ack(self, delivery: Delivery) -> None:
        if delivery.tag is not None:  # None: the transport already dropped it
            delivery.tag.ack()

    def requeue(self, delivery: Delivery) -> None:
        if delivery.tag is None:
            logger.error(
                "reliable_events: %s could not store the dead letter of an undecodable "
                "message the transport had already removed; it is lost: %s",
                delivery.consumer,
                delivery.undecodable,
            )
            return
        delivery.tag.reject(requeue=True)

    def close(self) -> None:
        conn, consumers = self._conn, self._consumers
        self._conn, self._consumers = None, []
        for delivery in self._buffer:  # received, not started (memory:// restores none)
            if delivery.tag is not None:
                with contextlib.suppress(Exception):
                    delivery.tag.reject(requeue=True)
        self._buffer.clear()
        for consumer in consumers:
            try:
                consumer.cancel()
            except Exception:  # closing anyway
                logger.debug("reliable_events: cancel failed", exc_info=True)
        if conn is not None:
            quiet_release(conn, "consumer")


class _FetchedUndecodable(Exception):
    """Ends ``drain_events`` at once when an undecodable message was fetched (it waits
    in the buffer as a poison delivery)."""


def _error_bytes(exc: BaseException) -> bytes:
    """The input a decoding error still holds (``JSONDecodeError.doc``,
    ``UnicodeDecodeError.object``), else nothing."""
    doc = getattr(exc, "doc", None)
    if isinstance(doc, str):
        return doc.encode("utf-8", "backslashreplace")
    obj = getattr(exc, "object", None)
    return bytes(obj) if isinstance(obj, bytes | bytearray) else b""


def _envelope_bytes(payload: Any) -> bytes:
    try:
        return json.dumps(payload, default=repr).encode()
    except (TypeError, ValueError, RecursionError):
        return repr(payload).encode("utf-8", "backslashreplace")
