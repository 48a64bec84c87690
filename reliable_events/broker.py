"""Broker connections and confirmed publishing.

Two publishers share one interface (:class:`Publisher`):

* :class:`AmqpPublisher` (``amqp://``, ``amqps://``, ``pyamqp://``): py-amqp with
  publisher confirms kept in a *sliding window* - up to ``CONFIRM_WINDOW`` messages
  are outstanding at once and ``basic.ack``/``basic.nack`` frames (single or
  ``multiple``) are matched to their publish by delivery tag.  Only what the broker
  acked is reported confirmed; a nack, a timeout or a lost connection reports the
  message failed.  This is what production uses.
* :class:`KombuPublisher` (``memory://``, ``filesystem://``, ...): the embedded,
  server-less transports.  Their ``publish`` stores the message before it returns,
  which is the only confirmation they have.  Unroutable messages go to the
  ``<EXCHANGE>.unrouted`` queue there too (the publisher routes them itself).

Every message is persistent (``delivery_mode=2``), JSON (``application/json``,
UTF-8), and carries its ``message_id``, a timestamp and its topic as the AMQP
``type`` property.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from amqp import spec as _amqp_spec
from django.utils.module_loading import import_string

from reliable_events.conf import app_settings
from reliable_events.exceptions import BrokerError, ConfigurationError, ConfirmTimeout
from reliable_events.topology import (
    Topology,
    declare_on_amqp_channel,
    declare_on_kombu_channel,
    events_topology,
    unrouted_name,
)

logger = logging.getLogger(__name__)

AMQP_SCHEMES = frozenset({"amqp", "amqps", "pyamqp"})
#: This package's own transports by URL scheme: (publisher, consumer transport) classes
#: by dotted path, imported when used (as kombu does with its transport aliases).
OWN_TRANSPORTS: dict[str, tuple[str, str]] = {
    "db": (
        "reliable_events.database_transport.DatabasePublisher",
        "reliable_events.database_transport.DatabaseTransport",
    ),
}
#: Why a message sent straight to a queue failed when that queue does not exist.
UNROUTABLE_QUEUE = "the broker returned the message: no such queue (basic.return)"
CONTENT_TYPE = "application/json"
CONTENT_ENCODING = "utf-8"
PERSISTENT = 2
#: Header carrying the event's ordering key.
KEY_HEADER = "x-event-key"


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """One message to publish; ``ref`` is the caller's handle (an outbox id)."""

    ref: Hashable
    exchange: str
    routing_key: str
    body: bytes
    message_id: str
    topic: str
    headers: dict[str, Any] = field(default_factory=dict)
    #: When the event was stored: a datetime or whole seconds since the epoch.
    timestamp: datetime | int | None = None


@dataclass
class PublishResult:
    """What the broker confirmed, what failed, and what a broker failure interrupted.

    ``failed``: the broker refused *these* messages (``basic.nack``, ``basic.return`` of
    a mandatory message, an error writing this one message): each counts as an attempt.
    ``interrupted``: not settled because the broker as a whole failed (connection refused
    or lost, blocked, confirm timeout); the messages are not to blame and are sent again
    once the broker answers, without counting an attempt.
    """

    confirmed: list[Hashable] = field(default_factory=list)
    failed: dict[Hashable, str] = field(default_factory=dict)
    interrupted: dict[Hashable, str] = field(default_factory=dict)
    #: Why the broker failed as a whole (empty when it did not: messages can also be
    #: interrupted because another message of the batch could not be written).
    broker_error: str = ""

    def fail(self, refs: Sequence[Hashable], reason: str) -> None:
        for ref in refs:
            self.failed.setdefault(ref, reason)

    def interrupt(self, refs: Sequence[Hashable], reason: str, *, broker: bool = True) -> None:
        """Report ``refs`` interrupted; ``broker``: by a failure of the broker itself."""
        for ref in refs:
            if ref not in self.failed:
                self.interrupted.setdefault(ref, reason)
        if broker and refs and not self.broker_error:
            self.broker_error = reason


