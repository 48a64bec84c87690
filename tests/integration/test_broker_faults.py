"""The broker fails around a commit: the business commit always succeeds, nothing is lost.

A :class:`tests.support.tcp_proxy.TcpProxy` in front of the real RabbitMQ plays the broker going
away (stopped: connections cut, new ones refused) or hanging (frozen: nothing forwarded).
Assertions are about behaviour (the commit returns, rows stay pending, everything is
delivered later), never about timings.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, transaction
from django.db.models.functions import Now

from reliable_events import publish_event
from reliable_events.models import OutboxMessage
from reliable_events.relay import relay_once
from tests.support.producer_support import (
    drain_queue,
    free_port,
    message_ids,
    wait_until,
    with_port,
)
from tests.testapp.models import Order

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.postgres, pytest.mark.rabbitmq]

#: A bound for "the commit returned" in a helper thread.  Never reached when the code is
#: right (the hook is bounded by sub-second timeouts); reached only if a commit hangs.
HANG = 30.0


def _commit_in_thread(work: Any) -> tuple[bool, list[BaseException]]:
    """Run ``work`` in a thread (its own DB connection); did it return, and what raised?"""
    errors: list[BaseException] = []
    started = time.monotonic()

    def target() -> None:
        try:
            work()
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(HANG)
    print(f"commit, broker hung: {time.monotonic() - started:.3f}s")  # measured, not asserted
    return not thread.is_alive(), errors


def _create_order(n: int, key: str | None = None) -> OutboxMessage:
    with transaction.atomic():
        order = Order.objects.create(reference=f"order-{n}")
        return publish_event("orders.created", {"order_id": order.pk}, key=key or str(order.pk))


def test_broker_down_at_commit_then_back_relay_delivers_everything(
    broker, rabbit, exchange_name, amqp_url, tcp_proxy, re_settings
):
    queue = rabbit.bind_queue(exchange_name, "orders.#")
    re_settings(
        BROKER_URL=with_port(amqp_url, tcp_proxy.port),
        ON_COMMIT_GRACE_SECONDS=1.5,
        ON_COMMIT_BREAKER_SECONDS=60,
    )
    tcp_proxy.stop()  # the broker is gone: connections refused

    started = time.monotonic()
    first = _create_order(1)  # the hook tries, fails, opens the breaker
    took = [time.monotonic() - started]
    rows = [first]
    for n in range(2, 6):  # the breaker skips the hook
        started = time.monotonic()
        rows.append(_create_order(n))
        took.append(time.monotonic() - started)
    # measured, not asserted (timings are not test material): see the report
    print(f"commit, broker refusing: first {took[0]:.3f}s, breaker open max {max(took[1:]):.3f}s")

    assert Order.objects.count() == 5  # every business commit succeeded
    stored = {r.pk: r for r in OutboxMessage.objects.all()}
    assert all(r.status == OutboxMessage.Status.PENDING for r in stored.values())
    tried = stored[first.pk]
    # the broker failed, not the event: no attempt counted, and the row is the relay's
    # at once (due since its commit on PostgreSQL: no reservation to wait out), with the
    # reason
    assert tried.attempts == 0
    assert "cannot connect to broker" in tried.last_error
    assert tried.next_attempt_at < tried.created_at + timedelta(seconds=1.5)
    assert [stored[r.pk].attempts for r in rows[1:]] == [0, 0, 0, 0]  # skipped by the breaker
    # skipped by the breaker: due for the relay at once too, not after the grace
    assert all(stored[r.pk].next_attempt_at < r.created_at + timedelta(seconds=1.5) for r in rows)

    # a relay while the broker is still down: nothing claimed, nothing charged
    OutboxMessage.objects.update(next_attempt_at=Now())
    err = StringIO()
    with pytest.raises(CommandError) as info:
        call_command("relay_outbox", "--once", stdout=StringIO(), stderr=err)
    assert info.value.returncode == 3
    assert "broker is unavailable" in str(info.value)
    after = OutboxMessage.objects.all()
    assert all(r.status == "pending" and r.attempts == 0 and r.last_error for r in after)

    # the broker is back: one relay run delivers every event
    tcp_proxy.start()
    out = StringIO()
    call_command("relay_outbox", "--once", stdout=out)
    assert "sent=5" in out.getvalue()
    delivered = message_ids(drain_queue(rabbit.channel, queue, expect=5))
    assert sorted(delivered) == sorted(r.message_id for r in rows)
    assert OutboxMessage.objects.pending().count() == 0


def test_commit_while_the_broker_hangs_returns_and_loses_nothing(
    broker, rabbit, exchange_name, amqp_url, tcp_proxy, re_settings
):
    """A broker that stops answering (connection open, nothing comes back) must not hold
    the request: the hook's connect, confirm and close are all bounded."""
    queue = rabbit.bind_queue(exchange_name, "orders.#")
    re_settings(
        BROKER_URL=with_port(amqp_url, tcp_proxy.port),
        ON_COMMIT_GRACE_SECONDS=1.5,
        ON_COMMIT_BREAKER_SECONDS=0.01,
    )
    healthy = _create_order(1)  # warms the hook's cached connection through the proxy
    assert message_ids(drain_queue(rabbit.channel, queue, expect=1)) == [healthy.message_id]

    tcp_proxy.freeze()
    rows: list[OutboxMessage] = []
    # on the cached connection: the publish is written, the confirm never comes
    returned, errors = _commit_in_thread(lambda: rows.append(_create_order(2)))
    assert returned, "the commit hung on a broker that does not answer"
    assert errors == []
    # on a new connection: the AMQP handshake never completes
    returned, errors = _commit_in_thread(lambda: rows.append(_create_order(3)))
    assert returned, "the commit hung connecting to a broker that does not answer"
    assert errors == []
    assert Order.objects.count() == 3
    pending = OutboxMessage.objects.pending()
    assert {r.pk for r in pending} == {r.pk for r in rows}

    tcp_proxy.thaw()
    tcp_proxy.stop()  # cut whatever the frozen connections still hold
    tcp_proxy.start()
    # Both rows may still be inside their on-commit grace: relay until none is pending.
    assert wait_until(
        lambda: relay_once() is not None and not OutboxMessage.objects.pending().exists(),
        timeout=20,
        interval=0.2,
    )
    assert OutboxMessage.objects.pending().count() == 0
    counts = Counter(message_ids(drain_queue(rabbit.channel, queue, expect=2)))
    assert set(counts) == {r.message_id for r in rows}  # at least once each


