"""RabbitMQ over py-amqp, both directions: the confirmed publisher (sliding window of
confirms) and the consuming transport (``basic.qos`` prefetch, manual acks)."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Hashable, Sequence
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, Any

from reliable_events.broker.base import (
    _NO_WAIT,
    CONTENT_TYPE,
    POLL_SECONDS,
    UNROUTABLE_QUEUE,
    Delivery,
    OutgoingMessage,
    Publisher,
    PublishResult,
    Transport,
    is_broker_failure,
    is_connection_failure,
    quiet_release,
    undecodable_delivery,
)
from reliable_events.broker.writes import (
    BASIC_PUBLISH,
    REFILL_FRACTION,
    STATIC_PROPERTIES,
    CoalescedWrites,
    FastMessage,
)
from reliable_events.broker_nodes import BrokerNodes
from reliable_events.broker_url import safe_url
from reliable_events.conf import app_settings
from reliable_events.consumer import EventConsumer
from reliable_events.consumer.partitions import partition_queues
from reliable_events.exceptions import BrokerError, ConfigurationError, ConfirmTimeout
from reliable_events.runner import StopFlag
from reliable_events.sanitize import describe_error
from reliable_events.topology import (
    Topology,
    declare_on_amqp_channel,
    events_topology,
)
from reliable_events.topology_check import TopologyCheck

if TYPE_CHECKING:
    from reliable_events.consumer.membership import PartitionShare

logger = logging.getLogger(__name__)


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
        self.nodes = BrokerNodes(url)
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
        try:
            conn, channel = self.nodes.connect(self._open_node, role="publisher")
        except Exception as exc:
            raise BrokerError(
                f"cannot connect to broker {safe_url(self.url)}: {describe_error(exc, self.url)}"
            ) from exc
        self._kombu, self._channel, self._seq, self._pid = conn, channel, 0, os.getpid()
        if self._declare_events:
            self.declare(events_topology())

    def _open_node(self, url: str) -> tuple[Any, Any]:
        """A kombu connection to one node and its confirming channel."""
        from kombu import Connection

        conn = Connection(
            url,
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
        except Exception:
            quiet_release(conn)
            raise
        return conn, channel

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
            quiet_release(conn)

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
        low_water = window - max(1, window // REFILL_FRACTION) + 1
        # basic.publish without Channel.basic_publish's per-message extras (a
        # zero-timeout read for connection.blocked, a timeout context): frames from the
        # broker are read whenever the window is full, which is often enough.
        send_method = self._channel.send_method
        static = STATIC_PROPERTIES
        sent = 0
        writes = CoalescedWrites(self._kombu.connection.transport)
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
                if message.content_type is not CONTENT_TYPE:
                    props["content_type"] = message.content_type
                self._seq += 1
                inflight[self._seq] = message.ref
                # Straight to a queue (a retry for one consumer): mandatory, so that a
                # missing queue comes back as basic.return instead of a silent drop.
                direct = not message.exchange
                if direct:
                    self._mandatory[self._seq] = message.message_id
                writing = message.ref
                send_method(
                    BASIC_PUBLISH,
                    "Bssbb",
                    (0, message.exchange, message.routing_key, direct, False),
                    FastMessage(message.body, props),
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


# -- consuming ---------------------------------------------------------------------------
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
        self.nodes = BrokerNodes(url)
        self.consumer_classes = list(consumers)
        self.prefetch = prefetch
        self.heartbeat = heartbeat
        self.connect_timeout = connect_timeout
        self.connection_errors = _amqp_errors()
        self._kombu: Any = None
        self._raw: Any = None
        self._channel: Any = None
        self._buffer: deque[Delivery] = deque()
        # Acks are coalesced: settled tags wait here until the end of the batch (the
        # worker's ``flush_acks``), or half the prefetch window is used, then go out as
        # one ``multiple`` ack when no earlier delivery is still unsettled (else one by
        # one).
        self._settled: list[int] = []
        self._unsettled: set[int] = set()
        self.ack_every = max(1, prefetch // 2)
        self.topology_check = TopologyCheck(self.consumer_classes)
        #: The channel whose deliveries count (not one being closed).
        self._live: Any = None
        #: Which partitions of ordered consumers to take (set by the worker).
        self.partition_share: PartitionShare | None = None

    @property
    def connected(self) -> bool:
        return self._channel is not None

    def connect(self) -> None:
        if self.connected:
            return
        conn, raw, channel = self.nodes.connect(self._open_node, role="consumer")
        self._kombu, self._raw, self._channel = conn, raw, channel
        logger.info(
            "reliable_events: consuming %s from %s (prefetch %d)",
            ", ".join(cls.name for cls in self.consumer_classes),
            safe_url(str(self.nodes.current)),
            self.prefetch,
        )

    def _open_node(self, url: str) -> tuple[Any, Any, Any]:
        """A connection to one node, its topology checked, and the consuming channel."""
        import amqp
        from kombu import Connection

        conn = Connection(
            url,
            connect_timeout=self.connect_timeout,
            heartbeat=self.heartbeat,
            transport_options=dict(app_settings.BROKER_TRANSPORT_OPTIONS),
        )
        try:
            conn.ensure_connection(max_retries=0, reraise_as_library_errors=False)
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
            self._live = channel
            channel.basic_qos(0, self.prefetch, False)
            for cls in self.consumer_classes:
                self._consume(channel, cls.name, self.consumed_queues(cls))
        except BaseException:
            self._live = None
            quiet_release(conn, "consumer")
            self._buffer.clear()
            self._unsettled.clear()
            raise
        return conn, raw, channel

    def _consume(self, channel: Any, consumer: str, queues: list[str]) -> None:
        for queue in queues:
            callback = partial(self._on_message, consumer, channel)
            # Registered before the consume: py-amqp rejects (requeues) a delivery whose
            # consumer tag it does not know yet, which would reorder the queue.
            channel.callbacks[queue] = callback
            channel.basic_consume(queue, consumer_tag=queue, no_ack=False, callback=callback)

    def consumed_queues(self, cls: type[EventConsumer]) -> list[str]:
        """The queues this worker subscribes to for ``cls``: its queue, or an ordered
        consumer's partitions this process takes (``partition_share``; all without)."""
        if not cls.ordered:
            return [cls.queue_name()]
        if self.partition_share is None:
            return partition_queues(cls)
        return self.partition_share.queues(cls)

    def _on_message(self, consumer: str, channel: Any, message: Any) -> None:
        if channel is not self._live:
            # A frame read while an old connection closes (close() drains it): its tag
            # means nothing on the next channel, and the broker requeues it anyway.
            return
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

    def _wait(self, seconds: float) -> bool:
        if not self._window_open():
            return False
        with contextlib.suppress(TimeoutError):
            self._raw.drain_events(timeout=seconds)
        return True

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
        self._live = None
        self._buffer.clear()
        self._settled.clear()
        self._unsettled.clear()
        if conn is not None:
            quiet_release(conn, "consumer")
        self._buffer.clear()  # nothing the closing connection delivered is kept
        self._settled.clear()
        self._unsettled.clear()

    def check_topology(self) -> None:
        if self._raw is not None and self.topology_check.due():
            self.topology_check.run(self._raw)

    def recreated_queues(self) -> dict[str, tuple[datetime, bool]]:
        return self.topology_check.recreated
