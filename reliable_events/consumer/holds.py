"""Order-preserving dead letters: held keys, parked events and their release.

An ordered consumer with ``hold_key_on_dead_letter = True`` that dead-letters an event
of key ``K`` also writes a :class:`~reliable_events.models.KeyHold` (in the dead
letter's transaction).  From then on every later event of ``K`` it receives is parked
(:class:`~reliable_events.models.ParkedEvent`, in arrival order, acked) instead of
handled: nothing of ``K`` passes its dead head.

The dead-letter service (:mod:`reliable_events.deadletters`: admin, API, commands)
releases a key: *retry* sets the hold to ``retry``, *discard* to ``discard``.  Every
consumer process of that consumer looks for released holds at each heartbeat
(:func:`release_due`) and, holding the hold row's lock, applies the dead letter (on
retry), then the parked events one transaction each, in order, and deletes the hold
when none is left.  An event of ``K`` arriving meanwhile is parked behind them (parking
takes the same lock).  If one of them fails it becomes the key's new dead head: a dead
letter, and the hold is ``held`` again.

Retrying a dead letter of any ordered consumer goes the same way (a released hold
without parked events): its queues are partitions, not a queue a re-delivery could be
addressed to.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from django.db import transaction
from django.utils import timezone

from reliable_events.consumer.base import Event, EventConsumer, Outcome
from reliable_events.consumer.db import database_guard
from reliable_events.consumer.failures import DeadLetterRecord, Failure, write_dead_letter
from reliable_events.db import own_transaction
from reliable_events.models import DeadLetter, KeyHold, ParkedEvent
from reliable_events.sanitize import json_safe

logger = logging.getLogger(__name__)

#: Dead-letter reason of an event that failed when its held key was released.
FAILED_ON_RELEASE = "failed-on-release"


def holds_keys(cls: type[EventConsumer], event: Event) -> bool:
    return bool(cls.ordered and cls.hold_key_on_dead_letter and event.key is not None)


def is_held(cls: type[EventConsumer], key: str) -> bool:
    """Whether ``key`` is held (no lock: :func:`park` checks again under the lock)."""
    alias = cls.get_database()
    with database_guard(alias, "looking for a held key"):
        return KeyHold.objects.using(alias).filter(consumer=cls.name, key=key).exists()


def park(cls: type[EventConsumer], event: Event) -> bool:
    """Park ``event`` behind its held key; ``False`` when the key is not held (any more)."""
    alias = cls.get_database()
    with database_guard(alias, "parking an event"), own_transaction(alias):
        hold = (
            KeyHold.objects.using(alias)
            .select_for_update()
            .filter(consumer=cls.name, key=event.key)
            .first()
        )
        if hold is None:
            return False
        ParkedEvent.objects.using(alias).bulk_create(
            [
                ParkedEvent(
                    consumer=cls.name,
                    key=str(event.key),
                    message_id=event.id,
                    topic=event.topic,
                    payload=event.payload,
                    headers=json_safe(event.headers),
                    published_at=event.published_at,
                )
            ],
            ignore_conflicts=True,  # a redelivery is parked once
        )
    logger.warning(
        "reliable_events: %s parked %s: key %r is held by dead letter %d (retry or discard "
        "it to release the key)",
        cls.name,
        event.id,
        event.key,
        hold.dead_letter_id,
    )
    return True


def hold_key(alias: str, cls: type[EventConsumer], key: str | None, letter: DeadLetter) -> None:
    """Hold ``key`` behind ``letter`` (in the caller's transaction)."""
    if not (cls.ordered and cls.hold_key_on_dead_letter and key is not None):
        return
    rows = KeyHold.objects.using(alias)
    updated = rows.filter(consumer=cls.name, key=key).update(
        dead_letter_id=letter.pk, state=KeyHold.State.HELD, updated_at=timezone.now()
    )
    if not updated:
        rows.create(consumer=cls.name, key=key, dead_letter_id=letter.pk)
    logger.warning(
        "reliable_events: %s holds key %r behind dead letter %d: its later events are parked",
        cls.name,
        key,
        letter.pk,
    )


def held_by(alias: str, letter: DeadLetter) -> tuple[KeyHold, int] | None:
    """The key ``letter`` holds (an ordered consumer's, state held) and how many events
    are parked behind it, or ``None``."""
    if not letter.key:
        return None
    hold = (
        KeyHold.objects.using(alias)
        .filter(consumer=letter.consumer, key=letter.key, dead_letter_id=letter.pk)
        .filter(state=KeyHold.State.HELD)
        .first()
    )
    if hold is None:
        return None
    parked = ParkedEvent.objects.using(alias).filter(consumer=hold.consumer, key=hold.key)
    return hold, parked.count()


# -- release (the dead-letter service) ----------------------------------------------------
def release_reason(alias: str, cls: type[EventConsumer], letter: DeadLetter) -> str | None:
    """Why retrying or discarding ``letter`` cannot release its key, or ``None``."""
    hold = KeyHold.objects.using(alias).filter(consumer=cls.name, key=letter.key or None).first()
    if letter.key and hold is not None and hold.dead_letter_id != letter.pk:
        return (
            f"key {letter.key!r} is held by dead letter {hold.dead_letter_id}: retry or "
            "discard that one first"
        )
    return None


def release(alias: str, cls: type[EventConsumer], letter: DeadLetter, *, retry: bool) -> None:
    """Release ``letter``'s key (in the caller's transaction): with ``retry`` its event is
    applied again first, then the parked events follow."""
    state = KeyHold.State.RETRY if retry else KeyHold.State.DISCARD
    key = letter.key or None
    rows = KeyHold.objects.using(alias)
    if key is not None and rows.filter(consumer=cls.name, key=key).update(
        state=state, dead_letter_id=letter.pk, updated_at=timezone.now()
    ):
        return
    if retry:  # keyless, or no hold: the consumer applies it at its next heartbeat
        rows.create(consumer=cls.name, key=key, dead_letter_id=letter.pk, state=state)


# -- release (the consumer) ------------------------------------------------------------------
def release_due(consumer: EventConsumer, *, limit: int = 100) -> int:
    """Apply the released holds of ``consumer``; how many events were applied."""
    cls = type(consumer)
    alias = cls.get_database()
    with database_guard(alias, "looking for released keys"):
        ids = list(
            KeyHold.objects.using(alias)
            .filter(consumer=cls.name)
            .exclude(state=KeyHold.State.HELD)
            .order_by("id")
            .values_list("id", flat=True)[:limit]
        )
    return sum(_release_one(consumer, alias, pk) for pk in ids)


def _release_one(consumer: EventConsumer, alias: str, pk: int) -> int:
    applied = 0
    while True:
        with database_guard(alias, "releasing a held key"), transaction.atomic(using=alias):
            hold = (
                KeyHold.objects.using(alias)
                .select_for_update(skip_locked=True)
                .filter(pk=pk)
                .exclude(state=KeyHold.State.HELD)
                .first()
            )
            if hold is None:  # held again, done, or another process releases it
                return applied
            if hold.state == KeyHold.State.RETRY:
                letter = DeadLetter.objects.using(alias).filter(pk=hold.dead_letter_id).first()
                if letter is not None and not _apply(consumer, alias, hold, _letter_event(letter)):
                    return applied
                applied += letter is not None
                hold.state = KeyHold.State.DISCARD
                hold.save(update_fields=["state"])
                continue
            parked = (
                ParkedEvent.objects.using(alias)
                .filter(consumer=hold.consumer, key=hold.key)
                .order_by("id")
                .first()
                if hold.key is not None
                else None
            )
            if parked is None:
                hold.delete()
                logger.info("reliable_events: %s released key %r", hold.consumer, hold.key)
                return applied
            parked.delete()
            if not _apply(consumer, alias, hold, _parked_event(parked)):
                return applied
            applied += 1


def _apply(consumer: EventConsumer, alias: str, hold: KeyHold, event: Event) -> bool:
    """Apply ``event`` (a savepoint in the release transaction); on failure it becomes
    the key's new dead head and ``False`` is returned."""
    result = consumer.process(event)
    if result.outcome is not Outcome.FAILED:
        return True
    cls = type(consumer)
    failure = Failure.from_result(result, event, event.headers)
    letter = write_dead_letter(
        alias,
        DeadLetterRecord(
            consumer=cls.name,
            queue=cls.queue_of(event.headers),
            message_id=event.id,
            body=json.dumps(event.payload).encode(),
            headers=event.headers,
            reason=FAILED_ON_RELEASE,
            payload=event.payload,
            raw_body="",
            topic=event.topic,
            key=event.key,
            failure=failure,
        ),
    )
    logger.error(
        "reliable_events: %s: %s failed when key %r was released; dead letter %d holds it",
        cls.name,
        event.id,
        event.key,
        letter.pk,
    )
    if hold.key is None:
        hold.delete()
        return False
    hold.dead_letter_id = letter.pk
    hold.state = KeyHold.State.HELD
    hold.updated_at = timezone.now()
    hold.save(update_fields=["dead_letter_id", "state", "updated_at"])
    return False


def _letter_event(letter: DeadLetter) -> Event:
    headers: dict[str, Any] = dict(letter.headers or {})
    return Event(
        id=letter.message_id,
        topic=letter.topic,
        key=letter.key or None,
        payload=letter.payload,
        headers=headers,
        attempt=letter.attempts + 1,
    )


def _parked_event(parked: ParkedEvent) -> Event:
    return Event(
        id=parked.message_id,
        topic=parked.topic,
        key=parked.key,
        payload=parked.payload,
        headers=dict(parked.headers or {}),
        published_at=parked.published_at,
    )
