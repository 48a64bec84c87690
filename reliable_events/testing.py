"""Helpers for testing code that publishes events.

``capture_events()`` records every event ``publish_event`` stores, in the spirit of
``django.core.mail.outbox``::

    from reliable_events.testing import capture_events

    def test_order_publishes(db):
        with capture_events() as events:
            create_order(...)
        assert [e.topic for e in events] == ["orders.created"]

It records at ``publish_event`` time, so it works inside Django's ``TestCase`` (whose
transactions never commit).  Use ``events.committed()`` to see only the events whose
transaction has committed, which needs a ``TransactionTestCase`` or
``captureOnCommitCallbacks(execute=True)``.

``deliver_events()`` then delivers the stored events to your consumers in-process, with
no relay, broker or worker (the way procrastinate ships an in-memory connector)::

    from reliable_events.testing import deliver_events

    def test_order_ships(db):
        create_order(...)                      # publish_event inside a transaction
        report = deliver_events(ShippingConsumer)
        assert Shipment.objects.count() == 1
        assert deliver_events(ShippingConsumer).deliveries == []   # drained

Each event goes through the worker's own processing path (idempotency record and
``handle`` in one transaction, retries, dead letters); see
:mod:`reliable_events.consumer.inprocess`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from reliable_events import signals

if TYPE_CHECKING:
    from reliable_events.consumer.base import EventConsumer
    from reliable_events.consumer.inprocess import DeliveryReport


@dataclass(frozen=True)
class CapturedEvent:
    id: int
    message_id: str
    topic: str
    key: str | None
    payload: Any
    headers: dict[str, str]
    using: str


@dataclass
class CapturedEvents:
    events: list[CapturedEvent] = field(default_factory=list)

    def __iter__(self) -> Iterator[CapturedEvent]:
        return iter(self.events)

    def __len__(self) -> int:
        return len(self.events)

    def __getitem__(self, index: int) -> CapturedEvent:
        return self.events[index]

    def topics(self) -> list[str]:
        return [event.topic for event in self.events]

    def for_topic(self, topic: str) -> list[CapturedEvent]:
        return [event for event in self.events if event.topic == topic]

    def committed(self) -> list[CapturedEvent]:
        """The captured events whose row exists now (their transaction committed)."""
        # Lazy: test modules import this helper before Django's apps are loaded.
        from reliable_events.models import OutboxMessage

        found: set[int] = set()
        for alias in {event.using for event in self.events}:
            ids = [event.id for event in self.events if event.using == alias]
            found.update(
                OutboxMessage.objects.using(alias).filter(pk__in=ids).values_list("pk", flat=True)
            )
        return [event for event in self.events if event.id in found]


@contextmanager
def capture_events() -> Iterator[CapturedEvents]:
    """Record the events stored by ``publish_event`` inside the block."""
    captured = CapturedEvents()

    def receiver(sender: Any, message: Any, using: str, **kwargs: Any) -> None:
        captured.events.append(
            CapturedEvent(
                id=message.pk,
                message_id=message.message_id,
                topic=message.topic,
                key=message.key,
                payload=message.payload,
                headers=dict(message.headers),
                using=using,
            )
        )

    signals.event_stored.connect(receiver, weak=False)
    try:
        yield captured
    finally:
        signals.event_stored.disconnect(receiver)


def deliver_events(*consumers: type[EventConsumer], using: str | None = None) -> DeliveryReport:
    """Drain the outbox: deliver each pending event to ``consumers`` (default: every
    registered consumer) whose topics match, in-process, and return what happened.

    Rows are marked sent, so a second call delivers nothing new; an event delivered again
    (a copy published with the same ``message_id``) is a ``DUPLICATE``.  A retry runs at
    once (its delay skipped); a handler that keeps failing ends in a dead letter.  A
    delayed event is delivered at once.  Works in a ``TestCase`` (the rows need not have
    committed).  Rows the on-commit hook already sent (``PUBLISH_ON_COMMIT`` in
    a ``TransactionTestCase``) are not delivered: there, set ``PUBLISH_ON_COMMIT`` to
    ``False``.
    """
    # Lazy: test modules import this helper before Django's apps are loaded, and the
    # processing path imports the models.
    from reliable_events.consumer.inprocess import deliver_pending

    return deliver_pending(consumers, using=using)
