"""What do publishers and consuming transports have in common? Messages out and in,
publish results, the ``Publisher`` and ``Transport`` interfaces."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from reliable_events.exceptions import BrokerError
from reliable_events.runner import StopFlag
from reliable_events.sanitize import error_summary
from reliable_events.topology import Topology

if TYPE_CHECKING:  # for annotations only: the retry schedulers publish through the broker
    from reliable_events.consumer.retries import RetryScheduler

logger = logging.getLogger(__name__)

#: Why a message sent straight to a queue failed when that queue does not exist.
UNROUTABLE_QUEUE = "the broker returned the message: no such queue (basic.return)"
CONTENT_TYPE = "application/json"
CONTENT_ENCODING = "utf-8"
PERSISTENT = 2
#: Header carrying the event's ordering key.
KEY_HEADER = "x-event-key"
#: Seconds the loop blocks waiting for a delivery before it looks at its stop flag.
POLL_SECONDS = 1.0
#: Socket timeout for reading what already arrived (batching), seconds.
_NO_WAIT = 0.0005


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
    #: ``application/cloudevents+json`` for a structured CloudEvent (``cloudevents.py``).
    content_type: str = CONTENT_TYPE


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


class PublisherWrapper(Publisher):
    """A publisher around another (``inner``): a subclass changes :meth:`publish`; the
    rest (connecting, flushing, declaring, closing, ``connected`` and any other
    attribute) is ``inner``'s."""

    def __init__(self, inner: Publisher) -> None:
        self.inner = inner
        self.url = inner.url

    def connect(self) -> None:
        self.inner.connect()

    def publish(
        self, messages: Sequence[OutgoingMessage], *, timeout: float, wait: bool = True
    ) -> PublishResult:
        return self.inner.publish(messages, timeout=timeout, wait=wait)

    def flush(self, *, timeout: float) -> PublishResult:
        return self.inner.flush(timeout=timeout)

    def declare(self, topology: Topology) -> None:
        self.inner.declare(topology)

    def close(self) -> None:
        self.inner.close()

    @property
    def connected(self) -> bool:
        return self.inner.connected

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


# -- consuming ---------------------------------------------------------------------------
@dataclass
class Delivery:
    """One message as received, before it is trusted."""

    consumer: str
    body: bytes
    properties: dict[str, Any]
    headers: dict[str, Any]
    exchange: str = ""
    routing_key: str = ""
    redelivered: bool = False
    #: The transport's handle for ack/reject (a delivery tag, a kombu message).
    tag: Any = None
    #: Set when the transport could not read the message itself (why, for the dead
    #: letter); ``body`` then holds what bytes could be recovered.
    undecodable: str = ""

    @property
    def message_id(self) -> str:
        value = self.properties.get("message_id")
        return value if isinstance(value, str) else ""


class Transport:
    """A consuming broker connection: deliveries in, acks and rejects out."""

    url: str
    #: Exceptions that mean "the connection is gone: reconnect".
    connection_errors: tuple[type[BaseException], ...] = (OSError,)
    #: On ``memory://`` nothing outside this process can deliver retries: relay them here.
    relays_itself = False
    #: Consumers batch at ``CONSUMER_BATCH_SIZE`` unless they set ``batch_size``; when
    #: ``False`` (the database transport) only a consumer's own ``batch_size`` batches.
    batches_by_default = True

    def connect(self) -> None:
        raise NotImplementedError

    @property
    def connected(self) -> bool:
        raise NotImplementedError

    def get(self, timeout: float) -> Delivery | None:
        """The next delivery, waiting at most ``timeout`` seconds."""
        raise NotImplementedError

    def take_more(self, consumer: str, limit: int, *, linger: float = 0.0) -> list[Delivery]:
        """Up to ``limit`` more deliveries of ``consumer`` (stops at a delivery of another
        consumer): those that have already arrived, and, for at most ``linger`` seconds,
        those that arrive meanwhile (the batch's linger: ``CONSUMER_BATCH_LINGER``)."""
        taken: list[Delivery] = []
        buffer = self._buffer
        deadline: float | None = None
        while len(taken) < limit:
            if not buffer:
                self._poll()
            if not buffer:
                if linger <= 0:
                    break
                now = time.monotonic()
                if deadline is None:
                    deadline = now + linger
                if now >= deadline or not self._wait(deadline - now):
                    break
                continue
            if buffer[0].consumer != consumer:
                break
            taken.append(buffer.popleft())
        return taken

    def _poll(self) -> None:
        """Read whatever the broker has already sent, without waiting."""

    def _wait(self, seconds: float) -> bool:
        """Wait at most ``seconds`` for the next delivery; ``False`` when none can come
        (e.g. the prefetch window is full)."""
        return False

    def flush_acks(self) -> None:
        """Send the acks held back to be sent together (the end of a batch)."""

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

    def make_scheduler(self) -> RetryScheduler | None:
        """The transport's own way to retry (the database transport: a row due later);
        ``None``: the worker picks one
        (:func:`reliable_events.consumer.retries.retry_scheduler`)."""
        return None

    def check_topology(self) -> None:
        """Verify (and repair) the broker topology when ``TOPOLOGY_CHECK_SECONDS`` passed."""

    def recreated_queues(self) -> dict[str, tuple[datetime, bool]]:
        """Queues the topology check found missing and declared again: name -> (when, on
        this worker's first check)."""
        return {}

    def abandon(self, delivery: Delivery) -> bool:
        """The database failed while ``delivery`` was processed: whether the transport gave
        it back itself (the database transport rolls its claim back)."""
        return False

    def retry_later(self, delivery: Delivery, delay: float, headers: dict[str, Any]) -> bool:
        """An ordered consumer's in-place retry: whether the transport put ``delivery``
        back at its place with ``headers``, due after ``delay`` seconds, and settled it
        (the database transport: waiting would hold its claim's transaction, and on
        SQLite the one write lock); ``False``: the worker keeps it unacked and waits."""
        return False


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


def quiet_release(conn: Any, what: str = "broker") -> None:
    """Release ``conn`` (a kombu connection); a failure is logged at debug level only."""
    try:
        conn.release()
    except Exception:  # closing a broken connection may fail in many ways
        logger.debug("reliable_events: error while closing a %s connection", what, exc_info=True)
