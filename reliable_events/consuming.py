"""The consume loop: deliveries in; effects, acks, delayed retries and dead letters out.

One :class:`Worker` runs one or more :class:`~reliable_events.consumer.EventConsumer`
subclasses over one broker connection (``consume_events``, the Celery
``ConsumerStep``).  For each delivery, in order:

1. **Decode** (:func:`decode_event`).  A body over ``MAX_PAYLOAD_BYTES``, a content type
   other than JSON, a body that is not UTF-8 JSON, a missing message id or an
   ``x-event-attempt`` header that is not a number from 1 to ``MAX_ATTEMPT`` is *poison*:
   it becomes a ``DeadLetter`` with that reason, is acked, and the loop goes on.  So is a
   message the transport itself could not read (``undecodable``: e.g. a kombu virtual
   transport's stored message that fails to decode inside ``drain_events``).
2. **Process** (:meth:`EventConsumer.process`): in one ``transaction.atomic()``, insert
   ``ProcessedMessage(consumer, message_id)`` and run ``handle``.  Already processed:
   nothing runs.
3. **Settle.**  Processed or duplicate: ack (only now, after the commit).  ``handle``
   raised: with retries left, re-publish the message (same body and message id, the
   attempt count in ``x-event-attempt``) to the delay queue ``<name>.retry.<n>`` and wait
   for the broker's confirm, then ack; otherwise, or at once on ``PermanentError``,
   write a ``DeadLetter`` (payload, headers, error, traceback, attempts, history), then
   ack.  If the retry publish is not confirmed the message is rejected back to its queue
   (never acked), so it is delivered again.

Faults: a crash anywhere before the ack means the broker delivers the message again,
and the idempotency record makes that harmless.  A lost broker connection is re-opened
with exponential backoff (the unacked messages are redelivered).  A database that goes
away mid-handler leaves the message unacked; the worker waits (with backoff, keeping
the broker connection alive) until the database answers, then processes it again.
SIGTERM (through a :class:`~reliable_events.runner.StopFlag`) lets the current message
finish and be acked; prefetched messages not yet started go back to the queue.

Transports: on ``amqp://`` the worker speaks py-amqp directly (manual acks, ``basic.qos``
prefetch, delay queues with TTL).  On ``db://`` (:mod:`reliable_events.database_transport`)
the claim, the handler and the "ack" are one database transaction, and a retry is a row
due later.  On the in-process ``memory://`` transport, which has no TTL
dead-lettering, a retry is an ``OutboxMessage`` row
addressed to the consumer's queue with ``next_attempt_at = now + delay``: the relay
delivers it when it is due (on ``memory://`` the worker runs that relay itself when
idle, since no other process can reach its queues).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import sysconfig
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from types import TracebackType
from typing import Any, NoReturn

from django.db import (
    DEFAULT_DB_ALIAS,
    DatabaseError,
    InterfaceError,
    OperationalError,
    connections,
    transaction,
)
from django.utils import timezone
from django.utils.module_loading import import_string

from reliable_events import signals
from reliable_events.broker import (
    KEY_HEADER,
    AmqpPublisher,
    OutgoingMessage,
    describe_error,
    is_amqp_url,
    own_transport,
    redact,
    safe_url,
)
from reliable_events.conf import app_settings
from reliable_events.consumer import (
    Event,
    EventConsumer,
    HandlerResult,
    Outcome,
    database_lost,
    raw_connection,
    registry,
)
from reliable_events.exceptions import (
    BrokerError,
    ConfigurationError,
    DatabaseUnavailable,
    PoisonMessage,
    ReliableEventsError,
)
from reliable_events.models import (
    KEY_MAX_LENGTH,
    MESSAGE_ID_MAX_LENGTH,
    TOPIC_MAX_LENGTH,
    DeadLetter,
    OutboxMessage,
)
from reliable_events.runner import StopFlag
from reliable_events.topology import Topology, full_topology
from reliable_events.topology_check import TopologyCheck

logger = logging.getLogger(__name__)

# -- wire format -------------------------------------------------------------------------
#: Handler attempt number of this delivery (integer, absent = 1).
ATTEMPT_HEADER = "x-event-attempt"
#: The event's topic, set when re-publishing through a delay queue (the routing key then
#: is the queue name).
TOPIC_HEADER = "x-event-topic"
#: ISO time of the first failed attempt, carried across retries.
FIRST_FAILED_HEADER = "x-event-first-failed-at"
#: JSON list of the failed attempts so far: ``{"attempt", "at", "error"}``.
HISTORY_HEADER = "x-event-history"
#: Set by quorum queues: how many times the broker delivered the message before.
DELIVERY_COUNT_HEADER = "x-delivery-count"
#: Headers the broker adds when dead-lettering; dropped when re-publishing a retry.
_BROKER_HEADER_PREFIXES = ("x-death", "x-first-death-", "x-last-death-", "x-delivery-count")
_OUR_HEADERS = (ATTEMPT_HEADER, TOPIC_HEADER, FIRST_FAILED_HEADER, HISTORY_HEADER)

JSON_CONTENT_TYPES = frozenset({"application/json"})
UTF8_ENCODINGS = frozenset({"utf-8", "utf8"})

# -- dead-letter reasons -----------------------------------------------------------------
RETRIES_EXHAUSTED = "retries-exhausted"
PERMANENT_ERROR = "permanent-error"
REDELIVERY_LIMIT = "redelivery-limit"
TOO_LARGE = "too-large"
WRONG_CONTENT_TYPE = "wrong-content-type"
NOT_JSON = "not-json"
NO_MESSAGE_ID = "no-message-id"
BAD_MESSAGE_ID = "bad-message-id"
BAD_ATTEMPT_HEADER = "bad-attempt-header"
#: The message could not be read at all: the transport's own envelope (a kombu virtual
#: transport's stored message) or the frame's properties were broken, or decoding failed
#: in an unforeseen way.  The dead letter keeps whatever bytes could be recovered.
UNDECODABLE = "undecodable"
POISON_REASONS = (
    TOO_LARGE,
    WRONG_CONTENT_TYPE,
    NOT_JSON,
    NO_MESSAGE_ID,
    BAD_MESSAGE_ID,
    BAD_ATTEMPT_HEADER,
    UNDECODABLE,
)

#: Characters of an undecodable body kept in ``DeadLetter.raw_body``.
RAW_BODY_LIMIT = 64 * 1024
#: Failed attempts kept in the history header and the dead letter.
HISTORY_LIMIT = 20
_ERROR_SUMMARY_LIMIT = 300
_TRACEBACK_LIMIT = 20_000
#: The same delivery failing on a lost database connection this many times in a row while
#: the database answers at once is sent back to its queue instead of retried in place.
_MAX_OUTAGES_PER_DELIVERY = 10
#: Seconds the loop blocks waiting for a delivery before it looks at its stop flag.
POLL_SECONDS = 1.0
#: Socket timeout for reading what already arrived (batching), seconds.
_NO_WAIT = 0.0005
#: A batch transaction takes no further message after it has been open this long, so
#: that slow handlers are not held in one long transaction (and its locks).
BATCH_MAX_SECONDS = 0.25


# -- deliveries and decoding -------------------------------------------------------------
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


class Poison(PoisonMessage):
    """A delivery that cannot become an event; ``reason`` names the defect."""

    def __init__(self, reason: str, detail: str, *, payload: Any = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.payload = payload


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode_payload(body: bytes) -> Any:
    """The JSON value of ``body`` (UTF-8; ``NaN``/``Infinity`` are not JSON)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Poison(NOT_JSON, f"body is not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        raise Poison(NOT_JSON, f"body is not JSON: {str(exc)[:200]}") from exc
    except RecursionError as exc:  # a small body can nest deeper than the parser goes
        raise Poison(NOT_JSON, "body is not JSON: nested too deeply") from exc


#: Largest ``x-event-attempt`` accepted: what ``DeadLetter.attempts`` can store (no retry
#: policy comes near it; a bigger value is garbage, not an attempt count).
MAX_ATTEMPT = 2**31 - 1


def parse_attempt(value: Any) -> int:
    """The ``x-event-attempt`` header as an int from 1 to ``MAX_ATTEMPT`` (absent = 1).

    Text must be ASCII digits: ``str.isdigit`` also accepts characters ``int()`` refuses
    (``"²"``), and ``int()`` refuses very long digit strings; either would escape as a
    ``ValueError`` and stop the loop on every delivery of the message.
    """
    if value is None:
        return 1
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        text = value.strip()
        if text.isascii() and text.isdigit() and len(text) <= 10:
            value = int(text)
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_ATTEMPT:
        return value
    raise Poison(
        BAD_ATTEMPT_HEADER,
        f"{ATTEMPT_HEADER} is {str(value)[:50]!r}, not a number from 1 to {MAX_ATTEMPT}",
    )


def decode_event(delivery: Delivery, *, max_bytes: int, exchange: str) -> Event:
    """Turn ``delivery`` into an :class:`Event`, or raise :class:`Poison` saying why not.

    A message without ``content_type`` is read as JSON (plain AMQP clients often omit
    it); any other content type than ``application/json``, or an encoding other than
    UTF-8, is poison.  Any other failure to decode is poison too (``undecodable``): no
    message may stop the loop.
    """
    if delivery.undecodable:
        raise Poison(UNDECODABLE, delivery.undecodable)
    try:
        return _decode_event(delivery, max_bytes=max_bytes, exchange=exchange)
    except Poison:
        raise
    except Exception as exc:
        logger.warning("reliable_events: a message could not be decoded", exc_info=True)
        raise Poison(UNDECODABLE, f"decoding failed: {error_summary(exc)}") from exc


def _decode_event(delivery: Delivery, *, max_bytes: int, exchange: str) -> Event:
    props = delivery.properties
    body = delivery.body
    if len(body) > max_bytes:
        raise Poison(TOO_LARGE, f"body is {len(body)} bytes, over MAX_PAYLOAD_BYTES ({max_bytes})")
    content_type = props.get("content_type") or ""
    if content_type:
        base = str(content_type).split(";", 1)[0].strip().lower()
        if base not in JSON_CONTENT_TYPES:
            raise Poison(
                WRONG_CONTENT_TYPE, f"content type {str(content_type)[:100]!r} is not JSON"
            )
    encoding = props.get("content_encoding") or ""
    if encoding and str(encoding).strip().lower() not in UTF8_ENCODINGS:
        raise Poison(WRONG_CONTENT_TYPE, f"content encoding {str(encoding)[:100]!r} is not UTF-8")
    headers = delivery.headers
    payload = decode_payload(body)
    try:
        attempt = parse_attempt(headers.get(ATTEMPT_HEADER))
    except Poison as poison:
        raise Poison(poison.reason, poison.detail, payload=payload) from None
    message_id = props.get("message_id")
    if not isinstance(message_id, str) or not message_id.strip():
        raise Poison(NO_MESSAGE_ID, "the message has no message_id", payload=payload)
    if len(message_id) > MESSAGE_ID_MAX_LENGTH or "\x00" in message_id:
        raise Poison(BAD_MESSAGE_ID, "message_id is too long or has NUL", payload=payload)
    key = headers.get(KEY_HEADER)
    return Event(
        id=message_id,
        topic=event_topic(delivery, exchange),
        key=key if isinstance(key, str) and key else None,
        payload=payload,
        headers={k: v for k, v in headers.items() if not k.lower().startswith("x-")},
        attempt=attempt,
        redelivered=delivery.redelivered,
        published_at=_timestamp(props.get("timestamp")),
    )


def event_topic(delivery: Delivery, exchange: str) -> str:
    """The topic: the ``type`` property, else ``x-event-topic``, else the routing key when
    the message came through the events exchange."""
    for value in (delivery.properties.get("type"), delivery.headers.get(TOPIC_HEADER)):
        if isinstance(value, str) and value:
            return value[:TOPIC_MAX_LENGTH]
    if delivery.exchange == exchange:
        return delivery.routing_key[:TOPIC_MAX_LENGTH]
    return ""


def _timestamp(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value, tz=UTC)
        except (OverflowError, OSError, ValueError):
            return None
    return None


def log_redelivery(delivery: Delivery) -> None:
    """One INFO line per delivery the broker flagged ``redelivered`` (a consumer died or
    lost its connection before acking it).  Stable format, counted by the ledger test."""
    if delivery.redelivered:
        logger.info(
            "reliable_events: %s received a redelivered message %s",
            delivery.consumer,
            clean_text(delivery.message_id, 100) or "-",
        )


def log_duplicate(consumer: str, message_id: str) -> None:
    """One INFO line per delivery skipped because its id was already processed (the
    idempotency record absorbed a duplicate).  Stable format, counted by the ledger test."""
    logger.info(
        "reliable_events: %s skipped duplicate %s (already processed)",
        consumer,
        clean_text(message_id, 100),
    )


# -- failure details ---------------------------------------------------------------------
_LIBRARY_MARKERS = ("site-packages", "dist-packages")


def _library_prefixes() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    return tuple({paths["stdlib"], paths["platstdlib"]})


def application_frame(tb: TracebackType | None) -> str:
    """``module.function`` of the first traceback frame that is application code (not in
    site-packages, the standard library or reliable_events); ``""`` if none."""
    prefixes = _library_prefixes()
    while tb is not None:
        frame = tb.tb_frame
        module = str(frame.f_globals.get("__name__", ""))
        filename = frame.f_code.co_filename
        library = (
            module == "reliable_events"
            or module.startswith("reliable_events.")
            or any(marker in filename for marker in _LIBRARY_MARKERS)
            or filename.startswith(prefixes)
            or filename.startswith("<")
        )
        if not library:
            return f"{module}.{frame.f_code.co_qualname}"
        tb = tb.tb_next
    return ""


def error_type_name(exc: BaseException) -> str:
    cls = type(exc)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def fingerprint(error_type: str, where: str) -> str:
    """Groups alike failures: a short hash of the error type and the application frame."""
    return hashlib.sha256(f"{error_type}|{where}".encode()).hexdigest()[:16]


def error_summary(exc: BaseException) -> str:
    return clean_text(redact(f"{type(exc).__name__}: {exc}"), _ERROR_SUMMARY_LIMIT)


def clean_text(value: Any, limit: int) -> str:
    """``value`` as text PostgreSQL accepts (no NUL), at most ``limit`` characters."""
    text = value if isinstance(value, str) else str(value)
    return text.replace("\x00", "\\x00")[:limit]


def json_safe(value: Any, depth: int = 0) -> Any:
    """``value`` as JSON PostgreSQL accepts: AMQP table values (datetimes, decimals,
    bytes) become strings, NUL characters are escaped."""
    if depth > 20:
        return clean_text(repr(value), 1000)
    if isinstance(value, float):
        finite = value == value and value not in (float("inf"), float("-inf"))
        return value if finite else str(value)
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, str):
        return clean_text(value, 100_000)
    if isinstance(value, bytes):
        return clean_text(value.decode("utf-8", "backslashreplace"), 100_000)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {clean_text(k, 1000): json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v, depth + 1) for v in value]
    return clean_text(str(value), 10_000)


