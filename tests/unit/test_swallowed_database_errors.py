"""A handler that catches a database error and goes on (no nested ``atomic()``): Django
would roll the transaction back at its end without a word, so the event would be acked
while nothing it did was committed.  It fails instead, alone, and is retried."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import IntegrityError

from reliable_events.consumer import Event, EventConsumer, Outcome
from reliable_events.models import ProcessedMessage
from tests.support.consumer_support import applied, make_consumer

SWALLOWED = "handle() caught a database error and went on"


def _swallow(consumer: EventConsumer, event: Event) -> None:
    if event.payload.get("swallow", True):
        try:  # the same row twice: the unique constraint refuses the second
            ProcessedMessage.objects.create(consumer="other", message_id=event.id)
            ProcessedMessage.objects.create(consumer="other", message_id=event.id)
        except IntegrityError:
            pass


@pytest.mark.django_db(transaction=True)
def test_one_event_whose_handler_swallows_a_database_error_fails(clean_registry: Any) -> None:
    consumer = make_consumer(clean_registry, behaviour=_swallow)
    result = consumer().process(Event(id="m-1", topic="t", key=None, payload={}))
    assert result.outcome is Outcome.FAILED
    assert SWALLOWED in result.traceback
    assert applied(consumer) == 0
    assert not ProcessedMessage.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_in_a_batch_only_the_swallowing_handler_fails(clean_registry: Any) -> None:
    consumer = make_consumer(clean_registry, behaviour=_swallow)
    events = [
        Event(id="m-1", topic="t", key=None, payload={"swallow": False}),
        Event(id="m-2", topic="t", key=None, payload={"swallow": True}),
        Event(id="m-3", topic="t", key=None, payload={"swallow": False}),
    ]
    results = consumer().process_batch(events)
    assert results is not None
    assert [r.outcome for r in results] == [Outcome.PROCESSED, Outcome.FAILED, Outcome.PROCESSED]
    assert not results[1].permanent
    assert SWALLOWED in results[1].traceback
    assert [applied(consumer, i) for i in ("m-1", "m-2", "m-3")] == [1, 0, 1]
    assert set(ProcessedMessage.objects.values_list("consumer", "message_id")) == {
        (consumer.name, "m-1"),
        (consumer.name, "m-3"),
    }
