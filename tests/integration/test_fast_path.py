"""The on-commit fast path survives misses (issue 8): two processes on a few hot keys
through a broker connection reset stay in milliseconds, in order, with nothing lost; a
delayed event does not slow its key once it is due; a row the hook missed goes with the
next event of its key instead of waiting for a grace period.

Real PostgreSQL, the real (shared) RabbitMQ with this test's own exchange; the reset cuts
only this test's connections (they go through a TCP proxy)."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from typing import Any

import pytest
from django.db import connection, transaction
from django.db.models import Count, Q
from django.db.models.functions import Now

from bench.common import percentile
from reliable_events import publish_event
from reliable_events.conf import AppSettings
from reliable_events.models import LaneLease, OutboxMessage, RelayPresence
from reliable_events.relay import dispatcher, publish_after_commit
from tests.support.producer_support import (
    child_env,
    drain_queue,
    manage,
    message_ids,
    stop_process,
    wait_until,
    with_port,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.postgres, pytest.mark.rabbitmq]

#: "Within 100 ms of commit" (issue 8).
FAST = 0.1


def shipped_defaults(**overrides: Any) -> dict[str, Any]:
    """Every RELIABLE_EVENTS setting at its shipped default (the test settings tune the
    backoff), plus ``overrides`` (the broker and exchange of the test)."""
    values = {name: getattr(AppSettings, name) for name in AppSettings.names()}
    values.pop("BROKER_URL")
    return {**values, **overrides}


def per_key_order_holds(messages: list[Any], outbox_id: dict[str, int]) -> bool:
    """Per key, outbox ids in order of first delivery (duplicates skipped)."""
    seen: set[str] = set()
    order: dict[str, list[int]] = defaultdict(list)
    for message in messages:
        message_id = str(message.properties["message_id"])
        if message_id in seen:
            continue
        seen.add(message_id)
        order[str(message.headers["x-event-key"])].append(outbox_id[message_id])
    return all(ids == sorted(ids) for ids in order.values())


def _stuck() -> str:
    """What holds the rows still pending (for the failure message)."""
    rows = OutboxMessage.objects.pending()
    first = list(rows.values("id", "key", "lane", "attempts", "last_error")[:5])
    counts = rows.aggregate(
        pending=Count("id"), due=Count("id", filter=Q(next_attempt_at__lte=Now()))
    )
    leases = list(LaneLease.objects.values("lane", "owner", "expires_at", "token")[:8])
    presences = list(RelayPresence.objects.values())
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT a.pid, a.state, a.application_name, left(a.query, 120), count(l.*) "
            "FROM pg_stat_activity a LEFT JOIN pg_locks l ON l.pid = a.pid "
            "WHERE a.datname = current_database() AND a.pid <> pg_backend_pid() "
            "GROUP BY 1, 2, 3, 4"
        )
        sessions = cursor.fetchall()
    return (
        f"{counts['pending']} pending ({counts['due']} due), first {first}; "
        f"leases {leases}; relays {presences}; sessions {sessions}"
    )


def _slow_ones(
    rows: dict[str, Any], committed: dict[str, float], reset_at: float, relay_out: str
) -> str:
    """Where the events slower than ``FAST`` after the reset were (for the failure
    message): by key, by producer, by second after the reset, and what the relay sent."""
    slow = [
        (m, at - reset_at)
        for m, at in committed.items()
        if at > reset_at and rows[m].sent_at.timestamp() - at > FAST
    ]
    by_key: dict[str, int] = defaultdict(int)
    by_producer: dict[str, int] = defaultdict(int)
    by_second: dict[int, int] = defaultdict(int)
    for message_id, since in slow:
        producer, n = message_id.split("-")
        by_key[f"hot-{int(n) % 8}"] += 1
        by_producer[producer] += 1
        by_second[int(since)] += 1
    relay_lines = [line for line in relay_out.splitlines() if "claimed=" in line]
    return (
        f"slow after the reset: by key {dict(sorted(by_key.items()))}, by producer "
        f"{dict(by_producer)}, by second after it {dict(sorted(by_second.items()))}; the relay "
        f"daemon's runs that claimed rows: {len(relay_lines)}, the last ones:\n"
        + "\n".join(relay_lines[-10:])
    )


@pytest.mark.slow
@pytest.mark.alone  # its 99 % within 100 ms assumes a machine not running other tiers
def test_two_processes_on_hot_keys_stay_fast_and_ordered_through_a_connection_reset(
    broker, rabbit, exchange_name, amqp_url, tcp_proxy, report_figures
):
    """2 producer processes x 40 transactions/s on 8 shared keys, a relay_outbox daemon,
    all through a proxy whose connections are cut in the middle; shipped defaults."""
    queue = rabbit.bind_queue(exchange_name, "#")
    env = child_env(
        **shipped_defaults(BROKER_URL=with_port(amqp_url, tcp_proxy.port), EXCHANGE=exchange_name)
    )
    seconds, rate, reset_after = 24.0, 40.0, 10.0
    relay = manage("relay_outbox", env=env)
    producers = [
        manage(
            "hotkey_produce",
            "--prefix",
            f"p{index}",
            "--keys",
            "8",
            "--rate",
            str(rate),
            "--seconds",
            str(seconds),
            env=env,
        )
        for index in range(2)
    ]
    try:
        time.sleep(reset_after)
        reset_at = time.time()
        tcp_proxy.stop()  # cuts every connection of the producers and the relay
        tcp_proxy.start()
        committed: dict[str, float] = {}
        for producer in producers:
            out, err = producer.communicate(timeout=seconds + 60)
            assert producer.returncode == 0, err
            committed.update(json.loads(out.strip().splitlines()[-1]))
        drained = wait_until(lambda: not OutboxMessage.objects.pending().exists(), timeout=60)
        stuck = "" if drained else _stuck()
    finally:
        for producer in producers:
            stop_process(producer)
        relay_out, relay_err = stop_process(relay)
    assert relay.returncode == 0, relay_err
    assert drained, (
        f"rows still pending 60 s after the producers ended: {stuck}; relay said:\n{relay_err}\n"
        + "\n".join(relay_out.splitlines()[-15:])
    )

    rows = {
        r.message_id: r
        for r in OutboxMessage.objects.filter(message_id__in=list(committed)).only(
            "id", "message_id", "status", "sent_at"
        )
    }
    assert len(rows) == len(committed) > 0.9 * 2 * rate * seconds
    assert all(r.status == OutboxMessage.Status.SENT for r in rows.values())
    messages = drain_queue(rabbit.channel, queue, expect=len(committed), timeout=60)
    assert set(message_ids(messages)) == set(committed)  # 0 lost, nothing foreign
    assert per_key_order_holds(messages, {m: r.pk for m, r in rows.items()})

    def latencies(after: bool) -> list[float]:
        return [
            rows[m].sent_at.timestamp() - at  # type: ignore[union-attr]
            for m, at in committed.items()
            if (at > reset_at) == after
        ]

    before, after = latencies(False), latencies(True)
    fast = sum(1 for x in after if x <= FAST) / len(after)
    duplicates = len(messages) - len(committed)
    figures = (
        f"hot keys (2 processes x {rate:.0f}/s, 8 keys, connection reset at {reset_after:.0f} s): "
        f"before reset n={len(before)} p50={percentile(before, 0.5) * 1000:.1f} ms "
        f"p99={percentile(before, 0.99) * 1000:.1f} ms; after reset n={len(after)} "
        f"p50={percentile(after, 0.5) * 1000:.1f} ms p99={percentile(after, 0.99) * 1000:.1f} ms "
        f"max={max(after) * 1000:.0f} ms, {fast:.1%} within {FAST * 1000:.0f} ms; "
        f"{duplicates} duplicate(s), 0 lost, per-key order held"
    )
    print(figures)
    report_figures(figures)
    assert tcp_proxy.accepted > 3  # the producers and the relay reconnected after the reset
    assert fast >= 0.99, f"{figures}\n{_slow_ones(rows, committed, reset_at, relay_out)}"


@pytest.mark.parametrize("level", ["REPEATABLE_READ", "SERIALIZABLE"])
def test_hooks_of_two_processes_on_hot_keys_never_fail_at_a_stricter_project_isolation(
    broker, rabbit, exchange_name, level
):
    """A project may run PostgreSQL above READ COMMITTED (``OPTIONS["isolation_level"]``).
    The hook's own transaction (its lanes' locks, then its keys' chains) runs at READ
    COMMITTED: at the project's level, a hook that had waited for another's lane read a
    snapshot from before that hook's commit and failed with a serialization error (its
    rows left to the next event or the relay; under SERIALIZABLE, some sent twice)."""
    queue = rabbit.bind_queue(exchange_name, "#")
    env = child_env(**shipped_defaults(BROKER_URL=broker["BROKER_URL"], EXCHANGE=exchange_name))
    env["RE_TEST_PG_ISOLATION"] = level  # tests/settings.py: the project's OPTIONS
    producers = [
        manage("hotkey_produce", "--prefix", f"p{index}", "--keys", "4", "--seconds", "8", env=env)
        for index in range(2)
    ]
    committed: dict[str, float] = {}
    failures: list[str] = []
    for producer in producers:
        out, err = producer.communicate(timeout=90)
        assert producer.returncode == 0, err
        committed.update(json.loads(out.strip().splitlines()[-1]))
        failures += [line for line in err.splitlines() if "on-commit publish failed" in line]
    assert not failures, failures
    assert not OutboxMessage.objects.pending().exists()
    messages = drain_queue(rabbit.channel, queue, expect=len(committed), timeout=60)
    assert sorted(message_ids(messages)) == sorted(committed)  # each once, none lost
    rows = dict(OutboxMessage.objects.values_list("message_id", "id"))
    assert per_key_order_holds(messages, rows)


def test_a_delayed_event_does_not_slow_its_key_once_due(broker, rabbit, exchange_name):
    """While a delayed event is not due, later events of its key wait behind it (key
    order); once it is due, the next event of the key goes at once, taking the delayed
    one and those that waited with it, in order.  No relay runs here."""
    queue = rabbit.bind_queue(exchange_name, "#")
    delay = 1.5
    delayed = publish_event("d.later", {"n": 0}, key="K", delay=delay)
    due_at = delayed.next_attempt_at.timestamp()
    waiting = publish_event("d.waits", {"n": 1}, key="K")
    other = publish_event("d.other", {"n": 2}, key="L")
    assert message_ids(drain_queue(rabbit.channel, queue, expect=1)) == [other.message_id]
    assert OutboxMessage.objects.get(pk=waiting.pk).status == OutboxMessage.Status.PENDING
    assert time.time() < due_at, "the machine is too slow for this test's delay"

    time.sleep(max(0.0, due_at - time.time()) + 0.05)
    started = time.monotonic()
    with transaction.atomic():
        after = publish_event("d.after", {"n": 3}, key="K")
    took = time.monotonic() - started
    assert OutboxMessage.objects.get(pk=after.pk).status == OutboxMessage.Status.SENT
    assert took < 1.0  # generous: it is milliseconds, not the old 10 s grace period
    assert message_ids(drain_queue(rabbit.channel, queue, expect=3)) == [
        delayed.message_id,
        waiting.message_id,
        after.message_id,
    ]
    # and the key stays on the fast path
    nxt = publish_event("d.next", {"n": 4}, key="K")
    assert OutboxMessage.objects.get(pk=nxt.pk).status == OutboxMessage.Status.SENT


def test_a_row_the_hook_missed_goes_with_the_next_event_of_its_key(
    broker, rabbit, exchange_name, re_settings
):
    """A miss (here: the breaker was open) leaves the row due at once, not reserved; the
    next event of the key publishes it first, then itself."""
    queue = rabbit.bind_queue(exchange_name, "#")
    dispatcher.trip()
    missed = publish_event("m.one", {}, key="K")
    assert OutboxMessage.objects.due().filter(pk=missed.pk).exists()
    dispatcher.open_until = 0.0
    nxt = publish_event("m.two", {}, key="K")
    assert set(OutboxMessage.objects.values_list("status", flat=True)) == {"sent"}
    assert message_ids(drain_queue(rabbit.channel, queue, expect=2)) == [
        missed.message_id,
        nxt.message_id,
    ]


def test_the_hook_waits_for_a_lane_another_publisher_holds(broker, rabbit, exchange_name):
    """A lane held elsewhere (another relay or hook, here a second connection) keeps the
    hook off the key; it waits briefly and leaves the rows due for the holder."""
    from django.db import connections

    queue = rabbit.bind_queue(exchange_name, "#")
    row = publish_event("l.one", {}, key="K", delay=60)  # no hook; we only need its lane
    other = connections.create_connection("default")
    try:
        with other.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_lock(%s, %s)", [0x5245, row.lane])
        OutboxMessage.objects.filter(pk=row.pk).update(next_attempt_at=Now())
        started = time.monotonic()
        assert publish_after_commit([row.pk]).claimed == 0
        assert time.monotonic() - started < 0.5
        assert OutboxMessage.objects.due().filter(pk=row.pk).exists()
        with connection.cursor() as cursor:  # the hook's transaction left no lock behind
            cursor.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            )
            assert cursor.fetchone()[0] == 1
    finally:
        other.close()
    assert publish_after_commit([row.pk]).sent == 1
    assert message_ids(drain_queue(rabbit.channel, queue, expect=1)) == [row.message_id]