def _has_nul(payload: Any) -> bool:
    return "\\u0000" in json.dumps(payload)


def raw_text(body: bytes) -> str:
    return clean_text(body[:RAW_BODY_LIMIT].decode("utf-8", "backslashreplace"), RAW_BODY_LIMIT)


def read_history(headers: dict[str, Any]) -> list[dict[str, Any]]:
    value = headers.get(HISTORY_HEADER)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return []
    try:
        items = json.loads(value)
    except ValueError:
        return []
    if not isinstance(items, list):
        return []
    return [json_safe(item) for item in items if isinstance(item, dict)][-HISTORY_LIMIT:]


def read_first_failed(headers: dict[str, Any]) -> datetime | None:
    value = headers.get(FIRST_FAILED_HEADER)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


@dataclass
class Failure:
    """One failed handler attempt, ready for a retry header or a dead letter."""

    attempt: int
    at: datetime
    error_type: str
    error_message: str
    traceback: str
    fingerprint: str
    history: list[dict[str, Any]]
    first_failed_at: datetime

    @classmethod
    def from_result(cls, result: HandlerResult, event: Event, headers: dict[str, Any]) -> Failure:
        exc = result.error
        assert exc is not None
        now = timezone.now()
        error_type = error_type_name(exc)
        history = read_history(headers)
        history.append(
            {"attempt": event.attempt, "at": now.isoformat(), "error": error_summary(exc)}
        )
        return cls(
            attempt=event.attempt,
            at=now,
            error_type=clean_text(error_type, 200),
            error_message=clean_text(redact(str(exc)), 10_000),
            traceback=clean_text(redact(result.traceback), _TRACEBACK_LIMIT),
            fingerprint=fingerprint(error_type, application_frame(exc.__traceback__)),
            history=history[-HISTORY_LIMIT:],
            first_failed_at=read_first_failed(headers) or now,
        )


