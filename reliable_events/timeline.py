"""Everything known about one message id, in time order: the on-call engineer's thread.

A message leaves a trail in several tables: its outbox row (attempts, last error, when
the broker confirmed it), the re-deliveries a retry wrote (outbox rows addressed to one
consumer's queue, same message id), each consumer's processed record, the dead letters
of the consumers that gave up, and the audit entries of whoever triaged them.  An edit
and retry publishes a copy under a new message id: the timeline follows the link both
ways (copies of this message, and the original this one is a copy of) and shows the
copies' records too, so "was the fix processed?" is answered on one page.

Every query is bounded (``LIMIT`` rows per table) and uses an index: ``message_id`` on
dead letters and audit entries, the outbox's two partial indexes (originals, and
re-deliveries), and ``(consumer, message_id)`` on processed records, asked for the
consumers registered in this process plus those that dead-lettered or triaged the message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from reliable_events.consumer import registry
from reliable_events.db import read_alias
from reliable_events.models import DeadLetter, OutboxMessage, ProcessedMessage, TriageEntry

#: Rows read per table (a message is retried a handful of times, not thousands).
LIMIT = 200
#: Edited copies followed from one message.
MAX_COPIES = 50
#: Consumers whose processed records are looked up.
MAX_CONSUMERS = 500
#: The fields of a timeline event, in the API's order.
KINDS = ("outbox", "redelivery", "processed", "dead-letter", "triage")


@dataclass(frozen=True)
class TimelineEvent:
    """One thing that happened to the message (or to one of its copies)."""

    at: datetime | None
    kind: str
    message_id: str
    summary: str
    #: ``(model name, pk)`` of the row behind the event, for a link.
    row: tuple[str, int]
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat() if self.at else None,
            "kind": self.kind,
            "message_id": self.message_id,
            "summary": self.summary,
            "model": self.row[0],
            "id": self.row[1],
            "details": self.details,
        }


@dataclass
class Timeline:
    message_id: str
    #: Message ids of edited copies published in place of this one.
    copies: list[str]
    #: The message id this one is an edited copy of ("" when it is an original).
    copy_of: str
    outbox: list[OutboxMessage]
    processed: list[ProcessedMessage]
    dead_letters: list[DeadLetter]
    entries: list[TriageEntry]
    events: list[TimelineEvent]

    @property
    def found(self) -> bool:
        return bool(self.events)

    def retry_counts(self) -> dict[str, int]:
        """Retries (plain or edited) per consumer."""
        counts: dict[str, int] = {}
        for entry in self.entries:
            if entry.action != TriageEntry.Action.DISCARD:
                counts[entry.consumer] = counts.get(entry.consumer, 0) + 1
        return counts

    def as_dict(self) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "copies": self.copies,
            "copy_of": self.copy_of,
            "retries_by_consumer": self.retry_counts(),
            "events": [event.as_dict() for event in self.events],
        }


def _outbox_event(row: OutboxMessage) -> TimelineEvent:
    where = f"to queue {row.queue}" if row.queue else f"on topic {row.topic}"
    if row.status == OutboxMessage.Status.SENT:
        state = "sent"
    elif row.status == OutboxMessage.Status.DEAD:
        state = "dead in the outbox"
    else:
        state = "pending"
    summary = f"{'re-delivery' if row.queue else 'published'} {where}: {state}"
    summary += f" after {row.attempts} attempt(s)" if row.attempts else ""
    return TimelineEvent(
        at=row.created_at,
        kind="redelivery" if row.queue else "outbox",
        message_id=row.message_id,
        summary=summary,
        row=("outboxmessage", row.pk),
        details={
            "status": row.status,
            "attempts": row.attempts,
            "sent_at": row.sent_at.isoformat() if row.sent_at else None,
            "last_error": row.last_error[:500],
        },
    )


def _processed_event(row: ProcessedMessage) -> TimelineEvent:
    return TimelineEvent(
        at=row.processed_at,
        kind="processed",
        message_id=row.message_id,
        summary=f"processed by {row.consumer}",
        row=("processedmessage", row.pk),
    )


def _dead_letter_event(row: DeadLetter) -> TimelineEvent:
    error = row.error_type.rsplit(".", 1)[-1] if row.error_type else row.reason
    return TimelineEvent(
        at=row.created_at,
        kind="dead-letter",
        message_id=row.message_id,
        summary=f"dead-lettered by {row.consumer} after {row.attempts} attempt(s): "
        f"{error}; now {row.status}",
        row=("deadletter", row.pk),
        details={"status": row.status, "reason": row.reason, "error": row.error_message[:500]},
    )


def _entry_event(entry: TriageEntry) -> TimelineEvent:
    verb = {"retry": "retried", "discard": "discarded", "edit-retry": "edited and retried"}
    summary = f"{entry.user or 'system'} {verb.get(entry.action, entry.action)} "
    summary += f"dead letter #{entry.dead_letter_id}"
    if entry.source:
        summary += f" ({entry.source})"
    if entry.copy_message_id:
        summary += f" as copy {entry.copy_message_id}"
    changed = entry.changes.get("changed") if isinstance(entry.changes, dict) else None
    if changed:
        summary += f", changing {', '.join(str(key) for key in changed[:10])}"
    return TimelineEvent(
        at=entry.at,
        kind="triage",
        message_id=entry.message_id,
        summary=summary,
        row=("deadletter", entry.dead_letter_id),
        details={
            "action": entry.action,
            "user": entry.user,
            "note": entry.note,
            "outbox_id": entry.outbox_id,
            "copy_message_id": entry.copy_message_id,
            "changes": entry.changes,
        },
    )


def timeline(message_id: str, *, using: str | None = None) -> Timeline:
    """The timeline of ``message_id`` and of its edited copies (a few bounded queries)."""
    alias = read_alias(DeadLetter, using)
    entries_db = TriageEntry.objects.using(alias)
    copy_of = (
        entries_db.filter(copy_message_id=message_id).values_list("message_id", flat=True).first()
        if message_id
        else None
    ) or ""
    copies = list(
        entries_db.filter(message_id=message_id)
        .exclude(copy_message_id="")
        .order_by("id")
        .values_list("copy_message_id", flat=True)[:MAX_COPIES]
    )
    ids = [message_id, *copies]
    outbox_rows = OutboxMessage.objects.using(alias).defer("payload", "headers")
    # Two queries, one per partial index: originals (queue "") and re-deliveries.
    outbox = sorted(
        [
            *outbox_rows.filter(queue="", message_id__in=ids).order_by("id")[:LIMIT],
            *outbox_rows.filter(message_id__in=ids).exclude(queue="").order_by("id")[:LIMIT],
        ],
        key=lambda row: row.pk,
    )
    dead_letters = list(
        DeadLetter.objects.using(alias)
        .filter(message_id__in=ids)
        .only(
            "id",
            "consumer",
            "message_id",
            "status",
            "reason",
            "error_type",
            "error_message",
            "attempts",
            "created_at",
        )
        .order_by("id")[:LIMIT]
    )
    entries = list(entries_db.filter(message_id__in=ids).order_by("id")[:LIMIT])
    # Processed records are indexed by (consumer, message_id) only (an index on the id
    # alone would slow every consume): ask for the consumers that can have one.
    consumers = sorted(
        {*registry.names(), *(d.consumer for d in dead_letters), *(e.consumer for e in entries)}
    )[:MAX_CONSUMERS]
    processed = (
        list(
            ProcessedMessage.objects.using(alias)
            .filter(consumer__in=consumers, message_id__in=ids)
            .order_by("id")[:LIMIT]
        )
        if consumers
        else []
    )
    events = [
        *map(_outbox_event, outbox),
        *map(_processed_event, processed),
        *map(_dead_letter_event, dead_letters),
        *map(_entry_event, entries),
    ]
    events.sort(
        key=lambda event: (event.at is None, event.at or datetime.min, KINDS.index(event.kind))
    )
    return Timeline(
        message_id=message_id,
        copies=copies,
        copy_of=copy_of,
        outbox=outbox,
        processed=processed,
        dead_letters=dead_letters,
        entries=entries,
        events=events,
    )
