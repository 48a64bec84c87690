"""Dead-letter triage: the one service behind ``retry_dead_letters``, the admin and the API.

Retrying a dead letter writes an outbox row addressed to that consumer's queue only
(``OutboxMessage.queue``) and marks the dead letter ``retried`` in the same
transaction; the row is then published with a confirm (on commit, or by the relay).
So a retry is never lost and never reaches the topic's other subscribers.

A dead letter of an *ordered* consumer is not re-published (its queues are partitions):
retry and discard release its key instead (:mod:`reliable_events.consumer.holds`), and
the consumer applies it - and then the events parked behind it - in order.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from django.db.models import Count, OuterRef, QuerySet, Subquery
from django.db.models.functions import Coalesce
from django.utils import timezone

from reliable_events.broker import open_publisher
from reliable_events.consumer import EventConsumer, registry
from reliable_events.consumer.holds import release, release_reason
from reliable_events.consumer.wire import NOT_JSON, TOO_LARGE, UNDECODABLE, WRONG_CONTENT_TYPE
from reliable_events.db import own_transaction, write_alias
from reliable_events.exceptions import InvalidEvent, ReliableEventsError, UnknownConsumer
from reliable_events.models import DeadLetter, OutboxMessage, TriageEntry
from reliable_events.outbox import Hold, hold, insert, insert_many, new_row
from reliable_events.publishing import checked_payload
from reliable_events.topology import full_topology

logger = logging.getLogger(__name__)

#: Header of an edited copy naming the message id it replaces.
COPY_OF_HEADER = "re-copy-of"
#: Poison reasons whose body is not a payload that could be delivered again.
_UNREADABLE_BODY = frozenset({NOT_JSON, TOO_LARGE, UNDECODABLE, WRONG_CONTENT_TYPE})


@dataclass
class TriageResult:
    """What a retry or discard did: the ids it changed and why it skipped the others."""

    done: list[int] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)
    #: Outbox rows a retry wrote (one per retried dead letter): the re-deliveries.
    outbox_ids: list[int] = field(default_factory=list)
    #: Edit and retry: the new message id of each published copy (by dead-letter id).
    copies: dict[int, str] = field(default_factory=dict)
    #: Retries skipped because their consumer is not registered here (see ``force``).
    unregistered: list[int] = field(default_factory=list)
    #: What went wrong on the side (the consumers' queues could not be declared).
    warnings: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.done)

    def summary(self, verb: str) -> str:
        text = f"{verb} {len(self.done)} dead letter(s)"
        if self.skipped:
            text += f", skipped {len(self.skipped)}"
        return text


def _alias(using: str | None) -> str:
    return write_alias(DeadLetter, using)


def select(
    *,
    ids: Iterable[int] | None = None,
    consumer: str | None = None,
    fingerprint: str | None = None,
    everything: bool = False,
    upto: int | None = None,
    using: str | None = None,
) -> QuerySet[DeadLetter]:
    """Open dead letters chosen by id, consumer, fingerprint, or all of them.

    ``upto`` keeps only ids up to it: the letters a user saw, not those that arrived since.
    """
    query = DeadLetter.objects.using(_alias(using)).open()
    if ids is None and consumer is None and fingerprint is None and not everything:
        return query.none()
    if ids is not None:
        query = query.filter(pk__in=list(ids))
    if consumer is not None:
        query = query.for_consumer(consumer)
    if fingerprint is not None:
        query = query.filter(fingerprint=fingerprint)
    if upto is not None:
        query = query.filter(pk__lte=upto)
    return query.order_by("id")


def with_retry_counts(query: QuerySet[DeadLetter]) -> QuerySet[DeadLetter]:
    """``query`` annotated with ``retry_count``: retries (plain or edited) of each letter's
    message for its consumer so far, from the audit trail (one correlated, indexed count)."""
    retries = (
        TriageEntry.objects.filter(consumer=OuterRef("consumer"), message_id=OuterRef("message_id"))
        .exclude(message_id="")
        .exclude(action=TriageEntry.Action.DISCARD)
        .order_by()
        .values("consumer")
        .annotate(n=Count("id"))
        .values("n")[:1]
    )
    return query.annotate(retry_count=Coalesce(Subquery(retries), 0))


def retry_block_reason(letter: DeadLetter) -> str | None:
    """Why ``letter`` cannot be retried, or ``None`` when it can."""
    if letter.status != DeadLetter.Status.OPEN:
        return f"it is {letter.status}, not open"
    if not letter.message_id:
        return "the message had no id"
    # An empty body has no raw text either: the reason tells it from a JSON ``null``.
    if letter.payload is None and letter.reason == TOO_LARGE:
        return "its body was over MAX_PAYLOAD_BYTES and was not kept whole"
    if letter.payload is None and (letter.raw_body or letter.reason in _UNREADABLE_BODY):
        return "the body was not valid JSON"
    if not (letter.queue or letter.consumer):
        return "the consumer queue is unknown"
    return None


def prepare_queues(
    consumers_by_id: Mapping[int, str], *, declare: bool = True
) -> tuple[dict[int, str], list[str]]:
    """Make sure the queues retries of the dead letters ``consumers_by_id`` (each one's
    consumer, by id) go to exist on the broker.

    A retry is published through the default exchange straight to the consumer's queue
    (mandatory: the broker returns it when that queue does not exist, and the outbox row
    then fails with backoff until it is dead, holding back its key's later events
    meanwhile).  So: letters whose consumer is not registered in this process are
    returned as ``{id: reason}`` (not to be retried without ``force``), and the topology
    of the registered ones is declared (idempotent; not when ``declare`` is false: a
    dry run).  The second value lists warnings (the broker could not be reached: the
    relay will publish later, once the queues exist if their consumers have started).
    """
    unknown: dict[int, str] = {}
    consumers = {}
    for pk, name in consumers_by_id.items():
        if not name:
            continue  # no consumer to check: nothing to retry it to (``retry_block_reason``)
        try:
            consumers[name] = registry.get(name)
        except UnknownConsumer:
            unknown[pk] = (
                f"no consumer named {name!r} is registered here, so its queue may not exist "
                "(the broker would return the re-delivery)"
            )
    warnings: list[str] = []
    if consumers and declare:
        specs = [spec for cls in consumers.values() for spec in cls.queue_specs()]
        exchanges = [spec for cls in consumers.values() for spec in cls.exchange_specs()]
        publisher = open_publisher()
        try:
            publisher.declare(full_topology(specs, exchanges))
        except ReliableEventsError as exc:
            warnings.append(f"could not declare the consumer queues: {exc}")
        finally:
            publisher.close()
    return unknown, warnings


def edit_block_reason(letter: DeadLetter) -> str | None:
    """Why ``letter`` cannot be edited and retried as a copy, or ``None``."""
    if ordered_consumer(letter) is not None:
        return (
            "an ordered consumer's dead letter is retried as it is (or discarded), "
            "in order; edit-and-retry would re-deliver it out of order"
        )
    return None


def ordered_consumer(letter: DeadLetter) -> type[EventConsumer] | None:
    """The registered ordered consumer of ``letter``, if it is one."""
    try:
        cls = registry.get(letter.consumer)
    except UnknownConsumer:
        return None
    return cls if cls.ordered else None


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


def _redelivery(
    letter: DeadLetter,
    *,
    message_id: str,
    payload: Any,
    when: Hold,
    extra_headers: dict[str, str] | None = None,
) -> OutboxMessage:
    """The outbox row re-delivering ``letter`` to its consumer's queue only."""
    headers = {
        k: v
        for k, v in (letter.headers or {}).items()
        if isinstance(v, str) and not k.lower().startswith("x-")
    }
    return new_row(
        message_id=message_id,
        topic=letter.topic or "retry",
        key=letter.key or None,
        queue=letter.queue or letter.consumer,
        payload=payload,
        headers={**headers, **(extra_headers or {})},
        due=when.due,
    )


