"""The pipelined drain (``Relay.run``) against the real PostgreSQL + RabbitMQ.

While a batch is out, the next one is claimed and confirmed rows are marked on helper
threads.  These tests pin what that must not change: no row is claimed (and published)
twice while it is in flight, only confirmed rows are marked sent, and an earlier row of
a key that becomes due in the middle of a run still goes before the key's later rows.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import pytest
from django.db import transaction
from django.db.models.functions import Now

from reliable_events import publish_event
from reliable_events.broker import OutgoingMessage, Publisher, PublishResult, open_publisher
from reliable_events.models import OutboxMessage
from reliable_events.relay import Relay, RelayReport, publish_after_commit
from reliable_events.relay.leases import lease_seconds
from tests.support.producer_support import WrappingPublisher, drain_queue, message_ids

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.postgres, pytest.mark.rabbitmq]


class _Tap(WrappingPublisher):
    """Wraps a real publisher; runs ``on_publish(call number)`` before each publish."""

    def __init__(self, inner: Publisher, on_publish: Any = None) -> None:
        super().__init__(inner)
        self.on_publish = on_publish
        self.calls = 0

    def publish(
        self, messages: Sequence[OutgoingMessage], *, timeout: float, wait: bool = True
    ) -> PublishResult:
        self.calls += 1
        if self.on_publish is not None:
            self.on_publish(self.calls)
        return self.inner.publish(messages, timeout=timeout, wait=wait)


def test_a_window_larger_than_the_batch_publishes_each_row_once(
    broker, rabbit, exchange_name, re_settings
):
    # Many batches are unconfirmed or being marked when the next claims run.
    queue = rabbit.bind_queue(exchange_name, "#")
    re_settings(PUBLISH_ON_COMMIT=False, RELAY_BATCH_SIZE=10, CONFIRM_WINDOW=200)
    with transaction.atomic():
        ids = [publish_event("p.x", {"n": n}, key=f"k{n % 7}").message_id for n in range(400)]
    relay = Relay()
    try:
        report = relay.drain()
    finally:
        relay.close()
    assert (report.claimed, report.sent, report.failed) == (400, 400, 0)
    delivered = message_ids(drain_queue(rabbit.channel, queue, expect=400))
    assert Counter(delivered) == Counter(ids)  # each exactly once
    assert delivered == ids  # one relay, one channel: id order
    assert OutboxMessage.objects.sent().count() == 400
    assert not OutboxMessage.objects.pending().exists()


def test_an_earlier_row_that_becomes_due_mid_run_still_goes_first(
    broker, rabbit, exchange_name, re_settings
):
    queue = rabbit.bind_queue(exchange_name, "#")
    re_settings(PUBLISH_ON_COMMIT=False, RELAY_BATCH_SIZE=20, CONFIRM_WINDOW=20)
    with transaction.atomic():
        early = publish_event("p.x", {"name": "early"}, key="k", delay=timedelta(hours=1))
        filler = [publish_event("p.x", {"n": n}, key=f"f{n}") for n in range(100)]
        late = publish_event("p.x", {"name": "late"}, key="k")

    def make_early_due(call: int) -> None:
        if call == 2:  # the run is under way, its first claims are done
            OutboxMessage.objects.filter(pk=early.pk).update(next_attempt_at=Now())

    relay = Relay(publisher=_Tap(open_publisher(), make_early_due))
    try:
        relay.drain()
    finally:
        relay.close()
    delivered = message_ids(drain_queue(rabbit.channel, queue, expect=102))
    assert sorted(delivered) == sorted(
        [early.message_id, late.message_id] + [row.message_id for row in filler]
    )
    assert delivered.index(early.message_id) < delivered.index(late.message_id)
    assert OutboxMessage.objects.sent().count() == 102


def test_a_failure_mid_run_marks_only_what_the_broker_confirmed(
    broker, rabbit, exchange_name, re_settings
):
    # The connection is dropped after the third batch is written: whatever was confirmed
    # by then is sent, the rest stays pending, nothing is lost or marked twice.
    queue = rabbit.bind_queue(exchange_name, "#")
    re_settings(PUBLISH_ON_COMMIT=False, RELAY_BATCH_SIZE=25, CONFIRM_WINDOW=100)
    with transaction.atomic():
        ids = [publish_event("p.x", {"n": n}, key=f"k{n % 5}").message_id for n in range(200)]
    inner = open_publisher()

    def cut(call: int) -> None:
        if call == 4:
            inner._kombu.connection.transport.sock.close()  # type: ignore[attr-defined]

    relay = Relay(publisher=_Tap(inner, cut))
    try:
        first = relay.drain()
    finally:
        relay.close()
    assert first.interrupted > 0  # a lost connection: nothing charged to the rows
    assert first.failed == 0
    assert set(OutboxMessage.objects.pending().values_list("attempts", flat=True)) == {0}
    sent_ids = set(OutboxMessage.objects.sent().values_list("message_id", flat=True))
    delivered = message_ids(drain_queue(rabbit.channel, queue, expect=len(sent_ids)))
    assert sent_ids <= set(delivered)  # marked sent => the broker has it
    OutboxMessage.objects.pending().update(next_attempt_at=Now())
    relay = Relay()
    try:
        relay.drain()
    finally:
        relay.close()
    assert OutboxMessage.objects.sent().count() == 200
    rest = message_ids(drain_queue(rabbit.channel, queue, expect=200 - len(delivered)))
    assert set(delivered) | set(rest) == set(ids)
    # per key, the first delivery of each event is in publish order
    first_seen: dict[str, int] = {}
    for position, message_id in enumerate(delivered + rest):
        first_seen.setdefault(message_id, position)
    for key in range(5):
        of_key = [i for n, i in enumerate(ids) if n % 5 == key]
        assert sorted(of_key, key=first_seen.__getitem__) == of_key


class _SlowConfirms(WrappingPublisher):
    """Wraps a real publisher; the first ``flush`` waits ``delay`` seconds (confirms that
    take longer than a lease: a broker that just restarted), then runs ``meanwhile()``
    before it waits for the confirms."""

    def __init__(self, inner: Publisher, delay: float, meanwhile: Any) -> None:
        super().__init__(inner)
        self.delay, self.meanwhile = delay, meanwhile

    def flush(self, *, timeout: float) -> PublishResult:
        if self.meanwhile is not None:
            time.sleep(self.delay)
            meanwhile, self.meanwhile = self.meanwhile, None
            meanwhile()
        return self.inner.flush(timeout=timeout)


def test_a_relay_waiting_on_slow_confirms_keeps_its_lanes(
    broker, rabbit, exchange_name, re_settings, caplog
):
    # Its leases would have expired twice over: the on-commit hook of a new event of one
    # of its keys must leave the key to the relay (not publish the rows in flight again).
    queue = rabbit.bind_queue(exchange_name, "#")
    re_settings(PUBLISH_ON_COMMIT=False)
    with transaction.atomic():
        rows = [publish_event("p.x", {"n": n}, key=f"k{n % 4}") for n in range(40)]
    hook: list[RelayReport] = []

    def new_event_of_a_key_in_flight() -> None:
        with transaction.atomic():
            rows.append(publish_event("p.x", {"n": "late"}, key="k0"))
        hook.append(publish_after_commit([rows[-1].pk]))

    relay = Relay(
        publisher=_SlowConfirms(open_publisher(), 2 * lease_seconds(), new_event_of_a_key_in_flight)
    )
    try:
        with caplog.at_level(logging.WARNING, logger="reliable_events"):
            report = relay.drain()
        assert hook[0].claimed == 0  # the lane was still the relay's
        assert (report.sent, report.interrupted) == (41, 0)  # the late row in its next run
    finally:
        relay.close()
    delivered = message_ids(drain_queue(rabbit.channel, queue, expect=41))
    assert Counter(delivered) == Counter(row.message_id for row in rows)  # each exactly once
    assert set(OutboxMessage.objects.values_list("status", "attempts")) == {("sent", 1)}
    assert "went out twice" not in caplog.text
