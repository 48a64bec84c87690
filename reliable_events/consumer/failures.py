"""What does a failed attempt record? Fingerprints, clean error text and dead letters."""

from __future__ import annotations

import hashlib
import logging
import sysconfig
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any

from django.db import (
    DatabaseError,
    InterfaceError,
    connections,
)
from django.utils import timezone

from reliable_events import signals
from reliable_events.consumer.base import Event, HandlerResult
from reliable_events.consumer.db import database_guard
from reliable_events.consumer.wire import HISTORY_LIMIT, read_first_failed, read_history
from reliable_events.db import is_postgres, own_transaction
from reliable_events.models import (
    KEY_MAX_LENGTH,
    MESSAGE_ID_MAX_LENGTH,
    TOPIC_MAX_LENGTH,
    DeadLetter,
)
from reliable_events.sanitize import clean_text, error_summary, has_nul, json_safe, raw_text, redact

logger = logging.getLogger(__name__)

_TRACEBACK_LIMIT = 20_000


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


# -- dead letters ------------------------------------------------------------------------
@dataclass(frozen=True)
class DeadLetterRecord:
    """What one dead letter stores, as plain values: who, which message, why, and the
    failure (its error text, fingerprint, history and times)."""

    consumer: str
    queue: str
    message_id: str
    body: bytes
    headers: dict[str, Any]
    reason: str
    payload: Any
    #: The body as text, when there is no JSON payload to keep.
    raw_body: str
    topic: str
    key: str | None
    #: The last failed attempt (its number is the dead letter's ``attempts``).
    failure: Failure


def write_dead_letter(alias: str, record: DeadLetterRecord) -> DeadLetter:
    """Store (or, for a redelivered message, update) the open dead letter of a delivery.

    A consumer that died after writing a dead letter but before acking gets the message
    again and comes back here: the open dead letter of the same consumer and message id
    is updated rather than duplicated.  A payload PostgreSQL cannot store (a ``\\u0000``)
    is kept as raw text instead.  Raises :class:`DatabaseUnavailable` when the database
    is gone.
    """
    payload, raw_body, failure = record.payload, record.raw_body, record.failure
    if payload is not None and has_nul(payload):
        payload, raw_body = None, raw_text(record.body)
    message_id = clean_text(record.message_id, MESSAGE_ID_MAX_LENGTH)
    values: dict[str, Any] = {
        "queue": record.queue,
        "topic": clean_text(record.topic, TOPIC_MAX_LENGTH),
        "key": clean_text(record.key or "", KEY_MAX_LENGTH),
        "payload": payload,
        "raw_body": raw_body,
        "headers": json_safe(record.headers),
        "reason": record.reason[:50],
        "error_type": clean_text(failure.error_type, 200),
        "error_message": failure.error_message,
        "traceback": failure.traceback,
        "fingerprint": failure.fingerprint,
        "attempts": max(1, failure.attempt),
        "history": failure.history,
        "first_failed_at": failure.first_failed_at,
        "last_failed_at": failure.at,
    }
    try:
        with database_guard(alias, "writing a dead letter"):
            letter = _save_dead_letter(alias, record.consumer, message_id, values)
    except (DatabaseError, InterfaceError):
        # Not a lost connection: something in the values was refused.  Keep the essentials
        # (the body as text), never lose the message for want of a perfect record.
        logger.exception("reliable_events: dead letter refused; storing a minimal one")
        values.update(
            payload=None,
            raw_body=raw_text(record.body),
            headers={},
            error_message=clean_text(values["error_message"].encode("ascii", "replace"), 10_000),
            traceback=clean_text(values["traceback"].encode("ascii", "replace"), 20_000),
        )
        with database_guard(alias, "writing a dead letter"):
            letter = _save_dead_letter(alias, record.consumer, message_id, values)
    signals.event_dead_lettered.send(sender=DeadLetter, dead_letter=letter)
    return letter


def _dead_letter_lock_key(consumer: str, message_id: str) -> int:
    """A signed 64-bit advisory-lock key for one consumer's message id."""
    digest = hashlib.blake2b(f"{consumer}\x00{message_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _save_dead_letter(
    alias: str, consumer: str, message_id: str, values: dict[str, Any]
) -> DeadLetter:
    with own_transaction(alias):
        letter = None
        if message_id:
            if is_postgres(alias):
                # Two workers dead-lettering copies of one message at the same moment
                # (at-least-once delivery) must not both find "no open letter" and
                # insert two: serialise them on this (consumer, message id) until commit
                # (READ COMMITTED: the reads after the lock see what the other committed).
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
