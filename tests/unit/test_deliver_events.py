"""deliver_events(): a user's test publishes, delivers in-process and sees the effect once."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import transaction

from reliable_events import publish_event
from reliable_events.consumer import Event, EventConsumer, Outcome
from reliable_events.exceptions import PermanentError
from reliable_events.models import DeadLetter, OutboxMessage, ProcessedMessage
from reliable_events.testing import deliver_events
from tests.testapp.models import Effect

# A user's TestCase: the transaction never commits, so the on-commit hook never sends.
pytestmark = pytest.mark.django_db


def _consumers(clean_registry: Any) -> tuple[type[EventConsumer], type[EventConsumer]]:
    class RecordOrders(EventConsumer):
        name = "deliver.record-orders"
        topics = ["orders.*"]

        def handle(self, event: Event) -> None:
            Effect.objects.create(consumer=self.name, message_id=event.id, payload=event.payload)

    class RecordEverything(EventConsumer):
        name = "deliver.record-everything"
        topics = ["#"]

        def handle(self, event: Event) -> None:
            Effect.objects.create(consumer=self.name, message_id=event.id, payload=event.payload)

    return RecordOrders, RecordEverything


def test_a_published_event_is_applied_once_by_each_matching_consumer(clean_registry):
    record_orders, record_everything = _consumers(clean_registry)
    with transaction.atomic():
        publish_event("orders.created", {"order": 1}, key="order-1", message_id="m-1")
        publish_event("stock.moved", {"sku": "a"}, message_id="m-2")

    report = deliver_events()

    assert sorted((d.consumer, d.message_id, d.outcome) for d in report) == [
        (record_everything.name, "m-1", Outcome.PROCESSED),
        (record_everything.name, "m-2", Outcome.PROCESSED),
        (record_orders.name, "m-1", Outcome.PROCESSED),
    ]
    assert sorted(Effect.objects.values_list("consumer", "message_id", "payload")) == [
        (record_everything.name, "m-1", {"order": 1}),
        (record_everything.name, "m-2", {"sku": "a"}),
        (record_orders.name, "m-1", {"order": 1}),
    ]
    assert ProcessedMessage.objects.count() == 3
    assert not OutboxMessage.objects.filter(status=OutboxMessage.Status.PENDING).exists()
    # Drained: delivering again does nothing.
    assert len(deliver_events()) == 0
    assert Effect.objects.count() == 3


def test_only_the_given_consumers_receive_and_a_second_delivery_is_a_duplicate(clean_registry):
    record_orders, record_everything = _consumers(clean_registry)
    with transaction.atomic():
        publish_event("orders.created", {"order": 2}, message_id="m-3")
    assert [d.outcome for d in deliver_events(record_orders)] == [Outcome.PROCESSED]

    # The same event published again (a producer retry with the same id) applies once.
    OutboxMessage.objects.all().delete()
    with transaction.atomic():
        publish_event("orders.created", {"order": 2}, message_id="m-3")
    report = deliver_events(record_orders)

    assert report.outcomes() == [Outcome.DUPLICATE]
    assert list(Effect.objects.values_list("consumer", "message_id")) == [
        (record_orders.name, "m-3")
    ]
    assert not Effect.objects.filter(consumer=record_everything.name).exists()


def test_a_failing_handler_is_retried_then_dead_lettered_and_rolled_back(clean_registry):
    calls: list[int] = []

    class Flaky(EventConsumer):
        name = "deliver.flaky"
        topics = ["orders.#"]
        max_retries = 2
        retry_delays = [60]

        def handle(self, event: Event) -> None:
            calls.append(event.attempt)
            Effect.objects.create(consumer=self.name, message_id=event.id)
            raise RuntimeError("payment service down")

    class Refuses(EventConsumer):
        name = "deliver.refuses"
        topics = ["orders.created"]

        def handle(self, event: Event) -> None:
            raise PermanentError("not for us")

    with transaction.atomic():
        publish_event("orders.created", {"order": 3}, message_id="m-4")
    report = deliver_events()

    assert [(d.attempt, d.outcome) for d in report.for_consumer(Flaky.name)] == [
        (1, Outcome.RETRIED),
        (2, Outcome.RETRIED),
        (3, Outcome.DEAD_LETTERED),
    ]
    assert report.for_consumer(Refuses.name)[0].outcome is Outcome.DEAD_LETTERED
    assert calls == [1, 2, 3]
    assert not Effect.objects.exists()  # every attempt rolled back
    assert sorted(DeadLetter.objects.values_list("consumer", "message_id", "attempts")) == [
        (Flaky.name, "m-4", 3),
        (Refuses.name, "m-4", 1),
    ]
    assert not ProcessedMessage.objects.exists()
