"""On a database without lane locks (SQLite) one relay at a time publishes: it holds the
one lease; a second relay (two daemons, a daemon beside the Celery task) waits, says so,
and takes over when the first stops or its lease runs out."""

from __future__ import annotations

import logging
import time
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from reliable_events import publish_event
from reliable_events.models import LaneLease, OutboxMessage
from reliable_events.relay import Relay
from reliable_events.relay.leases import lease_seconds

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.skipif(connection.vendor == "postgresql", reason="PostgreSQL has lane leases"),
]


def _publish(count: int) -> None:
    for n in range(count):
        publish_event("one.relay", {"n": n}, key=f"k{n % 3}")


def test_a_second_relay_waits_while_the_first_holds_the_lease(re_settings, caplog):
    re_settings(PUBLISH_ON_COMMIT=False)
    first, second = Relay(), Relay()
    try:
        _publish(5)
        assert first.run().sent == 5
        _publish(4)
        with caplog.at_level(logging.WARNING, logger="reliable_events"):
            waiting = second.run()
            assert (waiting.claimed, waiting.lanes) == (0, 0)
            second.run()
        assert caplog.text.count("another relay holds this database's outbox") == 1
        assert OutboxMessage.objects.pending().count() == 4
        first.close()  # it stops: the lease is free at once
        assert second.run().sent == 4
    finally:
        first.close()
        second.close()
    assert LaneLease.objects.get(lane=0).owner == ""


def test_the_lease_of_a_relay_that_died_runs_out(re_settings):
    re_settings(PUBLISH_ON_COMMIT=False)
    dead, alive = Relay(), Relay()
    try:
        _publish(2)
        assert dead.run().sent == 2  # then killed: it never gives the lease back
        _publish(3)
        assert alive.run().claimed == 0
        LaneLease.objects.filter(lane=0).update(expires_at=timezone.now() - timedelta(seconds=1))
        assert alive.run().sent == 3
        time.sleep(lease_seconds() / 4)  # (a lease expires only after time passed)
        assert dead.run().claimed == 0  # were it to wake up, it waits in turn
    finally:
        alive.close()
        dead.close()


def test_an_idle_relay_keeps_its_lease(re_settings):
    re_settings(PUBLISH_ON_COMMIT=False)
    relay = Relay()
    try:
        relay.run()
        LaneLease.objects.filter(lane=0).update(expires_at=timezone.now())
        relay.wait_for_work(1.0)  # renewed while it waits
        assert LaneLease.objects.get(lane=0).expires_at > timezone.now()
        assert LaneLease.objects.get(lane=0).owner == relay.lanes.owner
    finally:
        relay.close()
