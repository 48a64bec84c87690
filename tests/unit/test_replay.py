"""``replay_events``: the sent events of a window re-delivered to one consumer, which
applies those it missed and skips the rest as duplicates (on ``db://``; on RabbitMQ:
``tests/integration/test_replay_rabbitmq.py``)."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from reliable_events import publish_event
from reliable_events.consuming import Worker
from reliable_events.models import OutboxMessage, QueuedMessage
from reliable_events.relay import relay_once
from tests.support.consumer_support import applied, make_consumer

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def database_broker(re_settings: Any) -> None:
    re_settings(BROKER_URL="db://", EXCHANGE="events", PUBLISH_ON_COMMIT=False)


def run(*args: str) -> str:
    out = StringIO()
    call_command("replay_events", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def test_a_consumer_gets_back_what_its_queue_lost_and_skips_what_it_applied(clean_registry):
    consumer = make_consumer(clean_registry, name="replay.c", topics=["orders.*"])
    ids = [publish_event("orders.created", {"n": n}).message_id for n in range(5)]
    publish_event("invoices.created", {"n": 9})  # not its topic
    relay_once()
    lost = ids[1:4]
    QueuedMessage.objects.filter(message_id__in=lost).delete()  # the queue lost them
    Worker([consumer]).run(until_idle=0.3)
    assert [applied(consumer, i) for i in ids] == [1, 0, 0, 0, 1]

    dry = run("replay.c", "--since", "1h", "--dry-run")
    assert "would re-deliver 5 event(s) to replay.c (topics: orders.created x5)" in dry
    assert not OutboxMessage.objects.exclude(queue="").exists()
    out = run("replay.c", "--since", "1h")
    assert "re-delivering 5 event(s) to replay.c" in out
    assert "duplicates will be skipped" in out
    relay_once()
    stats = Worker([consumer]).run(until_idle=0.3)
    assert (stats.processed, stats.duplicates) == (3, 2)
    assert [applied(consumer, i) for i in ids] == [1, 1, 1, 1, 1]


def test_the_window_the_topic_and_the_limit_choose_the_events(clean_registry):
    make_consumer(clean_registry, name="replay.w", topics=["orders.#"])
    for topic in ("orders.created", "orders.paid", "orders.created", "orders.paid.late"):
        publish_event(topic, {})
    relay_once()
    old = timezone.now() - timedelta(hours=3)
    OutboxMessage.objects.filter(topic="orders.paid.late").update(created_at=old)
    assert "would re-deliver 3 event(s)" in run("replay.w", "--since", "2h", "--dry-run")
    assert "would re-deliver 1 event(s)" in run(
        "replay.w", "--since", "4h", "--until", "2h", "--dry-run"
    )
    assert "would re-deliver 2 event(s)" in run(
        "replay.w", "--since", "4h", "--topic", "orders.paid.#", "--dry-run"
    )
    assert "would re-deliver 2 event(s)" in run(
        "replay.w", "--since", "4h", "--limit", "2", "--dry-run"
    )
    QueuedMessage.objects.all().delete()
    run("replay.w", "--since", "4h", "--limit", "2")
    assert list(
        OutboxMessage.objects.exclude(queue="").order_by("id").values_list("topic", "queue")
    ) == [("orders.created", "replay.w"), ("orders.paid", "replay.w")]  # oldest ids first


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nobody", "--since", "1h"], "no consumer named 'nobody'"),
        (["replay.r", "--since", "1h", "--until", "2h"], "the window is empty"),
        (["replay.r", "--since", "8d"], "before the oldest idempotency records are kept"),
        (["replay.r", "--since", "soon"], "'soon' is not a duration"),
    ],
)
def test_replay_refuses_what_would_apply_twice_or_nothing(clean_registry, args, message):
    make_consumer(clean_registry, name="replay.r")
    with pytest.raises(CommandError, match=message) as info:
        run(*args)
    assert info.value.returncode == 1


def test_an_ordered_consumer_is_refused(clean_registry):
    consumer = make_consumer(clean_registry, name="replay.o")
    consumer.ordered = True
    with pytest.raises(CommandError, match="is an ordered consumer"):
        run("replay.o", "--since", "1h")


def test_force_allows_a_window_past_the_idempotency_records(clean_registry):
    make_consumer(clean_registry, name="replay.f")
    assert "would re-deliver 0 event(s)" in run("replay.f", "--since", "8d", "--force", "--dry-run")
