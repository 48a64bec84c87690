"""``publish_event()``: validate, insert in the caller's transaction, publish on commit."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from reliable_events import signals, tracing
from reliable_events.conf import app_settings
from reliable_events.db import write_alias
from reliable_events.exceptions import InvalidEvent
from reliable_events.models import (
    KEY_MAX_LENGTH,
    MESSAGE_ID_MAX_LENGTH,
    TOPIC_MAX_LENGTH,
    OutboxMessage,
)
from reliable_events.outbox import (
    hold,
    insert,
    json_value,
    lane_for,
    new_row,
    on_commit_due,
    schedule_on_commit,
)

#: Kept importable from here (they moved to :mod:`reliable_events.outbox`).
__all__ = [
    "checked_payload",
    "encode_payload",
    "json_value",
    "lane_for",
    "on_commit_due",
    "publish_event",
    "schedule_on_commit",
    "validate_delay",
    "validate_headers",
    "validate_topic",
]

#: A topic is dot-separated words of letters, digits, ``_`` and ``-``.
TOPIC_RE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
#: Header names the app and the broker own; user headers may not use them.
RESERVED_HEADER_PREFIX = "x-"
#: AMQP ``shortstr`` limit: header names and the message id must fit in 255 bytes.
SHORTSTR_MAX_BYTES = 255
#: Largest total UTF-8 size of an event's headers (names + values).  The headers travel in
#: one AMQP frame (``frame_max``, 128 KiB on RabbitMQ); an oversized header would fail
#: every publish of the event, and its whole batch with it.
MAX_HEADERS_BYTES = 16 * 1024
#: Longest ``delay`` accepted by ``publish_event``.
MAX_DELAY = timedelta(days=366)


_NUL_ESCAPE_RE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def encode_payload(payload: Any) -> str:
    """The JSON text of ``payload``, or :class:`InvalidEvent` if it has none.

    NUL characters are refused too: PostgreSQL cannot store ``\\u0000`` in ``jsonb``.
    """
    try:
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidEvent(f"payload is not JSON-serialisable: {exc}") from exc
    if _NUL_ESCAPE_RE.search(body):
        raise InvalidEvent("payload contains a NUL character (\\u0000), which cannot be stored")
    _require_utf8(body, "payload")
    return body


def checked_payload(payload: Any) -> str:
    """The JSON text of a payload ``publish_event`` accepts, or :class:`InvalidEvent`
    saying why not (not JSON, NUL, a lone surrogate, over ``MAX_PAYLOAD_BYTES``): the
    one rule for every way a payload enters the outbox (an edited dead letter too)."""
    body = encode_payload(payload)
    limit = int(app_settings.MAX_PAYLOAD_BYTES)
    size = len(body.encode())
    if size > limit:
        raise InvalidEvent(f"payload is {size} bytes, over MAX_PAYLOAD_BYTES ({limit})")
    return body


def _require_utf8(text: str, what: str) -> int:
    """The UTF-8 size of ``text``; :class:`InvalidEvent` if it has none (lone surrogates)."""
    try:
        return len(text.encode())
    except UnicodeEncodeError as exc:
        raise InvalidEvent(f"{what} is not valid Unicode (it has a lone surrogate)") from exc


def validate_topic(topic: object) -> str:
    if not isinstance(topic, str) or not topic:
        raise InvalidEvent("topic must be a non-empty string")
    if len(topic) > TOPIC_MAX_LENGTH:
        raise InvalidEvent(f"topic is longer than {TOPIC_MAX_LENGTH} characters")
    if not TOPIC_RE.match(topic):
        raise InvalidEvent(
            f"topic {topic[:80]!r} is malformed: use dot-separated words of letters, "
            "digits, '_' and '-' (no wildcards, no empty words)"
        )
    return topic


def validate_headers(headers: object) -> dict[str, str]:
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise InvalidEvent("headers must be a mapping of strings to strings")
    clean: dict[str, str] = {}
    size = 0
    for name, value in headers.items():
        if not isinstance(name, str) or not name or "\x00" in name:
            raise InvalidEvent("header names must be non-empty strings without NUL")
        if name.lower().startswith(RESERVED_HEADER_PREFIX):
            raise InvalidEvent(f"header {name[:80]!r} uses the reserved prefix 'x-'")
        if not isinstance(value, str):
            raise InvalidEvent(f"header {name[:80]!r} must be a string, not {type(value).__name__}")
        if "\x00" in value:
            raise InvalidEvent(f"header {name[:80]!r} contains a NUL character")
        name_size = _require_utf8(name, "a header name")
        if name_size > SHORTSTR_MAX_BYTES:
            raise InvalidEvent(f"header name {name[:80]!r} is over {SHORTSTR_MAX_BYTES} bytes")
        size += name_size + _require_utf8(value, f"header {name[:80]!r}")
        clean[name] = value
    if size > MAX_HEADERS_BYTES:
        raise InvalidEvent(f"headers are {size} bytes, over {MAX_HEADERS_BYTES}")
    return clean


def _validate_optional_id(
    value: object, what: str, limit: int, max_bytes: int = 4 * KEY_MAX_LENGTH
) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or value != value.strip():
        raise InvalidEvent(f"{what} must be a non-empty string without surrounding spaces")
    if len(value) > limit:
        raise InvalidEvent(f"{what} is longer than {limit} characters")
    if any(ord(ch) < 32 for ch in value):
        raise InvalidEvent(f"{what} must not contain control characters")
    if _require_utf8(value, what) > max_bytes:
        raise InvalidEvent(f"{what} is longer than {max_bytes} bytes (UTF-8)")
    return value


def validate_delay(delay: object) -> timedelta:
    if delay is None:
        return timedelta(0)
    if isinstance(delay, bool) or not isinstance(delay, int | float | timedelta):
        raise InvalidEvent("delay must be a number of seconds or a timedelta")
    try:
        seconds = delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
    except OverflowError as exc:
        raise InvalidEvent("delay is too large") from exc
    if not seconds >= 0 or seconds == float("inf"):
        raise InvalidEvent("delay must be a finite, non-negative duration")
    if seconds > MAX_DELAY.total_seconds():
        raise InvalidEvent(f"delay must be at most {MAX_DELAY.days} days")
    return timedelta(seconds=seconds)


def publish_event(
    topic: str,
    payload: Any,
    *,
    key: str | None = None,
    headers: Mapping[str, str] | None = None,
    message_id: str | None = None,
    delay: float | timedelta | None = None,
    using: str | None = None,
) -> OutboxMessage:
    """Store an event in the outbox as part of the caller's database transaction.

    The business change and the event commit or roll back together.  Once the
    transaction commits (and unless ``PUBLISH_ON_COMMIT`` is off or the event is
    delayed), the event is published at once; whatever that misses the relay sends.

    Raises :class:`~reliable_events.exceptions.InvalidEvent` before anything is written
    when the input is bad, including anything the broker would refuse on every publish
    (which would also fail the batch it is in): a ``message_id`` or header name over 255
    UTF-8 bytes, headers over ``MAX_HEADERS_BYTES`` in all, text that is not valid
    Unicode (lone surrogates) or contains NUL.  With ``message_id`` the call is
    idempotent: the same id stores one message (a different event under a used id is an
    ``InvalidEvent``).
    """
    topic = validate_topic(topic)
    body = checked_payload(payload)
    clean_headers = validate_headers(headers)
    key = _validate_optional_id(key, "key", KEY_MAX_LENGTH)
    given_id = _validate_optional_id(
        message_id, "message_id", MESSAGE_ID_MAX_LENGTH, SHORTSTR_MAX_BYTES
    )
    wait = validate_delay(delay)
    alias = write_alias(OutboxMessage, using)
    # Store the payload exactly as it will go on the wire (tuples become lists, etc.).
    stored_payload = json.loads(body)

    when = hold(alias, delay=wait)
    message = new_row(
        message_id=given_id,
        topic=topic,
        key=key,
        payload=stored_payload,
        headers=clean_headers,
        due=when.due,
    )
    message.headers = tracing.stamp(message.headers, topic=topic, message_id=message.message_id)
    stored = insert(message, alias, on_commit=when.on_commit, idempotent=given_id is not None)
    if stored is message:
        signals.event_stored.send(sender=OutboxMessage, message=message, using=alias)
    return stored