def _entry(
    letter: DeadLetter, action: str, *, user: str, source: str, note: str, **extra: Any
) -> TriageEntry:
    return TriageEntry(
        dead_letter_id=letter.pk,
        consumer=letter.consumer,
        message_id=letter.message_id,
        action=action,
        user=user[:150],
        source=source[:50],
        note=note,
        **extra,
    )


def _resolve(letter: DeadLetter, status: str, *, user: str, note: str) -> None:
    letter.status = status
    letter.resolved_at = timezone.now()
    letter.resolved_by = user[:150]
    letter.note = note


def retry(
    letters: Iterable[DeadLetter] | QuerySet[DeadLetter],
    *,
    user: str = "",
    note: str = "",
    source: str = "",
    using: str | None = None,
    dry_run: bool = False,
    force: bool = False,
) -> TriageResult:
    """Re-deliver each open dead letter to its consumer's queue and mark it retried.

    First the queues of the consumers involved are declared (:func:`prepare_queues`);
    dead letters of a consumer not registered in this process are skipped unless
    ``force``.  Each retry leaves a :class:`TriageEntry` (who, when, from where, the
    note, the outbox row) in the same transaction.
    """
    alias = _alias(using)
    result = TriageResult()
    ids = [letter.pk for letter in letters]
    if not ids:
        return result
    result.unregistered, ids = _check_consumers(alias, ids, result, dry_run=dry_run, force=force)
    with own_transaction(alias):
        locked = _lock(alias, ids, result)
        retried: list[DeadLetter] = []
        released: list[DeadLetter] = []
        when = hold(alias)
        for letter in locked:
            reason = retry_block_reason(letter)
            ordered = ordered_consumer(letter)
            if reason is None and ordered is not None:
                reason = release_reason(alias, ordered, letter)
            if reason is not None:
                result.skipped[letter.pk] = reason
                continue
            result.done.append(letter.pk)
            (retried if ordered is None else released).append(letter)
        if not dry_run and released:
            _release(alias, released, retry=True, user=user, source=source, note=note)
        if not dry_run and retried:
            created = insert_many(
                [
                    _redelivery(
                        letter, message_id=letter.message_id, payload=letter.payload, when=when
                    )
                    for letter in retried
                ],
                alias,
                on_commit=when.on_commit,
            )
            for letter in retried:
                _resolve(letter, DeadLetter.Status.RETRIED, user=user, note=note)
            DeadLetter.objects.using(alias).bulk_update(
                retried, ["status", "resolved_at", "resolved_by", "note"]
            )
            TriageEntry.objects.using(alias).bulk_create(
                _entry(
                    letter,
                    TriageEntry.Action.RETRY,
                    user=user,
                    source=source,
                    note=note,
                    outbox_id=row.pk,
                )
                for letter, row in zip(retried, created, strict=True)
            )
            result.outbox_ids.extend(row.pk for row in created if row.pk is not None)
    if result.done and not dry_run:
        logger.info("reliable_events: %s by %s", result.summary("retried"), user or "system")
    return result


