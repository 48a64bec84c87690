"""How does a row get into the outbox? The one writer of ``OutboxMessage`` rows.

Every outbox row is built by :func:`new_row` and inserted by :func:`insert` (one row) or
:func:`insert_many` (a batch, one statement): ``publish_event``, the dead-letter retry and
edit-and-retry (``deadletters``) and the outbox retry scheduler (``consumer/retries.py``).
So the ordering lane, the JSON ``null`` body, the on-commit reservation (:func:`hold`) and
the hand-over to the on-commit hook are decided here and only here.  Validation of what a
caller passes in stays with the caller (``publishing.publish_event``).
"""

from __future__ import annotations

import logging
import threading
import uuid
import zlib
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from django.db import IntegrityError, transaction
from django.db.models import JSONField, Value
from django.db.models.functions import Now
from django.utils import timezone

from reliable_events import tracing
from reliable_events.conf import app_settings
from reliable_events.db import is_postgres
from reliable_events.exceptions import InvalidEvent
from reliable_events.models import OutboxMessage
from reliable_events.relay.on_commit import publish_after_commit

logger = logging.getLogger(__name__)

_MAX_TRACKED_IDS = 10_000


def lane_for(key: str | None, message_id: str) -> int:
    """The ordering lane of an event: fixed by its key (or its id when it has no key)."""
    lanes = max(1, int(app_settings.LANES))
    return zlib.crc32((key if key is not None else message_id).encode()) % lanes


def json_value(value: Any) -> Any:
    """``value`` ready for a non-null JSONField: JSON ``null`` rather than SQL NULL."""
    return Value(None, JSONField()) if value is None else value


def on_commit_due(alias: str) -> datetime | Now:
    """``next_attempt_at`` of a row the on-commit hook will publish.

    PostgreSQL: due at once, on the database's clock (the transaction's ``now()``).  The
    hook and the relay never publish a lane at the same time (lane locks), so the relay
    needs no reservation to stay off the hook's rows, and a row the hook misses is not
    left waiting.  Elsewhere (SQLite, no lane locks): reserved for the hook for
    ``ON_COMMIT_GRACE_SECONDS``; the relay takes it after that.
    """
    if is_postgres(alias):
        return Now()
    return timezone.now() + timedelta(seconds=float(app_settings.ON_COMMIT_GRACE_SECONDS))


class Hold(NamedTuple):
    """When a new row is due, and whether the on-commit hook publishes it."""

    due: datetime | Now
    on_commit: bool


def hold(alias: str, *, delay: timedelta = timedelta(0), on_commit: bool = True) -> Hold:
    """The hold of a new row: reserved for the on-commit hook (:func:`on_commit_due`) when
    ``on_commit`` is wanted, ``PUBLISH_ON_COMMIT`` is on and there is no ``delay``; else
    due after ``delay`` (the relay sends it).  Due at once means the database's ``now()``,
    the clock the relay's claim compares with (this process's clock may be ahead of it,
    and on SQLite it counts microseconds where the database's counts milliseconds)."""
    if on_commit and bool(app_settings.PUBLISH_ON_COMMIT) and not delay:
        return Hold(on_commit_due(alias), True)
    return Hold(timezone.now() + delay if delay else Now(), False)


def new_row(
    *,
    topic: str,
    payload: Any,
    due: datetime | Now,
    message_id: str | None = None,
    key: str | None = None,
    headers: Mapping[str, Any] | None = None,
    queue: str = "",
) -> OutboxMessage:
    """The unsaved outbox row of one message: the only place an ``OutboxMessage`` is built.

    ``message_id`` defaults to a new UUID; the lane follows from ``key`` (or the id);
    ``queue`` addresses one consumer queue (a retry) instead of the topic; a ``None``
    payload is stored as JSON ``null``.  ``headers`` are copied, so a caller (or a hook
    adding headers here, such as trace context) never changes the caller's mapping.
    Save it with :func:`insert` or :func:`insert_many`.
    """
    message_id = message_id or str(uuid.uuid4())
    return OutboxMessage(
        message_id=message_id,
        topic=topic,
        key=key,
        lane=lane_for(key, message_id),
        queue=queue,
        payload=json_value(payload),
        headers=dict(headers or {}),
        next_attempt_at=due,
    )


