"""A snapshot of the outbox's health (``outbox_status``, admin overview, API).

The oldest pending age measures how long an event has been *overdue*: a row stored with
``delay=`` counts from the time it became due, not from when it was stored, so a
scheduled event is never reported as stuck backlog.  A row counts as delayed when it has
never been tried and its first due time lies more than the on-commit reservation
(``ON_COMMIT_GRACE_SECONDS``, plus a second of clock difference) after its creation;
once a delayed row has failed a publish, its original due time is no longer kept and it
counts from its creation again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

from django.db.models import Case, Count, DateTimeField, ExpressionWrapper, F, Min, Q, When
from django.utils import timezone

from reliable_events.conf import app_settings
from reliable_events.db import read_alias
from reliable_events.models import DeadLetter, KeyHold, OutboxMessage, ParkedEvent

#: Clock difference allowed between the application (``next_attempt_at``) and the
#: database (``created_at``) when telling a delayed row from an on-commit reservation.
_CLOCK_SLACK = timedelta(seconds=1)


@dataclass
class OutboxStatus:
    pending: int
    sent: int
    dead: int
    oldest_pending_age_seconds: float | None
    open_dead_letters: int
    open_dead_letters_by_consumer: dict[str, int]
    #: Pending rows published with ``delay=`` that are not due yet (not backlog).
    scheduled: int = 0
    #: Keys ordered consumers hold behind a dead letter, and the events parked behind them.
    held_keys: int = 0
    parked_events: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def outbox_status(*, using: str | None = None) -> OutboxStatus:
    alias = read_alias(OutboxMessage, using)
    outbox = OutboxMessage.objects.using(alias)
    counts = outbox.status_counts()
    now = timezone.now()
    reservation = timedelta(seconds=float(app_settings.ON_COMMIT_GRACE_SECONDS)) + _CLOCK_SLACK
    delayed = Q(attempts=0) & Q(
        next_attempt_at__gt=ExpressionWrapper(
            F("created_at") + reservation, output_field=DateTimeField()
        )
    )
    due_since = Case(
        When(delayed, then=F("next_attempt_at")),
        default=F("created_at"),
        output_field=DateTimeField(),
    )
    pending = outbox.pending().order_by().annotate(due_since=due_since)
    figures = pending.aggregate(
        oldest=Min("due_since", filter=Q(due_since__lte=now)),
        scheduled=Count("id", filter=Q(due_since__gt=now) & delayed),
    )
    oldest = figures["oldest"]
    age = (now - oldest).total_seconds() if oldest is not None else None
    by_consumer = DeadLetter.objects.using(alias).open().counts_by_consumer()
    return OutboxStatus(
        pending=counts["pending"],
        sent=counts["sent"],
        dead=counts["dead"],
        oldest_pending_age_seconds=max(age, 0.0) if age is not None else None,
        open_dead_letters=sum(by_consumer.values()),
        open_dead_letters_by_consumer=by_consumer,
        scheduled=figures["scheduled"] or 0,
        held_keys=KeyHold.objects.using(alias).count(),
        parked_events=ParkedEvent.objects.using(alias).count(),
    )