@contextlib.contextmanager
def database_guard(alias: str, doing: str) -> Iterator[None]:
    """Run bookkeeping writes; a broken connection becomes :class:`DatabaseUnavailable`."""
    try:
        before = raw_connection(alias)
    except (DatabaseError, InterfaceError) as exc:
        raise DatabaseUnavailable(f"database {alias!r} unavailable while {doing}") from exc
    try:
        yield
    except (DatabaseError, InterfaceError) as exc:
        # OperationalError is the database's "not now" (lost connection, SQLite's
        # "database is locked", a statement or lock timeout): wait and try again.
        if isinstance(exc, OperationalError) or database_lost(alias, before):
            raise DatabaseUnavailable(
                f"database {alias!r} failed while {doing}: {type(exc).__name__}"
            ) from exc
        raise


# -- dead letters ------------------------------------------------------------------------
def write_dead_letter(
    *,
    alias: str,
    consumer: type[EventConsumer],
    delivery: Delivery,
    reason: str,
    payload: Any,
    raw_body: str,
    topic: str,
    key: str | None,
    attempts: int,
    error_type: str,
    error_message: str,
    traceback: str,
    fingerprint_value: str,
    history: list[dict[str, Any]],
    first_failed_at: datetime,
    last_failed_at: datetime,
) -> DeadLetter:
    """Store (or, for a redelivered message, update) the open dead letter of a delivery.

    A consumer that died after writing a dead letter but before acking gets the message
    again and comes back here: the open dead letter of the same consumer and message id
    is updated rather than duplicated.  A payload PostgreSQL cannot store (a ``\\u0000``)
    is kept as raw text instead.  Raises :class:`DatabaseUnavailable` when the database
    is gone.
    """
    if payload is not None and _has_nul(payload):
        payload, raw_body = None, raw_text(delivery.body)
    message_id = clean_text(delivery.message_id, MESSAGE_ID_MAX_LENGTH)
    values: dict[str, Any] = {
        "queue": consumer.queue_name(),
        "topic": clean_text(topic, TOPIC_MAX_LENGTH),
        "key": clean_text(key or "", KEY_MAX_LENGTH),
        "payload": payload,
        "raw_body": raw_body,
        "headers": json_safe(delivery.headers),
        "reason": reason[:50],
        "error_type": clean_text(error_type, 200),
        "error_message": error_message,
        "traceback": traceback,
        "fingerprint": fingerprint_value,
        "attempts": max(1, attempts),
        "history": history,
        "first_failed_at": first_failed_at,
        "last_failed_at": last_failed_at,
    }
    try:
        with database_guard(alias, "writing a dead letter"):
            letter = _save_dead_letter(alias, consumer.name, message_id, values)
    except (DatabaseError, InterfaceError):
        # Not a lost connection: something in the values was refused.  Keep the essentials
        # (the body as text), never lose the message for want of a perfect record.
        logger.exception("reliable_events: dead letter refused; storing a minimal one")
        values.update(
            payload=None,
            raw_body=raw_text(delivery.body),
            headers={},
            error_message=clean_text(values["error_message"].encode("ascii", "replace"), 10_000),
            traceback=clean_text(values["traceback"].encode("ascii", "replace"), 20_000),
        )
        with database_guard(alias, "writing a dead letter"):
            letter = _save_dead_letter(alias, consumer.name, message_id, values)
    signals.event_dead_lettered.send(sender=DeadLetter, dead_letter=letter)
    return letter