def _check_consumers(
    alias: str, ids: list[int], result: TriageResult, *, dry_run: bool, force: bool
) -> tuple[list[int], list[int]]:
    """:func:`prepare_queues` for the dead letters ``ids`` (their consumers read in one
    query): the ids of unregistered consumers, and the ids to go on with (those skipped
    with their reason unless ``force``)."""
    consumers = dict(
        DeadLetter.objects.using(alias).filter(pk__in=ids).values_list("pk", "consumer")
    )
    unknown, result.warnings = prepare_queues(consumers, declare=not dry_run)
    if force or not unknown:
        return [], ids
    result.skipped.update(unknown)
    return sorted(unknown), [pk for pk in ids if pk not in unknown]


def _release(
    alias: str, letters: list[DeadLetter], *, retry: bool, user: str, source: str, note: str
) -> None:
    """Dead letters of ordered consumers: release their keys (the consumer applies them)."""
    for letter in letters:
        cls = ordered_consumer(letter)
        if cls is not None:
            release(alias, cls, letter, retry=retry)
    if not retry:
        return
    for letter in letters:
        _resolve(letter, DeadLetter.Status.RETRIED, user=user, note=note)
    DeadLetter.objects.using(alias).bulk_update(
        letters, ["status", "resolved_at", "resolved_by", "note"]
    )
    TriageEntry.objects.using(alias).bulk_create(
        _entry(letter, TriageEntry.Action.RETRY, user=user, source=source, note=note)
        for letter in letters
    )


def changed_keys(before: Any, after: Any) -> list[str]:
    """Top-level keys whose value an edit changed, added or removed (``["(body)"]`` when
    either side is not an object)."""
    if not (isinstance(before, dict) and isinstance(after, dict)):
        return [] if before == after else ["(body)"]
    return sorted(
        k for k in before.keys() | after.keys() if before.get(k, ...) != after.get(k, ...)
    )


