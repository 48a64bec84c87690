"""What arrived? Wire headers, poison reasons and decoding a delivery into an ``Event``."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from reliable_events import cloudevents
from reliable_events.broker.base import KEY_HEADER, Delivery
from reliable_events.consumer.base import Event
from reliable_events.exceptions import (
    PoisonMessage,
)
from reliable_events.models import (
    MESSAGE_ID_MAX_LENGTH,
    TOPIC_MAX_LENGTH,
)
from reliable_events.sanitize import clean_text, error_summary, json_safe
from reliable_events.times import as_project
from reliable_events.topology import BUCKET_HEADER

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
BROKER_HEADER_PREFIXES = ("x-death", "x-first-death-", "x-last-death-", "x-delivery-count")
OUR_HEADERS = (ATTEMPT_HEADER, TOPIC_HEADER, FIRST_FAILED_HEADER, HISTORY_HEADER)

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

#: Failed attempts kept in the history header and the dead letter.
HISTORY_LIMIT = 20


# -- deliveries and decoding -------------------------------------------------------------


class Poison(PoisonMessage):
    """A delivery that cannot become an event; ``reason`` names the defect."""

    def __init__(self, reason: str, detail: str, *, payload: Any = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.payload = payload


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


#: ``json.loads(text, parse_constant=...)`` builds a decoder per call; this one is shared.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def decode_payload(body: bytes) -> Any:
    """The JSON value of ``body`` (UTF-8; ``NaN``/``Infinity`` are not JSON)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Poison(NOT_JSON, f"body is not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    try:
        if text.startswith("\ufeff"):  # what json.loads refuses before decoding
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        return _DECODER.decode(text)
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
    message may stop the loop.  CloudEvents (binary or structured) are read too.
    """
    delivery = cloudevents.normalize(delivery)
    if delivery.undecodable:
        raise Poison(UNDECODABLE, delivery.undecodable)
    try:
        return _decode_event(delivery, max_bytes=max_bytes, exchange=exchange)
    except Poison:
        raise
    except Exception as exc:
        logger.warning("reliable_events: a message could not be decoded", exc_info=True)
        raise Poison(UNDECODABLE, f"decoding failed: {error_summary(exc)}") from exc


def payload_bytes(payload: Any) -> int:
    """The size of ``payload`` as ``publish_event`` measures it: compact JSON, UTF-8."""
    return len(json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode())


def _decode_event(delivery: Delivery, *, max_bytes: int, exchange: str) -> Event:
    props = delivery.properties
    body = delivery.body
    # The body may be longer than the payload publish_event measured: the outbox column's
    # text (PostgreSQL's jsonb, Django's JSONField on SQLite) puts a space after every
    # ``:`` and ``,``.  Only the payload itself, measured the same way, is over the limit.
    oversized = len(body) > max_bytes
    if oversized and len(body) > 2 * max_bytes + 4096:
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
    if oversized:
        try:
            size = payload_bytes(payload := decode_payload(body))
        except (Poison, ValueError, RecursionError):
            size = len(body)
        if size > max_bytes:
            raise Poison(
                TOO_LARGE,
                f"payload is {size} bytes (body {len(body)}), over MAX_PAYLOAD_BYTES ({max_bytes})",
            )
    else:
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
        headers={
            k: v
            for k, v in headers.items()
            if not k.lower().startswith("x-") and k != BUCKET_HEADER
        },
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
        return as_project(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return as_project(datetime.fromtimestamp(value, tz=UTC))
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
        return as_project(value)
    if isinstance(value, str):
        try:
            return as_project(datetime.fromisoformat(value))
        except ValueError:
            return None
    return None