def _dead_letter_lock_key(consumer: str, message_id: str) -> int:
    """A signed 64-bit advisory-lock key for one consumer's message id."""
    digest = hashlib.blake2b(f"{consumer}\x00{message_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _save_dead_letter(
    alias: str, consumer: str, message_id: str, values: dict[str, Any]
) -> DeadLetter:
    with transaction.atomic(using=alias):
        letter = None
        if message_id:
            if connections[alias].vendor == "postgresql":
                # Two workers dead-lettering copies of one message at the same moment
                # (at-least-once delivery) must not both find "no open letter" and
                # insert two: serialise them on this (consumer, message id) until commit.
                with connections[alias].cursor() as cursor:
                    cursor.execute(
                        "SELECT pg_advisory_xact_lock(%s)",
                        [_dead_letter_lock_key(consumer, message_id)],
                    )
            letter = (
                DeadLetter.objects.using(alias)
                .select_for_update()
                .open()
                .filter(consumer=consumer, message_id=message_id)
                .order_by("id")
                .first()
            )
        if letter is None:
            letter = DeadLetter(consumer=consumer, message_id=message_id, **values)
        else:
            values = {
                **values,
                "first_failed_at": min(letter.first_failed_at, values["first_failed_at"]),
            }
            for name, value in values.items():
                setattr(letter, name, value)
        letter.save(using=alias)
    return letter


# -- retries -----------------------------------------------------------------------------
class RetryPublishFailed(BrokerError):
    """The retry could not be handed to the broker with a confirm: do not ack."""


