"""Dead-letter triage: the one service behind ``retry_dead_letters``, the admin and the API.

Retrying a dead letter writes an outbox row addressed to that consumer's queue only
(``OutboxMessage.queue``) and marks the dead letter ``retried`` in the same
transaction; the row is then published with a confirm (on commit, or by the relay).
So a retry is never lost and never reaches the topic's other subscribers.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

from django.db import DEFAULT_DB_ALIAS, router, transaction
from django.db.models import QuerySet
from django.utils import timezone

from reliable_events.conf import app_settings
from reliable_events.models import DeadLetter, OutboxMessage
from reliable_events.publishing import json_value, lane_for, on_commit_due, schedule_on_commit

logger = logging.getLogger(__name__)


@dataclass
class TriageResult:
    """What a retry or discard did: the ids it changed and why it skipped the others."""

    done: list[int] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)
    #: Outbox rows a retry wrote (one per retried dead letter): the re-deliveries.
    outbox_ids: list[int] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.done)

    def summary(self, verb: str) -> str:
        text = f"{verb} {len(self.done)} dead letter(s)"
        if self.skipped:
            text += f", skipped {len(self.skipped)}"
        return text


def _alias(using: str | None) -> str:
    return using or router.db_for_write(DeadLetter) or DEFAULT_DB_ALIAS


def select(
    *,
    ids: Iterable[int] | None = None,
    consumer: str | None = None,
    fingerprint: str | None = None,
    everything: bool = False,
    using: str | None = None,
) -> QuerySet[DeadLetter]:
    """Open dead letters chosen by id, consumer, fingerprint, or all of them."""
    query = DeadLetter.objects.using(_alias(using)).open()
    if ids is None and consumer is None and fingerprint is None and not everything:
        return query.none()
    if ids is not None:
        query = query.filter(pk__in=list(ids))
    if consumer is not None:
        query = query.for_consumer(consumer)
    if fingerprint is not None:
        query = query.filter(fingerprint=fingerprint)
    return query.order_by("id")


def retry_block_reason(letter: DeadLetter) -> str | None:
    """Why ``letter`` cannot be retried, or ``None`` when it can."""
    if letter.status != DeadLetter.Status.OPEN:
        return f"it is {letter.status}, not open"
    if not letter.message_id:
        return "the message had no id"
    if letter.payload is None and letter.raw_body:
        return "the body was not valid JSON"
    if not (letter.queue or letter.consumer):
        return "the consumer queue is unknown"
    return None


def prepare_queues(letters: Iterable[DeadLetter]) -> tuple[dict[int, str], list[str]]:
    """Make sure the queues retries of ``letters`` go to exist on the broker.

    A retry is published through the default exchange straight to the consumer's queue;
    RabbitMQ silently drops (and still confirms) a message for a queue that does not
    exist.  So: letters whose consumer is not registered in this process are returned
    as ``{id: reason}`` (the caller should not retry them without checking), and the
    topology of the registered ones is declared (idempotent).  The second value lists
    warnings (the broker could not be reached: the relay will publish later, once the
    queues exist if their consumers have started).
    """
    from reliable_events.broker import open_publisher
    from reliable_events.consumer import registry
    from reliable_events.exceptions import ReliableEventsError, UnknownConsumer
    from reliable_events.topology import full_topology

    unknown: dict[int, str] = {}
    consumers = {}
    for letter in letters:
        try:
            consumers[letter.consumer] = registry.get(letter.consumer)
        except UnknownConsumer:
            unknown[letter.pk] = (
                f"no consumer named {letter.consumer!r} is registered here, so its queue "
                "may not exist (the broker would drop the re-delivery)"
            )
    warnings: list[str] = []
    if consumers:
        specs = [spec for cls in consumers.values() for spec in cls.queue_specs()]
        publisher = open_publisher()
        try:
            publisher.declare(full_topology(specs))
        except ReliableEventsError as exc:
            warnings.append(f"could not declare the consumer queues: {exc}")
        finally:
            publisher.close()
    return unknown, warnings


def _lock(alias: str, ids: list[int], result: TriageResult) -> list[DeadLetter]:
    """Lock the dead letters ``ids`` (in the caller's transaction); note the missing ones."""
    locked = list(
        DeadLetter.objects.using(alias).select_for_update().filter(pk__in=ids).order_by("id")
    )
    found = {letter.pk for letter in locked}
    for missing in ids:
        if missing not in found:
            result.skipped[missing] = "no such dead letter"
    return locked


def retry(
    letters: Iterable[DeadLetter] | QuerySet[DeadLetter],
    *,
    user: str = "",
    note: str = "",
    using: str | None = None,
    dry_run: bool = False,
) -> TriageResult:
    """Re-deliver each open dead letter to its consumer's queue and mark it retried."""
    alias = _alias(using)
    result = TriageResult()
    ids = [letter.pk for letter in letters]
    if not ids:
        return result
    with transaction.atomic(using=alias):
        locked = _lock(alias, ids, result)
        rows: list[OutboxMessage] = []
        now = timezone.now()
        # Like publish_event: due for the on-commit publish (see on_commit_due), else at once.
        on_commit = bool(app_settings.PUBLISH_ON_COMMIT)
        due = on_commit_due(alias) if on_commit else now
        for letter in locked:
            reason = retry_block_reason(letter)
            if reason is not None:
                result.skipped[letter.pk] = reason
                continue
            result.done.append(letter.pk)
            if dry_run:
                continue
            rows.append(
                OutboxMessage(
                    message_id=letter.message_id,
                    topic=letter.topic or "retry",
                    key=letter.key or None,
                    lane=lane_for(letter.key or None, letter.message_id or uuid.uuid4().hex),
                    queue=letter.queue or letter.consumer,
                    payload=json_value(letter.payload),
                    headers={
                        k: v
                        for k, v in (letter.headers or {}).items()
                        if isinstance(v, str) and not k.lower().startswith("x-")
                    },
                    next_attempt_at=due,
                )
            )
            letter.status = DeadLetter.Status.RETRIED
            letter.resolved_at = now
            letter.resolved_by = user[:150]
            letter.note = note
        if not dry_run and rows:
            created = OutboxMessage.objects.using(alias).bulk_create(rows)
            DeadLetter.objects.using(alias).bulk_update(
                [letter for letter in locked if letter.pk in result.done],
                ["status", "resolved_at", "resolved_by", "note"],
            )
            for row in created:
                if row.pk is None:  # pragma: no cover - every supported backend returns ids
                    continue
                result.outbox_ids.append(row.pk)
                if on_commit:
                    schedule_on_commit(row.pk, alias)
    if result.done and not dry_run:
        logger.info("reliable_events: %s by %s", result.summary("retried"), user or "system")
    return result


def discard(
    letters: Iterable[DeadLetter] | QuerySet[DeadLetter],
    *,
    note: str = "",
    user: str = "",
    using: str | None = None,
    dry_run: bool = False,
) -> TriageResult:
    """Mark each open dead letter discarded, with a note saying why."""
    alias = _alias(using)
    result = TriageResult()
    ids = [letter.pk for letter in letters]
    if not ids:
        return result
    with transaction.atomic(using=alias):
        locked = _lock(alias, ids, result)
        for letter in locked:
            if letter.status != DeadLetter.Status.OPEN:
                result.skipped[letter.pk] = f"it is {letter.status}, not open"
            else:
                result.done.append(letter.pk)
        if result.done and not dry_run:
            DeadLetter.objects.using(alias).filter(pk__in=result.done).update(
                status=DeadLetter.Status.DISCARDED,
                resolved_at=timezone.now(),
                resolved_by=user[:150],
                note=note,
            )
    return result
