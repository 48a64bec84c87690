"""QuerySets with intent-named methods; the models' managers are built from these."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from django.db import models
from django.db.models import OuterRef
from django.db.models.functions import Now

if TYPE_CHECKING:
    from reliable_events.models import DeadLetter, OutboxMessage, ProcessedMessage

    _OutboxBase = models.QuerySet[OutboxMessage]
    _DeadLetterBase = models.QuerySet[DeadLetter]
    _ProcessedBase = models.QuerySet[ProcessedMessage]
else:
    _OutboxBase = _DeadLetterBase = _ProcessedBase = models.QuerySet


class OutboxQuerySet(_OutboxBase):
    def pending(self) -> OutboxQuerySet:
        """Rows not yet confirmed by the broker."""
        return self.filter(status="pending")

    def due(self) -> OutboxQuerySet:
        """Pending rows whose next attempt time has come (database clock)."""
        return self.pending().filter(next_attempt_at__lte=Now())

    def sent(self) -> OutboxQuerySet:
        return self.filter(status="sent")

    def dead(self) -> OutboxQuerySet:
        """Rows that used up ``MAX_ATTEMPTS``: visible and retryable, never sent."""
        return self.filter(status="dead")

    def sent_before(self, cutoff: datetime) -> OutboxQuerySet:
        """Sent rows confirmed before ``cutoff``: what the purge may delete."""
        return self.sent().filter(sent_at__lt=cutoff)

    def holding_back(self) -> OutboxQuerySet:
        """The rows that hold back an outer row (``OuterRef``) of a relay's claim: the
        earlier pending rows of its key that are not due (a retry's backoff, a delayed
        event).  The claims leave the outer row alone until they are sent."""
        return self.pending().filter(
            next_attempt_at__gt=Now(), key=OuterRef("key"), id__lt=OuterRef("id")
        )

    def held_behind(self, ids: Sequence[int]) -> dict[int, int]:
        """For the pending rows among ``ids`` that are held back (:meth:`holding_back`),
        the id of the first row holding each: one query, a look-up per row through the
        pending key index (for the rows a page shows, never a whole table)."""
        first = models.Subquery(self.holding_back().order_by("id").values("id")[:1])
        rows = self.pending().filter(pk__in=list(ids), key__isnull=False)
        return {
            pk: behind
            for pk, behind in rows.annotate(behind=first).values_list("pk", "behind")
            if behind is not None
        }

    def status_counts(self) -> dict[str, int]:
        counts = {"pending": 0, "sent": 0, "dead": 0}
        for row in self.order_by().values("status").annotate(n=models.Count("id")):
            counts[row["status"]] = row["n"]
        return counts


class ProcessedMessageQuerySet(_ProcessedBase):
    def processed_before(self, cutoff: datetime) -> ProcessedMessageQuerySet:
        return self.filter(processed_at__lt=cutoff)


class DeadLetterQuerySet(_DeadLetterBase):
    def open(self) -> DeadLetterQuerySet:
        """Dead letters nobody has retried or discarded yet."""
        return self.filter(status="open")

    def for_consumer(self, consumer: str) -> DeadLetterQuerySet:
        return self.filter(consumer=consumer)

    def counts_by_consumer(self) -> dict[str, int]:
        rows = self.order_by().values("consumer").annotate(n=models.Count("id"))
        return {row["consumer"]: row["n"] for row in rows}
