"""PostgreSQL behind PgBouncer in transaction pooling mode (a private ``pgbouncer``,
tests/support/pgbouncer.py): the pooler is detected, and every raw SQL path of the
relay, the on-commit hook and the consumer works through it (transaction-local settings,
transaction-level advisory locks, lease rows, the one-round-trip idempotency insert)."""

from __future__ import annotations

import pytest
from django.db import connection, transaction

from reliable_events import publish_event
from reliable_events.consumer.idempotency import record_processed
from reliable_events.models import LaneLease, OutboxMessage, RelayPresence
from reliable_events.relay import Relay, behind_pooler, relay_once
from reliable_events.relay.pooling import listen_works
from tests.support.producer_support import drain_queue, message_ids

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.postgres]


def test_a_pooled_connection_is_detected(through_pgbouncer):
    assert behind_pooler(connection)
    with connection.cursor() as cursor:  # one server, through the pooler
        cursor.execute("SELECT current_database()")
        assert cursor.fetchone()[0] == connection.settings_dict["NAME"]


def test_a_direct_connection_is_not_taken_for_a_pooled_one():
    assert not behind_pooler(connection)
    assert not behind_pooler(connection)  # detected once per connection: the same answer


def test_relay_listen_forces_listen_or_polling_whatever_is_detected(re_settings):
    assert listen_works(connection)  # None (the default): detected, a direct connection
    re_settings(RELAY_LISTEN=False)
    assert not listen_works(connection)
    re_settings(RELAY_LISTEN=True)
    assert listen_works(connection)


def test_relay_listen_detects_the_pooler_by_default(through_pgbouncer):
    assert not listen_works(connection)


@pytest.mark.rabbitmq
def test_hook_relay_and_consumer_sql_through_pgbouncer(
    through_pgbouncer, broker, rabbit, exchange_name, re_settings
):
    queue = rabbit.bind_queue(exchange_name, "#")
    # the on-commit hook: lock_timeout via set_config(..., true), advisory xact locks,
    # the lease check of its claim, the mark
    with transaction.atomic():
        hooked = [publish_event("pb.hook", {"n": n}, key=f"k{n % 3}") for n in range(6)]
    assert not OutboxMessage.objects.pending().exists()
    # the relay: presence and leases, the claim's plan settings, fenced claim and mark
    re_settings(PUBLISH_ON_COMMIT=False)
    with transaction.atomic():
        relayed = [publish_event("pb.relay", {"n": n}, key=f"k{n % 3}") for n in range(300)]
    report = relay_once(batch_size=50)
    assert (report.sent, report.claimed) == (300, 300)
    assert not OutboxMessage.objects.pending().exists()
    assert not RelayPresence.objects.exists()  # it left
    assert not LaneLease.objects.exclude(owner="").exists()  # and gave its lanes back
    assert LaneLease.objects.filter(token__gt=0).exists()
    expected = [r.message_id for r in hooked + relayed]
    assert message_ids(drain_queue(rabbit.channel, queue, expect=len(expected))) == expected

    # the idle daemon polls behind the pooler (a LISTEN there would be lost)
    relay = Relay()
    try:
        relay.run()
        relay.wait_for_work(0.3)
        assert relay._listening is None
        assert RelayPresence.objects.count() == 1
    finally:
        relay.close()

    # the consumer's idempotency insert: BEGIN and INSERT in one round trip
    for expected_new in (True, False):
        with transaction.atomic():
            assert record_processed("default", "pb", "message-1", "pb.topic") is expected_new
