"""Where do deliveries come from? The consuming transports (py-amqp, kombu) and their opening."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Sequence
from functools import partial
from typing import Any, NoReturn

from django.utils.module_loading import import_string

from reliable_events.broker import (
    describe_error,
    is_amqp_url,
    own_transport,
    safe_url,
)
from reliable_events.conf import app_settings
from reliable_events.consumer.base import EventConsumer
from reliable_events.consumer.retries import (
    AmqpRetryScheduler,
    OutboxRetryScheduler,
    RetryScheduler,
)
from reliable_events.consumer.text import error_summary
from reliable_events.consumer.wire import Delivery
from reliable_events.exceptions import (
    ConfigurationError,
)
from reliable_events.runner import StopFlag
from reliable_events.topology import Topology, full_topology
from reliable_events.topology_check import TopologyCheck

logger = logging.getLogger(__name__)

#: Seconds the loop blocks waiting for a delivery before it looks at its stop flag.
POLL_SECONDS = 1.0
#: Socket timeout for reading what already arrived (batching), seconds.
_NO_WAIT = 0.0005


# -- transports --------------------------------------------------------------------------
class Transport:
    """A consuming broker connection: deliveries in, acks and rejects out."""

    url: str
    #: Exceptions that mean "the connection is gone: reconnect".
    connection_errors: tuple[type[BaseException], ...] = (OSError,)
    #: On ``memory://`` nothing outside this process can deliver retries: relay them here.
    relays_itself = False

    def connect(self) -> None:
        raise NotImplementedError

    @property
    def connected(self) -> bool:
        raise NotImplementedError

    def get(self, timeout: float) -> Delivery | None:
        """The next delivery, waiting at most ``timeout`` seconds."""
        raise NotImplementedError

    def take_more(self, consumer: str, limit: int) -> list[Delivery]:
        """Up to ``limit`` more deliveries of ``consumer`` that have already arrived (never
        waits for the broker; stops at a delivery of another consumer)."""
        taken: list[Delivery] = []
        buffer = self._buffer
        while len(taken) < limit:
            if not buffer:
                self._poll()
                if not buffer:
                    break
            if buffer[0].consumer != consumer:
                break
            taken.append(buffer.popleft())
        return taken

    def _poll(self) -> None:
        """Read whatever the broker has already sent, without waiting."""

    _buffer: deque[Delivery]

    def ack(self, delivery: Delivery) -> None:
        raise NotImplementedError

    def requeue(self, delivery: Delivery) -> None:
        raise NotImplementedError

    def pump(self, seconds: float, stop: StopFlag) -> None:
        """Keep the connection alive for ``seconds`` without processing anything."""
        stop.wait(seconds)

    def close(self) -> None:
        raise NotImplementedError

    def make_scheduler(self) -> RetryScheduler:
        raise NotImplementedError

    def check_topology(self) -> None:
        """Verify (and repair) the broker topology when ``TOPOLOGY_CHECK_SECONDS`` passed."""

    def abandon(self, delivery: Delivery) -> bool:
        """The database failed while ``delivery`` was processed: whether the transport gave
        it back itself (the database transport rolls its claim back)."""
        return False


def _amqp_errors() -> tuple[type[BaseException], ...]:
    import amqp
    from kombu.exceptions import KombuError

    return (
        amqp.exceptions.AMQPError,
        amqp.exceptions.RecoverableConnectionError,
        KombuError,
        OSError,
        ConnectionError,
    )


class AmqpTransport(Transport):
    """py-amqp: one connection, one channel, ``basic.qos`` prefetch, manual acks.

    Deliveries are buffered by the channel callback and handed out one at a time, so
    reading frames (for a confirm, a heartbeat) never runs a handler re-entrantly.
    """

    def __init__(
        self,
        url: str,
        consumers: Sequence[type[EventConsumer]],
        *,
        prefetch: int,
        heartbeat: float,
        connect_timeout: float,
    ) -> None:
        self.url = url
        self.consumer_classes = list(consumers)
        self.prefetch = prefetch
        self.heartbeat = heartbeat
        self.connect_timeout = connect_timeout
        self.connection_errors = _amqp_errors()
        self._kombu: Any = None
        self._raw: Any = None
        self._channel: Any = None
        self._buffer: deque[Delivery] = deque()
        # Acks are coalesced: settled tags wait here until the loop is about to block, or
        # half the prefetch window is used, then go out as one ``multiple`` ack when no
        # earlier delivery is still unsettled (else one by one).
        self._settled: list[int] = []
        self._unsettled: set[int] = set()
        self.ack_every = max(1, prefetch // 2)
        self.topology_check = TopologyCheck(self.consumer_classes)

    @property
    def connected(self) -> bool:
        return self._channel is not None

    def topology(self) -> Topology:
        specs = [spec for cls in self.consumer_classes for spec in cls.queue_specs()]
        return full_topology(specs)

    def connect(self) -> None:
        if self.connected:
            return
        import amqp
        from kombu import Connection

        conn = Connection(
            self.url,
            connect_timeout=self.connect_timeout,
            heartbeat=self.heartbeat,
            transport_options=dict(app_settings.BROKER_TRANSPORT_OPTIONS),
        )
        try:
            conn.connect()
            raw = conn.connection
            try:
                # Verified on a side channel first: what was missing is logged.
                self.topology_check.run(raw)
            except amqp.exceptions.PreconditionFailed as exc:
                raise ConfigurationError(
                    "the broker already has this consumer topology with other arguments: "
                    f"{describe_error(exc, self.url)}. Delete the old queues or restore the "
                    "settings (QUEUE_TYPE, retry_delays) they were declared with."
                ) from exc
            channel = amqp.Channel(raw, None, auto_decode=False)
            channel.open()
            channel.basic_qos(0, self.prefetch, False)
            for cls in self.consumer_classes:
                channel.basic_consume(
                    cls.queue_name(),
                    consumer_tag=cls.name,
                    no_ack=False,
                    callback=partial(self._on_message, cls.name),
                )
        except BaseException:
            _quiet_release(conn)
            raise
        self._kombu, self._raw, self._channel = conn, raw, channel
        logger.info(
            "reliable_events: consuming %s from %s (prefetch %d)",
            ", ".join(cls.name for cls in self.consumer_classes),
            safe_url(self.url),
            self.prefetch,
        )

    def _on_message(self, consumer: str, message: Any) -> None:
        info = message.delivery_info
        try:
            props = dict(message.properties)
            headers = dict(props.pop("application_headers", None) or {})
            body = message.body
            if isinstance(body, str):  # pragma: no cover - the channel does not auto-decode
                body = body.encode("utf-8")
            delivery = Delivery(
                consumer=consumer,
                body=bytes(body),
                properties=props,
                headers=headers,
                exchange=str(info.get("exchange") or ""),
                routing_key=str(info.get("routing_key") or ""),
                redelivered=bool(info.get("redelivered")),
                tag=info["delivery_tag"],
            )
        except Exception as exc:  # raised here it would stop the loop on every redelivery
            delivery = undecodable_delivery(
                consumer,
                exc,
                getattr(message, "body", b""),
                tag=info["delivery_tag"],
                message=message,
            )
        self._buffer.append(delivery)
        self._unsettled.add(info["delivery_tag"])

    def _drain(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            self._raw.drain_events(timeout=timeout)
        self._raw.heartbeat_tick()

    def _window_open(self) -> bool:
        """Whether the broker may still send more (fewer unacked than the prefetch)."""
        return len(self._unsettled) + len(self._settled) < self.prefetch

    def get(self, timeout: float) -> Delivery | None:
        if not self._buffer and self._settled and self._window_open():
            self._poll()  # what the broker already sent (a backlog) comes without waiting
        if not self._buffer:
            self.flush_acks()  # about to wait: the broker gets every ack first
            self._drain(timeout)
        return self._buffer.popleft() if self._buffer else None

    def _poll(self) -> None:
        if self._window_open():
            with contextlib.suppress(TimeoutError):
                self._raw.drain_events(timeout=_NO_WAIT)

    def ack(self, delivery: Delivery) -> None:
        """Ack ``delivery`` (its transaction has committed); sent now or coalesced."""
        self._unsettled.discard(delivery.tag)
        self._settled.append(delivery.tag)
        if len(self._settled) >= self.ack_every:
            self.flush_acks()

    def flush_acks(self) -> None:
        settled = self._settled
        if not settled or self._channel is None:
            return
        top = max(settled)
        if not any(tag < top for tag in self._unsettled):
            self._channel.basic_ack(top, multiple=True)
        else:
            for tag in settled:
                self._channel.basic_ack(tag)
        settled.clear()

    def requeue(self, delivery: Delivery) -> None:
        self._unsettled.discard(delivery.tag)
        self._channel.basic_reject(delivery.tag, requeue=True)

    def pump(self, seconds: float, stop: StopFlag) -> None:
        self.flush_acks()
        deadline = time.monotonic() + seconds
        while not stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._drain(min(remaining, POLL_SECONDS))

    def close(self) -> None:
        """Send the pending acks, close the connection; unacked deliveries go back to
        their queues."""
        try:
            self.flush_acks()
        except Exception:  # the connection is already gone: the broker redelivers them
            logger.debug("reliable_events: could not send pending acks", exc_info=True)
        conn, self._kombu, self._raw, self._channel = self._kombu, None, None, None
        self._buffer.clear()
        self._settled.clear()
        self._unsettled.clear()
        if conn is not None:
            _quiet_release(conn)

    def make_scheduler(self) -> RetryScheduler:
        return AmqpRetryScheduler(self.url)

    def check_topology(self) -> None:
        if self._raw is not None and self.topology_check.due():
            self.topology_check.run(self._raw)


class KombuTransport(Transport):
    """kombu's server-less transports (``memory://``, ``filesystem://``)."""

    def __init__(
        self, url: str, consumers: Sequence[type[EventConsumer]], *, prefetch: int
    ) -> None:
        self.url = url
        self.consumer_classes = list(consumers)
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

        from reliable_events.topology import declare_on_kombu_channel, unrouted_name

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
            _quiet_release(conn)
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
        self._buffer.clear()
        for consumer in consumers:
            try:
                consumer.cancel()
            except Exception:  # closing anyway
                logger.debug("reliable_events: cancel failed", exc_info=True)
        if conn is not None:
            _quiet_release(conn)

    def make_scheduler(self) -> RetryScheduler:
        return OutboxRetryScheduler()