def retry_headers(delivery: Delivery, event: Event, failure: Failure) -> dict[str, Any]:
    """The headers of the re-published message: the original ones minus what the broker
    added, plus the next attempt number, the topic and the failure history."""
    headers = {
        k: v
        for k, v in delivery.headers.items()
        if not k.startswith(_BROKER_HEADER_PREFIXES) and k not in _OUR_HEADERS
    }
    headers[ATTEMPT_HEADER] = event.attempt + 1
    headers[TOPIC_HEADER] = event.topic
    headers[FIRST_FAILED_HEADER] = failure.first_failed_at.isoformat()
    headers[HISTORY_HEADER] = json.dumps(failure.history, separators=(",", ":"))
    return headers


class RetryScheduler:
    """Hands a failed message back for a later attempt."""

    def schedule(
        self,
        consumer: type[EventConsumer],
        delivery: Delivery,
        event: Event,
        failure: Failure,
        *,
        retry: int,
        delay: float,
    ) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release connections."""


class AmqpRetryScheduler(RetryScheduler):
    """Publishes to the delay queue ``<name>.retry.<n>`` and waits for the confirm."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.publisher = AmqpPublisher(url, window=1, declare_events_topology=False)

    def schedule(
        self,
        consumer: type[EventConsumer],
        delivery: Delivery,
        event: Event,
        failure: Failure,
        *,
        retry: int,
        delay: float,
    ) -> None:
        queue = consumer.retry_queue_for(retry)
        message = OutgoingMessage(
            ref=event.id,
            exchange="",
            routing_key=queue,
            body=delivery.body,
            message_id=event.id,
            topic=event.topic,
            headers=retry_headers(delivery, event, failure),
            timestamp=event.published_at,
        )
        result = self.publisher.publish([message], timeout=float(app_settings.CONFIRM_TIMEOUT))
        if event.id not in result.confirmed:
            reasons = {**result.interrupted, **result.failed}
            reason = reasons.get(event.id) or result.broker_error or "not confirmed"
            raise RetryPublishFailed(f"retry of {event.id!r} to {queue} not confirmed: {reason}")

    def close(self) -> None:
        self.publisher.close()


class OutboxRetryScheduler(RetryScheduler):
    """Embedded transports (no TTL dead-lettering): an outbox row addressed to the
    consumer's queue, due after the delay; the relay delivers it."""

    def schedule(
        self,
        consumer: type[EventConsumer],
        delivery: Delivery,
        event: Event,
        failure: Failure,
        *,
        retry: int,
        delay: float,
    ) -> None:
        from reliable_events.publishing import json_value, lane_for

        alias = consumer.get_database()
        headers = json_safe(retry_headers(delivery, event, failure))
        headers.pop(KEY_HEADER, None)  # the relay sets it from ``key``
        with database_guard(alias, "scheduling a retry"):
            OutboxMessage.objects.using(alias).create(
                message_id=event.id,
                topic=event.topic or consumer.queue_name(),
                key=event.key,
                lane=lane_for(event.key, event.id),
                queue=consumer.queue_name(),
                payload=json_value(event.payload),  # a JSON null body stays JSON null
                headers=headers,
                next_attempt_at=timezone.now() + timedelta(seconds=delay),
            )


