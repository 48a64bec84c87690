"""A snapshot of the outbox's health (``outbox_status``, admin overview, API)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from django.db import DEFAULT_DB_ALIAS, router
from django.db.models import Min
from django.utils import timezone

from reliable_events.models import DeadLetter, OutboxMessage


@dataclass
class OutboxStatus:
    pending: int
    sent: int
    dead: int
    oldest_pending_age_seconds: float | None
    open_dead_letters: int
    open_dead_letters_by_consumer: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def outbox_status(*, using: str | None = None) -> OutboxStatus:
    alias = using or router.db_for_read(OutboxMessage) or DEFAULT_DB_ALIAS
    outbox = OutboxMessage.objects.using(alias)
    counts = outbox.status_counts()
    oldest = outbox.pending().aggregate(oldest=Min("created_at"))["oldest"]
    age = (timezone.now() - oldest).total_seconds() if oldest is not None else None
    by_consumer = DeadLetter.objects.using(alias).open().counts_by_consumer()
    return OutboxStatus(
        pending=counts["pending"],
        sent=counts["sent"],
        dead=counts["dead"],
        oldest_pending_age_seconds=max(age, 0.0) if age is not None else None,
        open_dead_letters=sum(by_consumer.values()),
        open_dead_letters_by_consumer=by_consumer,
    )