class _FetchedUndecodable(Exception):
    """Ends ``drain_events`` at once when an undecodable message was fetched (it waits
    in the buffer as a poison delivery)."""


def undecodable_delivery(
    consumer: str,
    exc: BaseException,
    raw: Any,
    *,
    tag: Any = None,
    routing_key: str = "",
    message: Any = None,
) -> Delivery:
    """A delivery the transport could not read: dead-lettered as ``undecodable``, with
    the message id of ``message`` (the transport's message object) when it has one."""
    body = raw if isinstance(raw, bytes) else str(raw or "").encode("utf-8", "backslashreplace")
    message_id = getattr(message, "properties", None)
    message_id = message_id.get("message_id") if isinstance(message_id, dict) else None
    logger.warning(
        "reliable_events: %s received a message its transport could not decode (%s); "
        "it will be dead-lettered",
        consumer,
        error_summary(exc),
    )
    return Delivery(
        consumer=consumer,
        body=body,
        properties={"message_id": message_id} if isinstance(message_id, str) else {},
        headers={},
        routing_key=routing_key,
        tag=tag,
        undecodable=f"the transport could not decode the message ({len(body)} bytes): "
        + error_summary(exc),
    )


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


def open_transport(
    url: str, consumers: Sequence[type[EventConsumer]], *, prefetch: int | None = None
) -> Transport:
    count = max(1, int(app_settings.PREFETCH_COUNT if prefetch is None else prefetch))
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


def _quiet_release(conn: Any) -> None:
    try:
        conn.release()
    except Exception:  # closing a broken connection may fail in many ways
        logger.debug("reliable_events: error while closing a consumer connection", exc_info=True)