def edit_and_retry(
    letter: DeadLetter,
    payload: Any,
    *,
    user: str,
    note: str = "",
    source: str = "",
    using: str | None = None,
    force: bool = False,
) -> TriageResult:
    """Publish an edited copy of ``letter`` under a **new** message id and mark it retried.

    The consumer already knows the original id (a dead letter after failed attempts,
    or, for another consumer of the topic, a processed one), so a copy under the same id
    could be swallowed as a duplicate.  The copy goes to this consumer's queue only; the
    :class:`TriageEntry` links the original id to the copy's and keeps both payloads.
    Letters that had no message id or were not JSON may be edited too: that is the fix.
    A letter of a consumer not registered here is skipped unless ``force`` (as by
    :func:`retry`).
    """
    alias = _alias(using)
    result = TriageResult()
    try:
        checked_payload(payload)
    except InvalidEvent as exc:  # publish_event's rule: the copy must be publishable
        result.skipped[letter.pk] = str(exc)
        return result
    result.unregistered, ids = _check_consumers(
        alias, [letter.pk], result, dry_run=False, force=force
    )
    if not ids:
        return result
    with own_transaction(alias):
        locked = _lock(alias, ids, result)
        if not locked:
            return result
        current = locked[0]
        if current.status != DeadLetter.Status.OPEN:
            result.skipped[current.pk] = f"it is {current.status}, not open"
            return result
        if not (current.queue or current.consumer):
            result.skipped[current.pk] = "the consumer queue is unknown"
            return result
        blocked = edit_block_reason(current)
        if blocked is not None:
            result.skipped[current.pk] = blocked
            return result
        when = hold(alias)
        copy_id = str(uuid.uuid4())
        row = _redelivery(
            current,
            message_id=copy_id,
            payload=payload,
            when=when,
            extra_headers={COPY_OF_HEADER: current.message_id} if current.message_id else None,
        )
        insert(row, alias, on_commit=when.on_commit)
        _resolve(current, DeadLetter.Status.RETRIED, user=user, note=note)
        current.save(using=alias, update_fields=["status", "resolved_at", "resolved_by", "note"])
        _entry(
            current,
            TriageEntry.Action.EDIT_RETRY,
            user=user,
            source=source,
            note=note,
            outbox_id=row.pk,
            copy_message_id=copy_id,
            changes={
                "before": current.payload,
                "after": payload,
                "changed": changed_keys(current.payload, payload),
            },
        ).save(using=alias)
        result.done.append(current.pk)
        result.outbox_ids.append(row.pk)
        result.copies[current.pk] = copy_id
    logger.info(
        "reliable_events: %s edited dead letter %s and retried it as message %s",
        user or "system",
        letter.pk,
        copy_id,
    )
    return result


def discard(
    letters: Iterable[DeadLetter] | QuerySet[DeadLetter],
    *,
    note: str = "",
    user: str = "",
    source: str = "",
    using: str | None = None,
    dry_run: bool = False,
) -> TriageResult:
    """Mark each open dead letter discarded, with a note saying why (and an audit entry)."""
    alias = _alias(using)
    result = TriageResult()
    ids = [letter.pk for letter in letters]
    if not ids:
        return result
    with own_transaction(alias):
        locked = _lock(alias, ids, result)
        discarded: list[DeadLetter] = []
        for letter in locked:
            ordered = ordered_consumer(letter)
            reason = None if ordered is None else release_reason(alias, ordered, letter)
            if letter.status != DeadLetter.Status.OPEN:
                result.skipped[letter.pk] = f"it is {letter.status}, not open"
            elif reason is not None:
                result.skipped[letter.pk] = reason
            else:
                result.done.append(letter.pk)
                discarded.append(letter)
        if discarded and not dry_run:
            _release(alias, discarded, retry=False, user=user, source=source, note=note)
            DeadLetter.objects.using(alias).filter(pk__in=result.done).update(
                status=DeadLetter.Status.DISCARDED,
                resolved_at=timezone.now(),
                resolved_by=user[:150],
                note=note,
            )
            TriageEntry.objects.using(alias).bulk_create(
                _entry(letter, TriageEntry.Action.DISCARD, user=user, source=source, note=note)
                for letter in discarded
            )
    return result
