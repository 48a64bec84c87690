"""RabbitMQ stopped while requests keep publishing: requests stay fast, nothing is lost.

The broker - a private RabbitMQ node (:mod:`tests.support.rabbit_node`), never the shared one -
is really stopped (``rabbitmqctl stop_app``: every connection is closed and the AMQP
listener refuses new ones) for ``RE_OUTAGE_SECONDS`` (default 60), while request
threads keep committing orders with ``publish_event`` and a ``relay_outbox`` daemon
runs.  The retry policy is the shipped one (on the tests' TIME_SCALE clock, which makes
60 s longer than the old time-to-dead).  Prints: requests, backlog at restart, drain
time, and request latency before / during / after the outage.
"""

from __future__ import annotations

import logging
import os
import signal
import statistics
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from django.db import close_old_connections, connection, transaction

from reliable_events import publish_event
from reliable_events.models import OutboxMessage
from tests.conftest import RabbitClient
from tests.support.producer_support import child_env, manage, stop_process
from tests.support.rabbit_node import RabbitNode, available, private_rabbit_node
from tests.testapp.models import Order

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.postgres,
    pytest.mark.rabbitmq,
    pytest.mark.slow,
    pytest.mark.skipif(not available(), reason="RabbitMQ server scripts not installed"),
]

OUTAGE_SECONDS = float(os.environ.get("RE_OUTAGE_SECONDS", "60"))
REQUEST_THREADS = 4
#: What a request may take at worst while the broker is down: the on-commit connect
#: timeout (0.25 s) paid once per breaker period, plus a generous margin for a noisy
#: 2-core machine.  Without the timeouts and the breaker a request would wait for the
#: 5 s connect timeout (or hang on a half-open socket).
LATENCY_BOUND_SECONDS = 2.0


def _p(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@pytest.fixture
def node() -> Iterator[RabbitNode]:
    with private_rabbit_node() as started:
        yield started


def test_broker_outage_requests_keep_succeeding_and_backlog_drains(
    node, re_settings, report_figures, caplog
):
    exchange_name = f"test-ev-{uuid.uuid4().hex[:10]}"
    re_settings(BROKER_URL=node.url, EXCHANGE=exchange_name)  # shipped retry policy
    setup = RabbitClient(node.url)
    queue = setup.bind_queue(exchange_name, "orders.#")
    setup._kombu.release()
    phase = {"name": "before"}
    latencies: dict[str, list[float]] = {"before": [], "outage": [], "after": []}
    published: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    stop = threading.Event()

    def request_loop(worker: int) -> None:
        n = 0
        try:
            while not stop.is_set():
                n += 1
                started = time.perf_counter()
                with transaction.atomic():
                    order = Order.objects.create(reference=f"w{worker}-{n}")
                    row = publish_event(
                        "orders.created", {"order": order.pk}, key=f"customer-{worker}"
                    )
                elapsed = time.perf_counter() - started
                with lock:
                    latencies[phase["name"]].append(elapsed)
                    published.append(row.message_id)
                time.sleep(0.02)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)
        finally:
            close_old_connections()
            connection.close()

    caplog.set_level(logging.WARNING, logger="reliable_events")
    relay = manage("relay_outbox", env=child_env())
    threads = [threading.Thread(target=request_loop, args=(i,)) for i in range(REQUEST_THREADS)]
    for thread in threads:
        thread.start()
    backlog = 0
    drain_seconds = -1.0
    try:
        time.sleep(3)
        phase["name"] = "outage"
        node.ctl("stop_app")
        try:
            time.sleep(OUTAGE_SECONDS)
        finally:
            backlog = OutboxMessage.objects.pending().count()
            node.ctl("start_app")
            node.wait_until_ready(60)
            restarted = time.monotonic()
        phase["name"] = "after"
        time.sleep(3)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    try:
        deadline = time.monotonic() + 120
        while OutboxMessage.objects.pending().exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        drain_seconds = time.monotonic() - restarted
    finally:
        _out, relay_err = stop_process(relay, signal.SIGTERM)

    assert not errors, f"a request failed: {errors[0]!r}"
    assert relay.returncode == 0, relay_err

    reader = RabbitClient(node.url)
    try:
        received = reader.get_all(queue, expect=len(set(published)), timeout=30)
    finally:
        reader._kombu.release()
    received_ids = {m.properties["message_id"] for m in received}

    report_figures(
        f"\noutage: {OUTAGE_SECONDS:.0f}s, requests={len(published)} "
        f"(before={len(latencies['before'])} outage={len(latencies['outage'])} "
        f"after={len(latencies['after'])}), backlog at restart={backlog}, "
        f"drain={drain_seconds:.2f}s, received={len(received)} unique={len(received_ids)}"
    )
    for name, values in latencies.items():
        if values:
            report_figures(
                f"  latency {name:7s} p50={statistics.median(values) * 1000:.1f}ms "
                f"p99={_p(values, 0.99) * 1000:.1f}ms max={max(values) * 1000:.1f}ms"
            )

    assert latencies["outage"], "no request ran during the outage"
    assert max(latencies["outage"]) < LATENCY_BOUND_SECONDS
    assert backlog > 0, "the outage left nothing pending: the test proved nothing"
    assert not OutboxMessage.objects.pending().exists(), "backlog did not drain"
    assert OutboxMessage.objects.dead().count() == 0
    # A try charged and then the send clears last_error; next_attempt_at keeps its backoff.
    charged = list(
        OutboxMessage.objects.filter(attempts__gt=1).values(
            "id", "attempts", "created_at", "next_attempt_at", "sent_at"
        )
    )
    assert not charged, f"{len(charged)} row(s) charged a try: {charged[:5]}"
    # A row confirmed twice (the relay's and a hook's publish) means a lease ran out with
    # rows in flight; a copy the broker had before it stopped is sent again unmarked.
    assert "went out twice" not in relay_err + caplog.text
    missing = set(published) - received_ids
    assert not missing, f"{len(missing)} committed event(s) never reached the broker"
    assert received_ids == set(published)