def is_connection_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is the connection failing (socket error, closed connection) rather
    than one message being unwritable (an encoding error: a header py-amqp cannot
    encode, an integer too large for AMQP, ...)."""
    from amqp.exceptions import RecoverableConnectionError
    from kombu.exceptions import OperationalError

    return isinstance(exc, OSError | RecoverableConnectionError | OperationalError)


def is_broker_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is the broker (or the way to it) failing as a whole.

    Socket errors, refused or lost connections, a connection closed by the broker
    (``connection.close``, e.g. on shutdown), a confirm timeout (also what a blocked
    connection leads to) and connect errors are; a channel error (the broker refused
    something on the channel), an encoding error of one message and the like are not.
    """
    from amqp.exceptions import ConnectionError as AmqpConnectionError
    from kombu.exceptions import OperationalError

    return isinstance(exc, OSError | AmqpConnectionError | OperationalError | BrokerError)


def is_amqp_url(url: str) -> bool:
    return urlsplit(url).scheme.lower() in AMQP_SCHEMES


def own_transport(url: str) -> tuple[str, str] | None:
    """The (publisher, transport) class paths of one of this package's transports."""
    return OWN_TRANSPORTS.get(urlsplit(url).scheme.lower())


def redact(text: str, url: str | None = None) -> str:
    """``text`` with the password of ``url`` (default: the configured broker) masked."""
    url = url if url is not None else str(app_settings.BROKER_URL)
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    if password:
        text = text.replace(password, "***")
    return text


def describe_error(exc: BaseException, url: str | None = None) -> str:
    return redact(f"{type(exc).__name__}: {exc}", url)[:2000]


def safe_url(url: str) -> str:
    """``url`` without its password, for logs and errors."""
    from kombu.utils.url import maybe_sanitize_url

    if own_transport(url) is not None:
        return url  # db://[alias] carries no credentials (kombu would print "db:///")

    return str(maybe_sanitize_url(url))


class Publisher:
    """A broker connection that publishes batches and reports what was confirmed."""

    url: str

    def connect(self) -> None:
        """Connect now if not connected (raises :class:`BrokerError` when it cannot)."""

    def publish(
        self, messages: Sequence[OutgoingMessage], *, timeout: float, wait: bool = True
    ) -> PublishResult:
        """Publish ``messages`` in order and report what the broker settled.

        ``wait=True``: return once every message is confirmed or failed (within
        ``timeout`` seconds overall).  ``wait=False`` (pipelining): return as soon as
        every message is written, reporting whatever has been settled so far, which may
        include messages of earlier calls; the rest is reported by later calls or by
        :meth:`flush`.
        """
        raise NotImplementedError

    def flush(self, *, timeout: float) -> PublishResult:
        """Wait for every outstanding confirm; report what settled since the last call."""
        return PublishResult()

    def declare(self, topology: Topology) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    @property
    def connected(self) -> bool:
        raise NotImplementedError


