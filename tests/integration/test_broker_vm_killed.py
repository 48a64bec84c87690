"""The broker's Erlang VM is SIGKILLed for longer than the old time-to-dead, with the
SHIPPED retry policy, while producers keep publishing with keys: nothing goes dead,
nothing is charged, no key goes out of order, every id arrives, and the backlog is done
within seconds of the broker answering again.

The broker is a private RabbitMQ node (:mod:`tests.support.rabbit_node`), never the shared one.
The relay is a real ``relay_outbox`` daemon process.  MAX_ATTEMPTS, BACKOFF_BASE and
BACKOFF_MAX are the shipped defaults (asserted below); the tests' ``TIME_SCALE`` (0.05)
runs that policy on a clock 20 times faster, so the outage lasts longer than the old
time-to-dead (every attempt charged: ``sum(min(BACKOFF_MAX, BACKOFF_BASE * 2**(a-1)))``
for a < MAX_ATTEMPTS, times TIME_SCALE: 511 s x 0.05 = 25.6 s at most) in about 30 s.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connection, transaction

from reliable_events import publish_event
from reliable_events.conf import AppSettings, app_settings
from reliable_events.models import OutboxMessage
from tests.conftest import RabbitClient
from tests.support.producer_support import child_env, drain_queue, manage, stop_process, wait_until
from tests.support.rabbit_node import RabbitNode, available, private_rabbit_node

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.postgres,
    pytest.mark.rabbitmq,
    pytest.mark.slow,
    pytest.mark.skipif(not available(), reason="RabbitMQ server scripts not installed"),
]

PRODUCERS = 2
KEYS_PER_PRODUCER = 8
#: Generous bound (noisy shared machine) on "backlog done after the broker could take
#: messages again" (its first confirm of a publish to the recovered queue).
DRAIN_BOUND_SECONDS = 20.0
PROBE_ID = "probe-broker-ready"


def old_time_to_dead() -> float:
    """How long the old accounting took at most to kill a row in an outage: every failed
    try charged, the backoff ceiling before each of the MAX_ATTEMPTS - 1 retries."""
    base, cap = app_settings.seconds("BACKOFF_BASE"), app_settings.seconds("BACKOFF_MAX")
    return float(sum(min(cap, base * 2**a) for a in range(int(app_settings.MAX_ATTEMPTS) - 1)))


@pytest.fixture
def node() -> Iterator[RabbitNode]:
    with private_rabbit_node() as started:
        yield started


def _probe_ready(url: str, queue: str, started: float, out: list[float]) -> None:
    """Publish one message to ``queue`` with a confirm: when it is acked, the restarted
    broker has recovered the queue and takes messages again (a node recovering from a
    SIGKILL answers AMQP before that).  Appends the seconds since ``started``."""
    import amqp

    conn = amqp.Connection(url.split("@", 1)[1].rstrip("/"), userid="guest", password="guest")
    try:
        conn.connect()
        channel = conn.channel()
        channel.confirm_select()
        message = amqp.Message(b'{"probe": true}', delivery_mode=2, message_id=PROBE_ID)
        channel.basic_publish_confirm(message, exchange="", routing_key=queue, timeout=120)
        out.append(time.monotonic() - started)
    finally:
        conn.close()


def _check_order(messages: list[Any]) -> tuple[int, set[str]]:
    """Order violations among first deliveries per key, and the ids received."""
    seen: set[str] = set()
    last: dict[str, int] = defaultdict(lambda: -1)
    violations = 0
    for message in messages:
        message_id = str(message.properties["message_id"])
        if message_id in seen or message_id == PROBE_ID:
            continue
        seen.add(message_id)
        body = json.loads(message.body)
        if body["seq"] <= last[body["key"]]:
            violations += 1
        last[body["key"]] = body["seq"]
    return violations, seen


def test_broker_vm_killed_longer_than_the_old_time_to_dead_shipped_policy(
    node, settings, re_settings, report_figures
):
    exchange = f"test-ev-{uuid.uuid4().hex[:10]}"
    config = re_settings(BROKER_URL=node.url, EXCHANGE=exchange)
    for name in ("MAX_ATTEMPTS", "BACKOFF_BASE", "BACKOFF_MAX", "RELAY_BROKER_RETRY_MAX"):
        assert name not in config, f"{name} must be the shipped default here"
        assert getattr(app_settings, name) == getattr(AppSettings, name)
    outage = old_time_to_dead() + 4.0

    setup = RabbitClient(node.url)
    queue = setup.bind_queue(exchange, "#")
    setup._kombu.release()

    relay = manage("relay_outbox", env=child_env())
    stop = threading.Event()
    published: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def produce(worker: int) -> None:
        seq: Counter[str] = Counter()
        n = 0
        try:
            while not stop.is_set():
                key = f"w{worker}-k{n % KEYS_PER_PRODUCER}"
                n += 1
                with transaction.atomic():
                    row = publish_event("vm.event", {"key": key, "seq": seq[key]}, key=key)
                seq[key] += 1
                with lock:
                    published.append(row.message_id)
                time.sleep(0.01)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)
        finally:
            connection.close()

    producers = [threading.Thread(target=produce, args=(i,)) for i in range(PRODUCERS)]
    for thread in producers:
        thread.start()
    charged = dead_during = backlog = 0
    drain_seconds = -1.0
    try:
        time.sleep(3)
        node.kill()  # SIGKILL of the Erlang VM
        killed_at = time.monotonic()
        time.sleep(outage)
        charged = OutboxMessage.objects.filter(attempts__gt=0, status="pending").count()
        dead_during = OutboxMessage.objects.dead().count()
        backlog = OutboxMessage.objects.pending().count()
        last_id = OutboxMessage.objects.order_by("-id").values_list("id", flat=True).first()
        down_for = time.monotonic() - killed_at
        node.restart()  # returns once the node answers AMQP
        answered = time.monotonic()
        ready: list[float] = []
        probe = threading.Thread(target=_probe_ready, args=(node.url, queue, answered, ready))
        probe.start()
        done = wait_until(
            lambda: not OutboxMessage.objects.pending().filter(id__lte=last_id).exists(),
            timeout=120,
            interval=0.05,
        )
        drain_seconds = time.monotonic() - answered
        probe.join(timeout=120)
        time.sleep(2)  # producers keep going after the restart
    finally:
        stop.set()
        for thread in producers:
            thread.join(timeout=30)
    try:
        assert wait_until(lambda: not OutboxMessage.objects.pending().exists(), timeout=60)
    finally:
        out, err = stop_process(relay, signal.SIGTERM)
    assert not errors, f"a producer failed: {errors[0]!r}"
    assert done, "the backlog did not drain after the restart"

    reader = RabbitClient(node.url)
    try:
        messages = drain_queue(reader.channel, queue, expect=len(published) + 1, timeout=60)
    finally:
        reader._kombu.release()
    violations, received = _check_order(messages)
    stopped = next((line for line in out.splitlines() if "stopped" in line), err[-500:])
    report_figures(
        f"\nbroker VM killed: down {down_for:.1f}s (old time-to-dead at most "
        f"{old_time_to_dead():.1f}s on this clock; TIME_SCALE={app_settings.TIME_SCALE}), "
        f"events={len(published)}, backlog at restart={backlog}, charged during the outage="
        f"{charged}, dead={OutboxMessage.objects.dead().count()}, backlog done "
        f"{drain_seconds:.2f}s after the broker answered AMQP (which confirmed its first "
        f"publish to the recovered queue after {ready[0] if ready else -1:.2f}s), "
        f"received={len(received)} "
        f"(+{len(messages) - len(received)} duplicates), order violations={violations}; "
        f"relay: {stopped}"
    )
    assert relay.returncode == 0, err
    assert backlog > 0, "nothing was pending at the restart: the test proved nothing"
    assert down_for > old_time_to_dead()
    assert charged == 0, "a broker outage was charged to the events"
    assert dead_during == 0
    assert OutboxMessage.objects.dead().count() == 0
    assert ready, "the restarted broker never confirmed a publish"
    assert drain_seconds - ready[0] < DRAIN_BOUND_SECONDS
    assert received == set(published), f"{len(set(published) - received)} ids never arrived"
    assert violations == 0
