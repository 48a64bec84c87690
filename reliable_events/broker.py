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
  ``<EXCHANGE>.unrouted`` queue there too (kombu's ``deadletter_queue``).

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
    timestamp: datetime | None = None


@dataclass
class PublishResult:
    """What the broker confirmed, and why the rest failed."""

    confirmed: list[Hashable] = field(default_factory=list)
    failed: dict[Hashable, str] = field(default_factory=dict)

    def fail(self, refs: Sequence[Hashable], reason: str) -> None:
        for ref in refs:
            self.failed.setdefault(ref, reason)


def is_amqp_url(url: str) -> bool:
    return urlsplit(url).scheme.lower() in AMQP_SCHEMES


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

    return str(maybe_sanitize_url(url))


class Publisher:
    """A broker connection that publishes batches and reports what was confirmed."""

    url: str

    def publish(self, messages: Sequence[OutgoingMessage], *, timeout: float) -> PublishResult:
        raise NotImplementedError

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
            conn.connect()
            raw = conn.connection
            channel = raw.channel()
            channel.confirm_select()
            channel.events["basic_ack"].add(self._on_ack)
            channel.events["basic_nack"].add(self._on_nack)
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

    def _settle(self, tag: int, multiple: bool, error: str | None) -> None:
        result = self._result
        if multiple:
            tags = [seq for seq in self._inflight if seq <= tag]
        else:
            tags = [tag] if tag in self._inflight else []
        for seq in tags:
            ref = self._inflight.pop(seq)
            if result is None:  # a late confirm of an abandoned batch
                continue
            if error is None:
                result.confirmed.append(ref)
            else:
                result.failed[ref] = error

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
    def publish(self, messages: Sequence[OutgoingMessage], *, timeout: float) -> PublishResult:
        """Publish ``messages`` in order; report each as confirmed or failed.

        Never raises for broker trouble: a message is either in ``confirmed`` (the broker
        acked it) or in ``failed`` with the reason.  The connection is dropped after a
        timeout or error so that the next call starts clean.
        """
        result = PublishResult()
        if not messages:
            return result
        try:
            self.connect()
        except BrokerError as exc:
            result.fail([m.ref for m in messages], str(exc))
            return result
        from amqp import Message

        self._result = result
        deadline = time.monotonic() + timeout
        sent = 0
        try:
            for message in messages:
                if len(self._inflight) >= self.window:
                    self._wait_for_confirms(deadline, self.window)
                props: dict[str, Any] = {
                    "content_type": CONTENT_TYPE,
                    "content_encoding": CONTENT_ENCODING,
                    "delivery_mode": PERSISTENT,
                    "message_id": message.message_id,
                    "type": message.topic,
                }
                if message.timestamp is not None:
                    props["timestamp"] = int(message.timestamp.timestamp())
                if message.headers:
                    props["application_headers"] = message.headers
                self._seq += 1
                self._inflight[self._seq] = message.ref
                self._channel.basic_publish(
                    Message(message.body, **props),
                    exchange=message.exchange,
                    routing_key=message.routing_key,
                )
                sent += 1
            self._wait_for_confirms(deadline, 1)
        except Exception as exc:
            reason = str(exc) if isinstance(exc, ConfirmTimeout) else describe_error(exc, self.url)
            result.fail(list(self._inflight.values()), reason)
            result.fail([m.ref for m in messages[sent:]], f"not sent: {reason}")
            logger.warning("reliable_events: publish failed: %s", reason)
            self.close()
        finally:
            self._result = None
            self.last_used = time.monotonic()
        return result


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
        conn = Connection(self.url, transport_options=options)
        try:
            channel = conn.default_channel
            self._producer = Producer(channel, serializer=None, auto_declare=False)
        except Exception as exc:
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

    def publish(self, messages: Sequence[OutgoingMessage], *, timeout: float) -> PublishResult:
        result = PublishResult()
        if not messages:
            return result
        try:
            self.connect()
        except BrokerError as exc:
            result.fail([m.ref for m in messages], str(exc))
            return result
        for index, message in enumerate(messages):
            properties: dict[str, Any] = {"message_id": message.message_id, "type": message.topic}
            if message.timestamp is not None:
                properties["timestamp"] = message.timestamp.timestamp()
            try:
                self._producer.publish(
                    message.body,
                    exchange=message.exchange,
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
                result.fail([m.ref for m in messages[index:]], reason)
                self.close()
                break
            result.confirmed.append(message.ref)
        self.last_used = time.monotonic()
        return result


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
    return KombuPublisher(url, connect_timeout=connect_timeout)


def _quiet_close(conn: Any) -> None:
    try:
        conn.release()
    except Exception:  # closing a broken connection may fail in many ways
        logger.debug("reliable_events: error while closing a broker connection", exc_info=True)