class AmqpPublisher(Publisher):
    """py-amqp publisher with a sliding window of outstanding confirms."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float | None = None,
        window: int | None = None,
        declare_events_topology: bool = True,
    ) -> None:
        self.url = url
        self.connect_timeout = (
            float(app_settings.CONNECT_TIMEOUT) if connect_timeout is None else connect_timeout
        )
        self.window = max(1, int(app_settings.CONFIRM_WINDOW if window is None else window))
        self._declare_events = declare_events_topology
        self._kombu: Any = None
        self._channel: Any = None
        self._seq = 0
        self._inflight: dict[int, Hashable] = {}
        # Messages sent straight to a queue go out ``mandatory``: seq -> message id, and
        # the ids the broker returned (no such queue), matched when their ack arrives.
        self._mandatory: dict[int, str] = {}
        self._returned: set[str] = set()
        self._result: PublishResult | None = None
        self._pid = os.getpid()
        self.last_used = 0.0

    # -- connection ----------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._channel is not None and self._pid == os.getpid()

    def connect(self) -> None:
        if self.connected:
            return
        self._reset()
        from kombu import Connection

        conn = Connection(
            self.url,
            connect_timeout=self.connect_timeout,
            heartbeat=0,
            transport_options=dict(app_settings.BROKER_TRANSPORT_OPTIONS),
        )
        try:
            # One attempt (kombu's connect() retries after sleeping 2 s), and every
            # blocking socket operation bounded: channel open, declares, writes and the
            # close handshake.  A broker that stops answering cannot hang the caller.
            # (Confirm waits pass their own timeout to drain_events.)
            conn.ensure_connection(max_retries=0, reraise_as_library_errors=False)
            raw = conn.connection
            raw.transport.sock.settimeout(self.connect_timeout)
            channel = raw.channel()
            channel.confirm_select()
            channel.events["basic_ack"].add(self._on_ack)
            channel.events["basic_nack"].add(self._on_nack)
            channel.events["basic_return"].add(self._on_return)
        except Exception as exc:
            _quiet_close(conn)
            raise BrokerError(
                f"cannot connect to broker {safe_url(self.url)}: {describe_error(exc, self.url)}"
            ) from exc
        self._kombu, self._channel, self._seq, self._pid = conn, channel, 0, os.getpid()
        if self._declare_events:
            self.declare(events_topology())

    def declare(self, topology: Topology) -> None:
        self.connect()
        try:
            declare_on_amqp_channel(self._channel, topology)
        except Exception as exc:
            self.close()
            error = describe_error(exc, self.url)
            if "PRECONDITION_FAILED" in error or "inequivalent" in error:
                raise ConfigurationError(
                    f"the broker already has this topology with other arguments: {error}. "
                    "Delete the old exchange/queue or change EXCHANGE/QUEUE_TYPE."
                ) from exc
            raise BrokerError(f"declaring topology failed: {error}") from exc

    def _reset(self) -> None:
        self._kombu = self._channel = None
        self._inflight = {}
        self._mandatory = {}
        self._returned = set()
        self._seq = 0

    def close(self) -> None:
        conn = self._kombu
        stale = self._pid != os.getpid()
        self._reset()
        if conn is not None and not stale:
            _quiet_close(conn)

    # -- confirms ------------------------------------------------------------------
    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        self._settle(delivery_tag, multiple, None)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        self._settle(delivery_tag, multiple, "broker nacked the message (basic.nack)")

    def _on_return(self, exc: Any, exchange: str, routing_key: str, message: Any) -> None:
        """A ``mandatory`` message no queue took; RabbitMQ sends this before its ack."""
        message_id = getattr(message, "properties", {}).get("message_id")
        if message_id is not None:
            self._returned.add(str(message_id))

    def _settle(self, tag: int, multiple: bool, error: str | None) -> None:
        inflight = self._inflight
        if multiple:
            tags = []
            for seq in inflight:  # insertion order is publish order: ascending tags
                if seq > tag:
                    break
                tags.append(seq)
        else:
            tags = [tag] if tag in inflight else []
        result = self._result
        if result is None:  # a late confirm of an abandoned batch
            for seq in tags:
                del inflight[seq]
                self._mandatory.pop(seq, None)
            return
        if self._mandatory:
            for seq in tags:
                message_id = self._mandatory.pop(seq, None)
                if message_id is not None and message_id in self._returned:
                    self._returned.discard(message_id)
                    result.failed[inflight.pop(seq)] = UNROUTABLE_QUEUE
        if error is None:
            result.confirmed.extend([inflight.pop(seq) for seq in tags if seq in inflight])
        else:
            for seq in tags:
                if seq in inflight:
                    result.failed[inflight.pop(seq)] = error

    def _wait_for_confirms(self, deadline: float, below: int) -> None:
        """Read broker frames until fewer than ``below`` confirms are outstanding."""
        raw = self._kombu.connection
        while len(self._inflight) >= below:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConfirmTimeout("the broker did not confirm in time")
            try:
                raw.drain_events(timeout=remaining)
            except TimeoutError as exc:
                raise ConfirmTimeout("the broker did not confirm in time") from exc

    # -- publishing ----------------------------------------------------------------
    def publish(
        self, messages: Sequence[OutgoingMessage], *, timeout: float, wait: bool = True
    ) -> PublishResult:
        """Publish ``messages`` in order; report each as confirmed or failed.

        Never raises for broker trouble: a message is either in ``confirmed`` (the broker
        acked it) or in ``failed`` with the reason.  The connection is dropped after a
        timeout or error so that the next call starts clean (and every message still
        outstanding, of this call or an earlier ``wait=False`` call, is reported failed).

        With ``wait=False`` the call returns once every message is written (the window
        permitting) with what has been settled so far; ``timeout`` then bounds each wait
        for room in the window.  See :meth:`Publisher.publish`.
        """
        if not messages:
            return self.flush(timeout=timeout) if wait else self._take()
        if self._result is None:
            self._result = PublishResult()
        try:
            self.connect()
        except BrokerError as exc:
            self._result.interrupt([m.ref for m in messages], str(exc))
            return self._take()
        deadline = time.monotonic() + timeout
        inflight = self._inflight
        window = self.window
        # Once the window is full, read confirms until a quarter of it is free again, so
        # that messages go out in bursts (fewer, larger writes) rather than one per ack.
        low_water = window - max(1, window // _REFILL_FRACTION) + 1
        # basic.publish without Channel.basic_publish's per-message extras (a
        # zero-timeout read for connection.blocked, a timeout context): frames from the
        # broker are read whenever the window is full, which is often enough.
        send_method = self._channel.send_method
        static = _STATIC_PROPERTIES
        sent = 0
        writes = _CoalescedWrites(self._kombu.connection.transport)
        writing: Hashable | None = None  # the message being encoded and written
        try:
            for message in messages:
                if len(inflight) >= window:
                    writes.flush(resume=False)  # the socket is ours again while reading
                    if not wait:
                        deadline = time.monotonic() + timeout
                    self._wait_for_confirms(deadline, low_water)
                    writes.resume()
                props = {
                    **static,
                    "message_id": message.message_id,
                    "type": message.topic,
                }
                stamp = message.timestamp
                if stamp is not None:
                    props["timestamp"] = stamp if isinstance(stamp, int) else int(stamp.timestamp())
                if message.headers:
                    props["application_headers"] = message.headers
                self._seq += 1
                inflight[self._seq] = message.ref
                # Straight to a queue (a retry for one consumer): mandatory, so that a
                # missing queue comes back as basic.return instead of a silent drop.
                direct = not message.exchange
                if direct:
                    self._mandatory[self._seq] = message.message_id
                writing = message.ref
                send_method(
                    _BASIC_PUBLISH,
                    "Bssbb",
                    (0, message.exchange, message.routing_key, direct, False),
                    _Message(message.body, props),
                )
                writing = None
                sent += 1
                if writes.full:
                    writes.flush()
            writes.flush(resume=False)
            if wait:
                self._wait_for_confirms(deadline, 1)
        except Exception as exc:
            writes.stop()
            self._fail_outstanding(exc, [m.ref for m in messages[sent:]], culprit=writing)
        finally:
            self.last_used = time.monotonic()
        return self._take()

    def flush(self, *, timeout: float) -> PublishResult:
        """Wait until nothing is outstanding; report what settled since the last call."""
        if self._inflight:
            if self._result is None:
                self._result = PublishResult()
            try:
                self._wait_for_confirms(time.monotonic() + timeout, 1)
            except Exception as exc:
                self._fail_outstanding(exc, [])
            finally:
                self.last_used = time.monotonic()
        return self._take()

    def _fail_outstanding(
        self, exc: Exception, unsent: list[Hashable], *, culprit: Hashable | None = None
    ) -> None:
        """Settle every outstanding and unsent message after ``exc``; drop the connection.

        A broker failure interrupts them all (no message is to blame).  An error writing
        one message (``culprit``) fails that message alone.  Any other error (the broker
        closed the channel over something it refused) fails the outstanding messages:
        which one it was is unknown.  Unsent messages are always only interrupted.
        """
        result = self._result
        assert result is not None
        reason = str(exc) if isinstance(exc, ConfirmTimeout) else describe_error(exc, self.url)
        outstanding = list(self._inflight.values())
        if culprit is not None and not is_connection_failure(exc):
            # Writing this one message failed (it cannot be encoded): its own failure.
            result.fail([culprit], reason)
            others = f"not sent: another message of the batch failed ({reason})"
            result.interrupt(outstanding, others, broker=False)
            result.interrupt(unsent, others, broker=False)
        else:
            if is_broker_failure(exc):
                result.interrupt(outstanding, reason)
            else:
                result.fail(outstanding, reason)
            result.interrupt(unsent, f"not sent: {reason}")
        logger.warning("reliable_events: publish failed: %s", reason)
        self.close()

    def _take(self) -> PublishResult:
        """The settled outcomes so far; later confirms go to a fresh result."""
        result = self._result or PublishResult()
        self._result = PublishResult() if self._inflight else None
        return result


class _CoalescedWrites:
    """Collects py-amqp's socket writes and sends them in chunks of ``limit`` bytes.

    py-amqp writes each message with its own ``sendall`` (one TCP segment each, as
    ``TCP_NODELAY`` is set).  Sending ~64 KiB at a time costs far fewer system calls here
    and far less CPU in RabbitMQ, which reads the frames in bulk.  The buffer is always
    flushed before the publisher waits for confirms, so the window logic is unchanged: a
    message counts as outstanding from the moment it is buffered, and if a flush fails
    every outstanding message is reported failed.  While paused (reading confirms)
    writes go straight to the socket.  (It relies on py-amqp's transports writing
    through ``_write``; without that attribute it does nothing.)
    """

    limit = 64 * 1024

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self._enabled = callable(getattr(transport, "_write", None))
        # TCPTransport sets ``_write = sock.sendall`` on the instance; SSLTransport has a method.
        self._own = self._enabled and "_write" in getattr(transport, "__dict__", {})
        self._send: Any = getattr(transport, "_write", None)
        self._buffer = bytearray()
        self.resume()

    @property
    def full(self) -> bool:
        return len(self._buffer) >= self.limit

    def resume(self) -> None:
        """Buffer the writes."""
        if self._enabled:
            self._transport._write = self._buffer.extend

    def pause(self) -> None:
        """Write straight to the socket."""
        if not self._enabled:
            return
        if self._own:
            self._transport._write = self._send
        else:
            vars(self._transport).pop("_write", None)

    def flush(self, *, resume: bool = True) -> None:
        """Send the buffer; keep buffering afterwards unless ``resume`` is false."""
        if not resume:
            self.pause()
        if self._buffer:
            self._send(self._buffer)
            self._buffer.clear()

    def stop(self) -> None:
        """Write straight to the socket again, dropping what is buffered."""
        self.pause()
        self._buffer.clear()


def _make_message_class() -> Any:
    from amqp import Message

    class FastMessage(Message):
        """``amqp.Message`` taking its property dict as is (no ``**kwargs`` copy)."""

        __slots__ = ()

        def __init__(self, body: bytes, properties: dict[str, Any]) -> None:
            super().__init__(body)
            self.properties = properties

    return FastMessage


#: Once the confirm window is full, wait until 1/_REFILL_FRACTION of it is free.
_REFILL_FRACTION = 4
#: Properties every event carries.
_STATIC_PROPERTIES: dict[str, Any] = {
    "content_type": CONTENT_TYPE,
    "content_encoding": CONTENT_ENCODING,
    "delivery_mode": PERSISTENT,
}
_Message: Any = _make_message_class()
_BASIC_PUBLISH: Any = _amqp_spec.Basic.Publish


class KombuPublisher(Publisher):
    """Publisher over kombu's server-less transports (embedded default and tests)."""

    def __init__(self, url: str, *, connect_timeout: float | None = None) -> None:
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
                _quiet_close(conn)
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
            _quiet_close(conn)

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
                    content_type=CONTENT_TYPE,
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
    from reliable_events.topology import full_topology

    try:
        from reliable_events.consumer import registry
    except ImportError:  # pragma: no cover - the consumer module is always present
        return events_topology()
    return full_topology(registry.queue_specs())


def open_publisher(
    url: str | None = None,
    *,
    connect_timeout: float | None = None,
    window: int | None = None,
) -> Publisher:
    """A publisher for ``url`` (default: the configured ``BROKER_URL``); not yet connected."""
    url = str(url or app_settings.BROKER_URL)
    if is_amqp_url(url):
        return AmqpPublisher(url, connect_timeout=connect_timeout, window=window)
    own = own_transport(url)
    if own is not None:
        publisher: Publisher = import_string(own[0])(
            url, connect_timeout=connect_timeout, window=window
        )
        return publisher
    return KombuPublisher(url, connect_timeout=connect_timeout)


def _quiet_close(conn: Any) -> None:
    try:
        conn.release()
    except Exception:  # closing a broken connection may fail in many ways
        logger.debug("reliable_events: error while closing a broker connection", exc_info=True)