def test_broker_password_never_appears_in_errors_or_logs(broker, rabbit, re_settings, caplog):
    secret = "s3cr3t-Pa55w0rd"
    re_settings(BROKER_URL=f"amqp://guest:{secret}@127.0.0.1:{free_port()}//", CONNECT_TIMEOUT=1.0)
    with caplog.at_level(logging.DEBUG, logger="reliable_events"):
        row = _create_order(1)
        OutboxMessage.objects.update(next_attempt_at=Now())
        report = relay_once()
        err = StringIO()
        OutboxMessage.objects.update(next_attempt_at=Now())
        with pytest.raises(CommandError) as info:
            call_command("relay_outbox", "--once", stdout=StringIO(), stderr=err)
        with pytest.raises(CommandError) as declared:
            call_command("declare_topology", stdout=StringIO())
    stored = OutboxMessage.objects.get(pk=row.pk)
    assert stored.attempts == 0  # a broker failure is not charged to the event
    assert "cannot connect to broker" in stored.last_error
    assert "cannot connect to broker" in report.broker_error
    texts = [
        stored.last_error,
        report.broker_error,
        *report.errors,
        str(info.value),
        err.getvalue(),
        str(declared.value),
        caplog.text,
    ]
    assert all(secret not in text for text in texts)
    assert "guest:**@" in stored.last_error  # the URL is shown, without its password


def test_broker_refusing_the_credentials_keeps_rows_pending_without_the_password(
    broker, rabbit, amqp_url, re_settings
):
    secret = "wrong-Pa55w0rd-for-guest"
    re_settings(
        BROKER_URL=with_port(
            amqp_url, int(amqp_url.rsplit(":", 1)[1].split("/")[0]), password=secret
        )
    )
    row = _create_order(1)
    OutboxMessage.objects.update(next_attempt_at=Now())
    report = relay_once()
    assert (report.claimed, report.failed) == (0, 0)  # the relay pauses as a whole
    assert "ACCESS_REFUSED" in report.broker_error
    stored = OutboxMessage.objects.get(pk=row.pk)
    assert (stored.status, stored.attempts) == (OutboxMessage.Status.PENDING, 0)
    # the on-commit hook's try left the reason on the row
    assert "ACCESS_REFUSED" in stored.last_error or "refused" in stored.last_error.lower()
    assert secret not in stored.last_error
    assert secret not in report.broker_error