# -- processing one delivery -------------------------------------------------------------
class Processor:
    """Turns one delivery into an outcome (everything but the ack); transport-agnostic."""

    def __init__(self, consumers: dict[str, EventConsumer], scheduler: RetryScheduler) -> None:
        self.consumers = consumers
        self.scheduler = scheduler
        # Read once per worker (not per message); a restarted worker sees new values.
        self.max_bytes = int(app_settings.MAX_PAYLOAD_BYTES)
        self.exchange = str(app_settings.EXCHANGE)
        self.max_deliveries = int(app_settings.MAX_DELIVERIES)

    def decode(self, delivery: Delivery) -> Event | None:
        """The event, or ``None`` when the delivery needs :meth:`process` on its own (it is
        poison, or was delivered too often)."""
        try:
            event = decode_event(delivery, max_bytes=self.max_bytes, exchange=self.exchange)
        except Poison:
            return None
        count = delivery.headers.get(DELIVERY_COUNT_HEADER)
        if isinstance(count, int) and not isinstance(count, bool) and count >= self.max_deliveries:
            return None
        return event

    def process(self, delivery: Delivery) -> tuple[Outcome, HandlerResult | None]:
        """Decode, run and settle ``delivery``; the caller acks unless this raises.

        Raises :class:`DatabaseUnavailable` (leave it unacked, wait, try again) and
        :class:`RetryPublishFailed` (reject it back to its queue).
        """
        consumer = self.consumers[delivery.consumer]
        cls = type(consumer)
        try:
            event = decode_event(delivery, max_bytes=self.max_bytes, exchange=self.exchange)
        except Poison as poison:
            self._poison(cls, delivery, poison)
            return Outcome.POISON, None
        count = delivery.headers.get(DELIVERY_COUNT_HEADER)
        if isinstance(count, int) and not isinstance(count, bool) and count >= self.max_deliveries:
            self._redelivery_limit(cls, delivery, event, count)
            return Outcome.DEAD_LETTERED, None
        result = consumer.process(event)
        if result.outcome is Outcome.DUPLICATE:
            log_duplicate(cls.name, event.id)
        if result.outcome is not Outcome.FAILED:
            return result.outcome, result
        failure = Failure.from_result(result, event, delivery.headers)
        max_retries = cls.get_max_retries()
        if result.permanent or event.attempt > max_retries:
            reason = PERMANENT_ERROR if result.permanent else RETRIES_EXHAUSTED
            logger.error(
                "reliable_events: %s dead-lettered %s after %d attempt(s) (%s): %s",
                cls.name,
                event.id,
                event.attempt,
                reason,
                failure.history[-1]["error"],
            )
            self._dead_letter(cls, delivery, event, failure, reason)
            return Outcome.DEAD_LETTERED, result
        delay = cls.delay_for(event.attempt)
        self.scheduler.schedule(cls, delivery, event, failure, retry=event.attempt, delay=delay)
        logger.warning(
            "reliable_events: %s failed on %s (attempt %d of %d), retrying in %gs: %s",
            cls.name,
            event.id,
            event.attempt,
            max_retries + 1,
            delay,
            failure.history[-1]["error"],
        )
        return Outcome.RETRIED, result

    def _dead_letter(
        self,
        cls: type[EventConsumer],
        delivery: Delivery,
        event: Event,
        failure: Failure,
        reason: str,
    ) -> None:
        write_dead_letter(
            alias=cls.get_database(),
            consumer=cls,
            delivery=delivery,
            reason=reason,
            payload=event.payload,
            raw_body="",
            topic=event.topic,
            key=event.key,
            attempts=event.attempt,
            error_type=failure.error_type,
            error_message=failure.error_message,
            traceback=failure.traceback,
            fingerprint_value=failure.fingerprint,
            history=failure.history,
            first_failed_at=failure.first_failed_at,
            last_failed_at=failure.at,
        )

    def _poison(self, cls: type[EventConsumer], delivery: Delivery, poison: Poison) -> None:
        now = timezone.now()
        try:
            attempt = parse_attempt(delivery.headers.get(ATTEMPT_HEADER))
        except Poison:
            attempt = 1
        key = delivery.headers.get(KEY_HEADER)
        logger.error(
            "reliable_events: %s dead-lettered a poison message %r: %s",
            cls.name,
            clean_text(delivery.message_id, 100),
            poison,
        )
        write_dead_letter(
            alias=cls.get_database(),
            consumer=cls,
            delivery=delivery,
            reason=poison.reason,
            payload=poison.payload,
            raw_body="" if poison.payload is not None else raw_text(delivery.body),
            topic=event_topic(delivery, str(app_settings.EXCHANGE)),
            key=key if isinstance(key, str) else None,
            attempts=attempt,
            error_type=error_type_name(PoisonMessage("")),
            error_message=clean_text(poison.detail, 10_000),
            traceback="",
            fingerprint_value=fingerprint(poison.reason, cls.name),
            history=[{"attempt": attempt, "at": now.isoformat(), "error": str(poison)[:300]}],
            first_failed_at=now,
            last_failed_at=now,
        )

    def _redelivery_limit(
        self, cls: type[EventConsumer], delivery: Delivery, event: Event, count: int
    ) -> None:
        now = timezone.now()
        detail = (
            f"the broker delivered it {count} times without an ack (consumers crashed or "
            f"lost their connection while handling it); MAX_DELIVERIES is "
            f"{app_settings.MAX_DELIVERIES}"
        )
        logger.error("reliable_events: %s dead-lettered %s: %s", cls.name, event.id, detail)
        write_dead_letter(
            alias=cls.get_database(),
            consumer=cls,
            delivery=delivery,
            reason=REDELIVERY_LIMIT,
            payload=event.payload,
            raw_body="",
            topic=event.topic,
            key=event.key,
            attempts=event.attempt,
            error_type="",
            error_message=detail,
            traceback="",
            fingerprint_value=fingerprint(REDELIVERY_LIMIT, cls.name),
            history=[
                *read_history(delivery.headers),
                {"attempt": event.attempt, "at": now.isoformat(), "error": detail[:300]},
            ],
            first_failed_at=read_first_failed(delivery.headers) or now,
            last_failed_at=now,
        )


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


# -- the worker --------------------------------------------------------------------------
@dataclass
class WorkerStats:
    """Counters of one :meth:`Worker.run`."""

    received: int = 0
    processed: int = 0
    duplicates: int = 0
    retried: int = 0
    dead_lettered: int = 0
    poison: int = 0
    requeued: int = 0
    reconnects: int = 0
    database_outages: int = 0
    handler_seconds: float = 0.0
    slowest_seconds: float = 0.0
    started: float = field(default_factory=time.monotonic)
    #: monotonic time of the first and the last settled delivery.
    first_settled: float | None = None
    last_settled: float | None = None
    #: The broker could not be reached when the run ended (``--until-idle`` expired).
    disconnected: bool = False

    @property
    def settled(self) -> int:
        return self.processed + self.duplicates + self.retried + self.dead_lettered + self.poison

    def rate(self) -> float:
        """Settled deliveries per second, between the first and the last one."""
        if self.first_settled is None or self.last_settled is None or self.settled < 2:
            return 0.0
        span = self.last_settled - self.first_settled
        return (self.settled - 1) / span if span > 0 else 0.0

    def count(self, outcome: Outcome) -> None:
        if outcome is Outcome.PROCESSED:
            self.processed += 1
        elif outcome is Outcome.DUPLICATE:
            self.duplicates += 1
        elif outcome is Outcome.RETRIED:
            self.retried += 1
        elif outcome is Outcome.DEAD_LETTERED:
            self.dead_lettered += 1
        elif outcome is Outcome.POISON:
            self.poison += 1
        now = time.monotonic()
        if self.first_settled is None:
            self.first_settled = now
        self.last_settled = now

    def __str__(self) -> str:
        mean = self.handler_seconds / self.processed * 1000 if self.processed else 0.0
        return (
            f"processed={self.processed} duplicates={self.duplicates} retried={self.retried} "
            f"dead_lettered={self.dead_lettered} poison={self.poison} requeued={self.requeued} "
            f"reconnects={self.reconnects} database_outages={self.database_outages} "
            f"handler_mean_ms={mean:.2f} rate={self.rate():.0f}/s"
        )


