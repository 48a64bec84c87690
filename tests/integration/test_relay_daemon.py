"""The ``relay_outbox`` daemon: one kept database connection (it holds the lanes), a
recovery when that connection is killed, and an idle wait the on-commit hook cuts short."""

from __future__ import annotations

import signal
import time

import pytest
from django.db import connection, transaction

from reliable_events import publish_event
from reliable_events.models import OutboxMessage
from tests.support.producer_support import (
    child_env,
    drain_queue,
    lanes_by_relay,
    manage,
    message_ids,
    stop_process,
    wait_until,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.postgres, pytest.mark.rabbitmq]


def _publish(count: int, keys: int = 20) -> list[str]:
    with transaction.atomic():
        return [
            publish_event("d.event", {"n": n}, key=f"k{n % keys}").message_id for n in range(count)
        ]


def test_the_daemon_keeps_its_connection_and_recovers_when_it_is_killed(
    broker, rabbit, exchange_name, re_settings
):
    queue = rabbit.bind_queue(exchange_name, "#")
    re_settings(PUBLISH_ON_COMMIT=False)
    relay = manage("relay_outbox", env=child_env(RELAY_BATCH_SIZE=50))
    try:
        assert wait_until(lambda: len(lanes_by_relay()) == 1, timeout=60)  # announced
        (owner,) = lanes_by_relay()
        ids = _publish(1000)  # 20 batches, several runs
        assert wait_until(lambda: not OutboxMessage.objects.pending().exists(), timeout=60)
        # idle again, it gave its lanes back to the hooks (and still counts as a relay)
        assert wait_until(lambda: lanes_by_relay() == {owner: 0}, timeout=10)

        with connection.cursor() as cursor:  # the database drops the relay's sessions
            cursor.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            assert cursor.fetchone()[0] >= 1
        ids += _publish(500)
        assert wait_until(lambda: not OutboxMessage.objects.pending().exists(), timeout=60)
        # the leases live in rows, not in the session: the same relay, on a new connection
        assert lanes_by_relay().keys() == {owner}
    finally:
        out, err = stop_process(relay, signal.SIGTERM)
    assert relay.returncode == 0, err
    assert "lanes=64" in out  # a lone relay drains every lane
    assert "database error" in err  # the drop was seen and logged
    received = message_ids(drain_queue(rabbit.channel, queue, expect=len(ids)))
    assert set(received) == set(ids)


def test_an_idle_daemon_is_woken_when_the_hook_hands_it_rows(
    broker, rabbit, exchange_name, re_settings
):
    """The hook leaves a row whose key has an earlier pending row to the relay and wakes
    it: the idle daemon (polling only every 30 s here) sends both at once, in order."""
    queue = rabbit.bind_queue(exchange_name, "#")
    # the child polls every 600 x TIME_SCALE (0.05) = 30 s
    relay = manage("relay_outbox", env=child_env(RELAY_IDLE_SECONDS=600))
    try:
        assert wait_until(lambda: lanes_by_relay() != {}, timeout=60)  # announced
        time.sleep(0.5)  # the daemon is in its idle wait
        re_settings(PUBLISH_ON_COMMIT=False)
        first = publish_event("d.first", {}, key="K")  # pending, due, nobody told the relay
        re_settings(PUBLISH_ON_COMMIT=True)
        started = time.monotonic()
        with transaction.atomic():
            second = publish_event("d.second", {}, key="K")  # the hook must leave it
        sent = wait_until(
            lambda: not OutboxMessage.objects.pending().exists(), timeout=20, interval=0.01
        )
        took = time.monotonic() - started
    finally:
        _out, err = stop_process(relay, signal.SIGTERM)
    assert relay.returncode == 0, err
    assert sent
    assert took < 10, f"the daemon was not woken ({took:.1f}s)"
    assert message_ids(drain_queue(rabbit.channel, queue, expect=2)) == [
        first.message_id,
        second.message_id,
    ]
