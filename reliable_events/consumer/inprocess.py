"""How do events reach consumers without a broker? In-process delivery for tests.

:func:`deliver_pending` drains the outbox and hands each pending event, in id order, to
the consumers bound to its topic (AMQP topic-exchange matching,
:mod:`reliable_events.routing`), through the worker's own
:class:`~reliable_events.consumer.processor.Processor`: idempotency record and
``handle`` in one transaction, retries, dead letters.  A retry runs at once (its delay
is skipped), so a failing handler reaches its dead letter within one call.
Public through :func:`reliable_events.testing.deliver_events`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from django.db.models import TextField
from django.db.models.functions import Cast

from reliable_events.broker.base import CONTENT_ENCODING, CONTENT_TYPE, Delivery, OutgoingMessage
from reliable_events.conf import app_settings
from reliable_events.consumer.base import Event, EventConsumer, Outcome, registry
from reliable_events.consumer.failures import Failure
from reliable_events.consumer.ordering import RetryInPlace
from reliable_events.consumer.processor import Processor
from reliable_events.consumer.retries import RetryScheduler, retry_headers
from reliable_events.models import OutboxMessage
from reliable_events.relay.claims import ClaimedRow, build_message, mark_sent, outbox_alias
from reliable_events.routing import Routes
from reliable_events.times import as_instant

#: Rows claimed from the outbox per round.
BATCH = 500


@dataclass(frozen=True)
class DeliveredEvent:
    """One delivery attempt of one event to one consumer."""

    consumer: str
    message_id: str
    topic: str
    attempt: int
    outcome: Outcome


@dataclass
class DeliveryReport:
    """What :func:`deliver_pending` did, in order."""

    deliveries: list[DeliveredEvent] = field(default_factory=list)

    def __iter__(self) -> Iterator[DeliveredEvent]:
        return iter(self.deliveries)

    def __len__(self) -> int:
        return len(self.deliveries)

    def outcomes(self) -> list[Outcome]:
        return [delivered.outcome for delivered in self.deliveries]

    def for_consumer(self, name: str) -> list[DeliveredEvent]:
        return [delivered for delivered in self.deliveries if delivered.consumer == name]


class _ImmediateRetries(RetryScheduler):
    """Queues a retry for the same call instead of a delay queue or a later row."""

    def __init__(self, pending: deque[Delivery]) -> None:
        self.pending = pending

    def schedule(
        self,
        consumer: type[EventConsumer],
        delivery: Delivery,
        event: Event,
        failure: Failure,
        *,
        retry: int,
        delay: float,
    ) -> None:
        self.pending.append(
            Delivery(
                consumer=consumer.name,
                body=delivery.body,
                properties=dict(delivery.properties),
                headers=retry_headers(delivery, event, failure),
                exchange="",
                routing_key=consumer.queue_name(),
            )
        )


def _deliveries(message: OutgoingMessage, routes: Routes, names: dict[str, str]) -> list[Delivery]:
    queues, _unrouted = routes.targets(message)
    return [
        Delivery(
            consumer=names[queue],
            body=message.body,
            properties={
                "message_id": message.message_id,
                "type": message.topic,
                "content_type": CONTENT_TYPE,
                "content_encoding": CONTENT_ENCODING,
                "timestamp": (
                    as_instant(message.timestamp)
                    if isinstance(message.timestamp, datetime)
                    else message.timestamp
                ),
            },
            headers=dict(message.headers),
            exchange=message.exchange,
            routing_key=message.routing_key,
        )
        for queue in queues
        if queue in names
    ]


def _pending_rows(alias: str) -> list[ClaimedRow]:
    """The oldest pending rows, due or not (a test does not wait for a delay or for the
    on-commit hook's reservation), as the relay's claim returns them."""
    return list(
        map(
            ClaimedRow._make,
            OutboxMessage.objects.using(alias)
            .filter(status=OutboxMessage.Status.PENDING)
            .annotate(payload_text=Cast("payload", output_field=TextField()))
            .order_by("id")
            .values_list(*ClaimedRow._fields)[:BATCH],
        )
    )


def deliver_pending(
    consumers: Sequence[type[EventConsumer]] = (), *, using: str | None = None
) -> DeliveryReport:
    """Deliver every pending outbox row (a delay is skipped) to ``consumers`` (default:
    every registered consumer) whose topics match, mark the rows sent, and say what
    happened."""
    classes: Iterable[type[EventConsumer]] = consumers or registry.all()
    instances = {cls.name: cls() for cls in classes}
    routes = Routes([type(consumer) for consumer in instances.values()], str(app_settings.EXCHANGE))
    names = {type(consumer).queue_name(): name for name, consumer in instances.items()}
    pending: deque[Delivery] = deque()
    processor = Processor(instances, _ImmediateRetries(pending))
    alias = outbox_alias(using)
    report = DeliveryReport()
    while rows := _pending_rows(alias):
        for row in rows:
            pending.extend(_deliveries(build_message(row), routes, names))
            while pending:
                delivery = pending.popleft()
                event = processor.decode(processor.in_place.current(delivery))
                try:
                    outcome, _result = processor.process(delivery)
                except RetryInPlace:  # an ordered consumer: again at once, before the rest
                    outcome = Outcome.RETRIED
                    pending.appendleft(delivery)
                report.deliveries.append(
                    DeliveredEvent(
                        consumer=delivery.consumer,
                        message_id=delivery.message_id,
                        topic=event.topic if event else "",
                        attempt=event.attempt if event else 1,
                        outcome=outcome,
                    )
                )
        mark_sent(alias, [row.id for row in rows])
    return report