class Worker:
    """Runs consumers until stopped (or idle for ``until_idle`` seconds).

    ``consumers``: consumer classes or names (default: every registered consumer).
    """

    def __init__(
        self,
        consumers: Iterable[type[EventConsumer] | str] | None = None,
        *,
        url: str | None = None,
        prefetch: int | None = None,
        stop: StopFlag | None = None,
        progress: Callable[[str], None] | None = None,
        log_every: int | None = None,
    ) -> None:
        classes: list[type[EventConsumer]] = []
        for item in registry.all() if consumers is None else consumers:
            cls = registry.get(item) if isinstance(item, str) else item
            cls.validate()
            if cls not in classes:
                classes.append(cls)
        if not classes:
            raise ConfigurationError(
                "no consumers to run: define EventConsumer subclasses in <app>/consumers.py"
            )
        names = [cls.name for cls in classes]
        if len(set(names)) != len(names):
            raise ConfigurationError(f"two consumers share a name: {names}")
        self.consumer_classes = classes
        self.consumers = {cls.name: cls() for cls in classes}
        self.url = str(url or app_settings.BROKER_URL)
        self.stop = stop or StopFlag()
        self.progress = progress
        self.log_every = max(1, int(log_every or app_settings.CONSUMER_LOG_EVERY))
        self.transport = open_transport(self.url, classes, prefetch=prefetch)
        self.scheduler = self.transport.make_scheduler()
        self.processor = Processor(self.consumers, self.scheduler)
        self._batch_sizes = {cls.name: cls.get_batch_size() for cls in classes}
        #: Messages to take one at a time after a batch failed, per consumer.
        self._cooldown: dict[str, int] = {}
        self.stats = WorkerStats()
        self._relay: Any = None
        self._failures = 0
        self._last_activity = time.monotonic()
        self._max_messages: int | None = None

    # -- the loop --------------------------------------------------------------------------------
    def run(
        self, *, until_idle: float | None = None, max_messages: int | None = None
    ) -> WorkerStats:
        """Consume until the stop flag is set, ``until_idle`` seconds pass without a
        delivery, or ``max_messages`` deliveries were settled."""
        stats = self.stats = WorkerStats()
        self._max_messages = max_messages
        self._failures = 0
        self._last_activity = time.monotonic()
        try:
            while not self.stop.is_set():
                if max_messages is not None and stats.settled >= max_messages:
                    break
                if until_idle is not None and self._idle_for() >= until_idle:
                    break
                try:
                    self._step(until_idle)
                except self.transport.connection_errors as exc:
                    self._connection_lost(exc)
        finally:
            self.close()
        self._report(final=True)
        return stats

    def _idle_for(self) -> float:
        return time.monotonic() - self._last_activity

    def _step(self, until_idle: float | None) -> None:
        """Take one delivery (waiting at most a poll interval) and settle it."""
        self.transport.connect()
        self.transport.check_topology()
        self._failures = 0
        self.stats.disconnected = False
        # memory:// relays its own retries when idle: look for due ones more often.
        timeout = POLL_SECONDS / 5 if self.transport.relays_itself else POLL_SECONDS
        if until_idle is not None:
            timeout = max(0.01, min(timeout, until_idle - self._idle_for()))
        delivery = self.transport.get(timeout)
        if delivery is None:
            self._idle()
            return
        limit = self._batch_sizes[delivery.consumer]
        if self._cooldown.get(delivery.consumer):
            self._cooldown[delivery.consumer] -= 1
            limit = 1
        if self._max_messages is not None:
            limit = max(1, min(limit, self._max_messages - self.stats.settled))
        more = self.transport.take_more(delivery.consumer, limit - 1) if limit > 1 else []
        if more:
            self._settle_batch([delivery, *more])
        else:
            self._settle(delivery)
        self._last_activity = time.monotonic()

    def _connection_lost(self, exc: BaseException) -> None:
        """Drop the connection and wait before the next attempt (exponential, jittered)."""
        self._failures += 1
        self.stats.reconnects += 1
        self.stats.disconnected = True
        self.transport.close()
        self.scheduler.close()
        ceiling = min(
            float(app_settings.CONSUMER_RECONNECT_MAX), 0.25 * 2 ** min(self._failures, 10)
        )
        pause = ceiling * (0.5 + random.random() / 2)
        logger.warning(
            "reliable_events: broker connection lost or refused (%s); reconnecting in %.1fs",
            describe_error(exc, self.url),
            pause,
        )
        self.stop.wait(pause)

    def close(self) -> None:
        self.transport.close()
        self.scheduler.close()
        if self._relay is not None:
            self._relay.close()
            self._relay = None

    def _idle(self) -> None:
        close_stale_connections()
        if self.transport.relays_itself and self._relay_embedded():
            self._last_activity = time.monotonic()  # it just delivered something

    def _relay_embedded(self) -> bool:
        """Publish due outbox rows (retries) on ``memory://``; whether any went out."""
        from reliable_events.relay import Relay

        try:
            if self._relay is None:
                self._relay = Relay()
            return bool(self._relay.run_batch().sent)
        except (DatabaseError, InterfaceError, ReliableEventsError):
            logger.warning("reliable_events: embedded relay failed", exc_info=True)
            return False

    def _settle_batch(self, deliveries: list[Delivery]) -> None:
        """Settle deliveries of one consumer in one transaction (``batch_size`` > 1).

        Poison and over-delivered messages are settled on their own first.  If a handler
        fails, the batch was rolled back and every message goes through :meth:`_settle`
        one by one, so that only the failing one is retried or dead-lettered.
        """
        self.stats.received += len(deliveries)
        for delivery in deliveries:
            log_redelivery(delivery)
        consumer = self.consumers[deliveries[0].consumer]
        batch: list[tuple[Delivery, Event]] = []
        for delivery in deliveries:
            event = self.processor.decode(delivery)
            if event is None:
                self._settle(delivery, counted=True)
            else:
                batch.append((delivery, event))
        if not batch:
            return
        while batch:
            done = self._commit_batch(consumer, batch)
            if done is None:
                return
            batch = batch[done:]

    def _commit_batch(
        self, consumer: EventConsumer, batch: list[tuple[Delivery, Event]]
    ) -> int | None:
        """One transaction over (a prefix of) ``batch``; how many it settled, or ``None``
        when the rest must not be processed now (stopping, or handed back)."""
        outages = 0
        while True:
            try:
                results = consumer.process_batch(
                    [event for _, event in batch], max_seconds=BATCH_MAX_SECONDS
                )
            except DatabaseUnavailable as exc:
                outages += 1
                self.stats.database_outages += 1
                logger.warning("reliable_events: %s; waiting for the database", exc)
                if self.transport.abandon(batch[0][0]):
                    self.stats.requeued += len(batch)
                    self._wait_for_database()
                    return None
                if outages >= _MAX_OUTAGES_PER_DELIVERY:
                    for delivery, _ in batch:
                        self.transport.requeue(delivery)
                    self.stats.requeued += len(batch)
                    return None
                if not self._wait_for_database():
                    return None  # stopping: unacked, the broker delivers them again
                continue
            break
        if results is None:
            # A handler failed and everything was rolled back: one by one now (only the
            # failing message is retried), and no batching for a while, so that a run of
            # failures does not run every handler twice.
            self._cooldown[consumer.name] = self._batch_sizes[consumer.name]
            for delivery, _ in batch:
                self._settle(delivery, counted=True)
            return len(batch)
        for (delivery, event), result in zip(batch, results, strict=False):
            if result.outcome is Outcome.DUPLICATE:
                log_duplicate(delivery.consumer, event.id)
            self.transport.ack(delivery)
            self._count(result.outcome, result)
        return len(results)

    def _count(self, outcome: Outcome, result: HandlerResult | None) -> None:
        if result is not None:
            self.stats.handler_seconds += result.seconds
            self.stats.slowest_seconds = max(self.stats.slowest_seconds, result.seconds)
        self.stats.count(outcome)
        if self.stats.settled % self.log_every == 0:
            self._report()

    def _settle(self, delivery: Delivery, *, counted: bool = False) -> None:
        """Process ``delivery`` and ack it, or leave it for the broker to deliver again."""
        if not counted:
            self.stats.received += 1
            log_redelivery(delivery)
        outages = 0
        while True:
            try:
                outcome, result = self.processor.process(delivery)
            except DatabaseUnavailable as exc:
                outages += 1
                self.stats.database_outages += 1
                logger.warning("reliable_events: %s; waiting for the database", exc)
                if self.transport.abandon(delivery):
                    self.stats.requeued += 1
                    self._wait_for_database()
                    return
                if outages >= _MAX_OUTAGES_PER_DELIVERY:
                    self.transport.requeue(delivery)
                    self.stats.requeued += 1
                    return
                if not self._wait_for_database():
                    return  # stopping: unacked, the broker delivers it again
                continue
            except RetryPublishFailed as exc:
                logger.warning("reliable_events: %s; the message goes back to its queue", exc)
                self.transport.requeue(delivery)
                self.stats.requeued += 1
                self.transport.pump(1.0, self.stop)
                return
            break
        self.transport.ack(delivery)
        self._count(outcome, result)

    def _wait_for_database(self) -> bool:
        """Wait (keeping the broker connection alive) until every consumer's database
        answers; ``False`` if the worker was stopped first."""
        aliases = sorted({cls.get_database() for cls in self.consumer_classes})
        failures = 0
        while not self.stop.is_set():
            close_all_connections(aliases)
            if all(database_answers(alias) for alias in aliases):
                return True
            failures += 1
            pause = min(30.0, 0.25 * 2 ** min(failures, 8))
            logger.warning("reliable_events: database unavailable; retrying in %.1fs", pause)
            self.transport.pump(pause, self.stop)
        return False

    def _report(self, *, final: bool = False) -> None:
        text = f"{'stopped' if final else 'progress'}: {self.stats}"
        logger.info("reliable_events: consumers %s", text)
        if self.progress is not None:
            self.progress(text)


# -- database helpers --------------------------------------------------------------------
def close_stale_connections() -> None:
    """Django's ``close_old_connections`` for connections not inside a transaction."""
    for conn in connections.all(initialized_only=True):
        if not conn.in_atomic_block:
            conn.close_if_unusable_or_obsolete()


def close_all_connections(aliases: Iterable[str]) -> None:
    for alias in aliases:
        conn = connections[alias]
        if conn.in_atomic_block:
            continue
        try:
            conn.close()
        except Exception:  # a broken connection may fail to close; it is gone anyway
            logger.debug("reliable_events: closing a broken connection failed", exc_info=True)


def database_answers(alias: str = DEFAULT_DB_ALIAS) -> bool:
    try:
        with connections[alias].cursor() as cursor:
            cursor.execute("SELECT 1")
    except (DatabaseError, InterfaceError):
        return False
    return True


__all__ = [
    "ATTEMPT_HEADER",
    "POISON_REASONS",
    "Delivery",
    "Poison",
    "Processor",
    "RetryPublishFailed",
    "Worker",
    "WorkerStats",
    "decode_event",
]
