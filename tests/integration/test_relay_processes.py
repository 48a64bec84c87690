"""relay_outbox as real processes on the test database and the real RabbitMQ: killed with
SIGKILL mid-batch and restarted, three at once over 5,000 events, stopped by SIGTERM.
Every message id is counted; per-key order is checked on the first deliveries."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter, defaultdict
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import transaction
from django.db.models.functions import Now

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


def _publish_many(count: int, keys: int) -> list[OutboxMessage]:
    """``count`` events over ``keys`` keys; payload carries the key and its sequence."""
    rows = []
    with transaction.atomic():
        for n in range(count):
            key = f"key-{n % keys}"
            rows.append(publish_event("load.event", {"key": key, "seq": n // keys}, key=key))
    return rows


def _first_delivery_order_holds(messages: list[Any]) -> dict[str, list[int]]:
    """Per key, the sequence numbers in order of first delivery (duplicates skipped)."""
    seen: set[str] = set()
    order: dict[str, list[int]] = defaultdict(list)
    for message in messages:
        message_id = message.properties["message_id"]
        if message_id in seen:
            continue
        seen.add(message_id)
        body = json.loads(message.body)
        order[body["key"]].append(body["seq"])
    return order


def _counts() -> tuple[int, int]:
    sent = OutboxMessage.objects.sent().count()
    return sent, OutboxMessage.objects.pending().count()


def test_relay_killed_mid_batch_and_restarted_loses_nothing(
    broker, rabbit, exchange_name, re_settings
):
    """SIGKILL while publishing, with published-but-unmarked rows: after a restart every
    event is in the queue at least once (the unmarked ones twice), none lost."""
    queue = rabbit.bind_queue(exchange_name, "#")
    re_settings(PUBLISH_ON_COMMIT=False)
    rows = _publish_many(3000, keys=30)
    ids = {r.message_id for r in rows}
    env = child_env(CONFIRM_WINDOW=20, RELAY_BATCH_SIZE=200)

    kills = 0
    mid_batch = False
    for _ in range(4):  # normally the first kill is already mid-batch
        sent_before, pending_before = _counts()
        if pending_before < 200:
            break
        relay = manage("relay_outbox", env=env)
        try:

            def published_not_marked(before: int = sent_before) -> bool:
                in_queue = rabbit.count(queue)  # first the queue, then the marks
                sent = OutboxMessage.objects.sent().count()
                return sent > before and in_queue > sent

            # wait until this process has published events it has not marked yet
            assert wait_until(published_not_marked, timeout=60, interval=0.005), (
                "the relay did not start publishing"
            )
        finally:
            relay.send_signal(signal.SIGKILL)
            relay.communicate(timeout=30)
        kills += 1
        assert relay.returncode == -signal.SIGKILL
        in_queue = rabbit.count(queue)
        sent, pending = _counts()
        assert pending > 0, "the relay finished before it was killed"
        if in_queue > sent:  # published (and maybe confirmed) but never marked sent
            mid_batch = True
            break
    assert kills >= 1
    assert mid_batch, "no kill landed between a publish and its mark"

    restarted = manage("relay_outbox", "--once", env=env)
    out, err = restarted.communicate(timeout=120)
    assert restarted.returncode == 0, err
    assert OutboxMessage.objects.pending().count() == 0, f"{out}\n{err}"

    messages = drain_queue(rabbit.channel, queue, expect=len(ids), timeout=60)
    counts = Counter(message_ids(messages))
    assert set(counts) == ids  # none lost, nothing foreign
    print(f"SIGKILL after {kills} start(s): {sum(counts.values()) - len(ids)} duplicate(s)")
    order = _first_delivery_order_holds(messages)
    assert all(seqs == sorted(seqs) for seqs in order.values())


@pytest.mark.parametrize("route", ["direct", pytest.param("pgbouncer", marks=pytest.mark.slow)])
def test_three_relays_at_once_over_5000_events(
    route, request, broker, rabbit, exchange_name, re_settings, report_figures
):
    """Three relay_outbox loops share the lanes (22/22/20) and drain 5,000 events: none
    lost, none sent twice, per-key order holds; each stops cleanly (exit 0) on SIGTERM.

    ``pgbouncer``: every Django connection (this process's and the relays') goes through
    PgBouncer in transaction pooling mode."""
    if route == "pgbouncer":
        request.getfixturevalue("through_pgbouncer")
    started = time.monotonic()
    queue = rabbit.bind_queue(exchange_name, "#")
    re_settings(PUBLISH_ON_COMMIT=False)
    # idle poll 0.2 s on the tests' clock (TIME_SCALE 0.05)
    env = child_env(RELAY_BATCH_SIZE=100, RELAY_IDLE_SECONDS=4)

    relays = [manage("relay_outbox", env=env) for _ in range(3)]
    try:
        # every relay announced itself before the rows come (each takes its fair share,
        # at most 22 lanes, while it has work; idle, it holds none)
        assert wait_until(lambda: len(lanes_by_relay()) == 3, timeout=60)
        rows = _publish_many(5000, keys=50)
        ids = [r.message_id for r in rows]
        done = wait_until(
            lambda: not OutboxMessage.objects.pending().exists(), timeout=120, interval=0.2
        )
    finally:
        outputs = [stop_process(relay, signal.SIGTERM) for relay in relays]
    assert done, "the relays did not drain the outbox"
    for relay, (out, err) in zip(relays, outputs, strict=True):
        assert relay.returncode == 0, err
        assert "relay_outbox: stopped (SIGTERM)" in out
    sent_by = [
        sum(
            int(part.split("=")[1])
            for line in out.splitlines()
            if "stopped" in line
            for part in line.split()
            if part.startswith("sent=")
        )
        for out, _ in outputs
    ]
    assert sum(sent_by) == 5000
    assert sum(1 for n in sent_by if n > 0) >= 2, f"the relays did not share the work: {sent_by}"
    held = [
        int(word[6:]) for out, _ in outputs for word in out.split() if word.startswith("lanes=")
    ]
    assert held
    assert max(held) <= 22, f"a relay took more than its share: {sorted(set(held))}"

    messages = drain_queue(rabbit.channel, queue, expect=len(ids), timeout=60)
    counts = Counter(message_ids(messages))
    assert set(counts) == set(ids)  # none lost
    assert max(counts.values()) == 1  # and, with lanes, none published twice
    order = _first_delivery_order_holds(messages)
    assert len(order) == 50
    assert all(seqs == list(range(100)) for seqs in order.values())
    report_figures(
        f"\nthree relays ({route}): 5000 events sent {sent_by}, lanes held at most "
        f"{max(held)}, 0 duplicates, per-key order kept, {time.monotonic() - started:.1f}s"
    )


def test_relay_loop_stops_on_sigterm_when_idle(broker):
    relay = manage("relay_outbox", env=child_env())
    try:
        assert relay.wait_for_output("relay_outbox: running", timeout=60)
    finally:
        out, err = stop_process(relay, signal.SIGTERM)
    assert relay.returncode == 0, err
    assert "relay_outbox: stopped (SIGTERM); sent=0 failed=0 dead=0" in out


def test_relay_loop_stops_on_sigint(broker):
    relay = manage("relay_outbox", env=child_env())
    try:
        assert relay.wait_for_output("relay_outbox: running", timeout=60)
    finally:
        out, err = stop_process(relay, signal.SIGINT)
    assert relay.returncode == 0, err
    assert "stopped (SIGINT)" in out


def test_relay_once_in_a_process_exit_codes(broker, rabbit, exchange_name, re_settings):
    re_settings(PUBLISH_ON_COMMIT=False)
    queue = rabbit.bind_queue(exchange_name, "#")
    row = publish_event("p.x", {})
    ok = manage("relay_outbox", "--once", env=child_env())
    out, err = ok.communicate(timeout=60)
    assert ok.returncode == 0, err
    assert "sent=1" in out
    assert message_ids(rabbit.get_all(queue, expect=1)) == [row.message_id]

    publish_event("p.y", {})
    down = manage(
        "relay_outbox", "--once", env=child_env(BROKER_URL="amqp://guest:guest@127.0.0.1:1//")
    )
    out, err = down.communicate(timeout=60)
    assert down.returncode == 3
    assert "could not be published" in err

    bad = manage("relay_outbox", "--once", "--batch-size", "0", env=child_env())
    _, err = bad.communicate(timeout=60)
    assert bad.returncode == 1
    assert "'0' is not a batch size (1 to 1000000)" in err


# -- declare_topology and conflicts -------------------------------------------------------
def test_declare_topology_declares_the_exchange_and_unrouted_queue_idempotently(
    broker, rabbit, exchange_name, clean_registry
):
    out = StringIO()
    call_command("declare_topology", stdout=out)
    call_command("declare_topology", stdout=StringIO())  # again: no error, no change
    assert f"exchange {exchange_name} (topic)" in out.getvalue()
    channel = rabbit.channel
    channel.exchange_declare(exchange_name, "topic", passive=True)
    channel.exchange_declare(f"{exchange_name}.unrouted", "fanout", passive=True)
    channel.queue_declare(f"{exchange_name}.unrouted", passive=True)
    # the alternate exchange is wired: an unbound topic lands in the unrouted queue
    channel.basic_publish(
        __import__("amqp").Message(b"{}"), exchange=exchange_name, routing_key="no.binding"
    )
    assert len(rabbit.get_all(f"{exchange_name}.unrouted", expect=1)) == 1


def test_topology_conflict_is_a_command_error(broker, rabbit, exchange_name):
    # someone declared the exchange with another type
    rabbit.channel.exchange_declare(exchange_name, "direct", durable=True, auto_delete=False)
    with pytest.raises(CommandError, match="already has this topology") as info:
        call_command("declare_topology", stdout=StringIO())
    assert info.value.returncode == 1
    row = publish_event("c.x", {})  # the on-commit hook fails quietly
    assert OutboxMessage.objects.get(pk=row.pk).status == OutboxMessage.Status.PENDING
    OutboxMessage.objects.update(next_attempt_at=Now())
    with pytest.raises(CommandError, match="already has this topology") as info:
        call_command("relay_outbox", "--once", stdout=StringIO())
    assert info.value.returncode == 1
    assert OutboxMessage.objects.get(pk=row.pk).status == OutboxMessage.Status.PENDING