def insert(
    row: OutboxMessage, alias: str, *, on_commit: bool, idempotent: bool = False
) -> OutboxMessage:
    """Insert ``row`` (from :func:`new_row`) in the caller's transaction; with
    ``on_commit``, the transaction's on-commit hook publishes it.

    ``idempotent``: if the row's message id is taken, return the stored row instead (or
    :class:`InvalidEvent` when it stores a different event); nothing is scheduled then.
    """
    if idempotent:
        existing = _insert_once(row, alias)
        if existing is not None:
            return existing
    else:
        row.save(using=alias, force_insert=True)
    _settle(row)
    if on_commit:
        schedule_on_commit(row.pk, alias)
    return row


def insert_many(
    rows: Sequence[OutboxMessage], alias: str, *, on_commit: bool
) -> list[OutboxMessage]:
    """Insert ``rows`` (from :func:`new_row`) in one statement, in the caller's
    transaction; with ``on_commit``, its on-commit hook publishes them."""
    created = OutboxMessage.objects.using(alias).bulk_create(rows)
    for row in created:
        _settle(row)
        if on_commit and row.pk is not None:
            schedule_on_commit(row.pk, alias)
    return created


def _settle(row: OutboxMessage) -> None:
    """Plain values again on a saved row: the payload, and the database's ``now()``."""
    if isinstance(row.payload, Value):
        row.payload = row.payload.value
    if not isinstance(row.next_attempt_at, datetime):  # stored as the database's now()
        row.next_attempt_at = row.created_at


def _insert_once(row: OutboxMessage, alias: str) -> OutboxMessage | None:
    """Insert ``row``; if its id is taken, return the stored row instead."""
    try:
        with transaction.atomic(using=alias):
            row.save(using=alias, force_insert=True)
    except IntegrityError as exc:
        existing = (
            OutboxMessage.objects.using(alias).filter(message_id=row.message_id, queue="").first()
        )
        if existing is None:
            raise
        payload = row.payload.value if isinstance(row.payload, Value) else row.payload
        same = (
            existing.topic == row.topic
            and existing.key == row.key
            and existing.payload == payload
            and tracing.without_context(existing.headers) == tracing.without_context(row.headers)
        )
        if not same:
            raise InvalidEvent(
                f"message_id {row.message_id[:80]!r} is already used by a different event"
            ) from exc
        return existing
    return None


class _CommitTracker(threading.local):
    """Ids stored by this thread that the next on-commit hook should publish."""

    def __init__(self) -> None:
        self.ids: dict[str, list[int]] = {}


_tracker = _CommitTracker()


def schedule_on_commit(pk: int, alias: str) -> None:
    """Have the on-commit hook of ``alias``'s current transaction publish row ``pk``."""
    ids = _tracker.ids.setdefault(alias, [])
    ids.append(pk)
    if len(ids) > _MAX_TRACKED_IDS:  # only after many rolled-back transactions
        del ids[: len(ids) - _MAX_TRACKED_IDS]
    transaction.on_commit(lambda: _flush(alias), using=alias)


def _flush(alias: str) -> None:
    """The on-commit hook: publish every id this thread stored, never raising.

    Each insert registers a call; the first one publishes all ids of the transaction and
    the rest find nothing to do.  Ids of rolled-back transactions may be among them: the
    dispatcher only publishes rows that exist and are still pending.
    """
    ids = _tracker.ids.pop(alias, None)
    if not ids:
        return
    try:
        publish_after_commit(ids, using=alias)
    except Exception:  # the caller's transaction is committed: never turn it into a 500
        logger.exception("reliable_events: on-commit publish failed; the relay will send")
