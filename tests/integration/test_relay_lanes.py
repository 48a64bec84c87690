"""Several relay_outbox daemons share the lanes fairly, and a dead relay's lanes are taken
over promptly, with per-key order intact (checked at a consumer of the queue)."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter, defaultdict
from datetime import timedelta
from typing import Any

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

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.postgres,
    pytest.mark.rabbitmq,
    pytest.mark.slow,
]

KEYS = 200
#: Generous bound for a dead relay to stop counting: its session's locks go at once; the
#: survivor rebalances at its next run.
TAKEOVER_BOUND_SECONDS = 10.0


def _publish(count: int, start: int = 0) -> list[str]:
    """``count`` events over KEYS keys; the body carries the key and its sequence."""
    ids = []
    with transaction.atomic():
        for n in range(start, start + count):
            key = f"key-{n % KEYS}"
            payload = {"key": key, "seq": n // KEYS}
            ids.append(publish_event("lanes.event", payload, key=key).message_id)
    return ids


def _sent_by(output: str) -> int:
    line = next(line for line in output.splitlines() if "relay_outbox: stopped" in line)
    return int(line.split("sent=")[1].split()[0])


def _lanes_held(output: str) -> list[int]:
    """The lanes a relay held in each of its runs that published (its ``lanes=`` lines)."""
    return [int(word[6:]) for word in output.split() if word.startswith("lanes=")]


def _check_order(messages: list[Any]) -> int:
    """Per key, the first deliveries are in sequence; returns the violations."""
    seen: set[str] = set()
    last: dict[str, int] = defaultdict(lambda: -1)
    violations = 0
    for message in messages:
        message_id = message.properties["message_id"]
        if message_id in seen:
            continue
        seen.add(message_id)
        body = json.loads(message.body)
        if body["seq"] <= last[body["key"]]:
            violations += 1
        last[body["key"]] = body["seq"]
    return violations


def test_two_relays_share_the_lanes_and_a_dead_ones_are_taken_over(
    broker, rabbit, exchange_name, re_settings, report_figures
):
    queue = rabbit.bind_queue(exchange_name, "#")
    re_settings(PUBLISH_ON_COMMIT=False)
    env = child_env(RELAY_BATCH_SIZE=200, RELAY_IDLE_SECONDS=4)  # 0.2 s on the test clock

    # 1. two daemons: at most 32 lanes each while they work, and about half of the rows each
    relays = [manage("relay_outbox", env=env) for _ in range(2)]
    try:
        assert wait_until(lambda: len(lanes_by_relay()) == 2, timeout=60)  # both announced
        ids = _publish(4000)
        assert wait_until(lambda: not OutboxMessage.objects.pending().exists(), timeout=120)
    finally:
        outputs = [stop_process(relay, signal.SIGTERM) for relay in relays]
    sent = [_sent_by(out) for out, _ in outputs]
    assert sum(sent) == 4000
    assert all(0.3 <= n / 4000 <= 0.7 for n in sent), f"unfair share: {sent}"
    held = [_lanes_held(out) for out, _ in outputs]
    assert all(lanes and max(lanes) <= 32 for lanes in held), f"more than a share: {held}"

    # 2. two fresh daemons; one is killed while both publish: the other takes its lanes
    relays = [manage("relay_outbox", env=env) for _ in range(2)]
    try:
        assert wait_until(lambda: len(lanes_by_relay()) == 2, timeout=60)
        ids += _publish(4000, start=4000)
        assert wait_until(
            lambda: OutboxMessage.objects.sent().count() >= 4400, timeout=60, interval=0.01
        )
        relays[0].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        relays[0].communicate(timeout=30)
        # the dead session's locks go with it: the survivor is the only relay at once, and
        # drains every lane (the dead one's rows included) at its next runs
        alone = wait_until(lambda: len(lanes_by_relay()) == 1, timeout=TAKEOVER_BOUND_SECONDS)
        drained = wait_until(lambda: not OutboxMessage.objects.pending().exists(), timeout=120)
        takeover = time.monotonic() - killed_at
    finally:
        survivor_out, survivor_err = stop_process(relays[1], signal.SIGTERM)
        stop_process(relays[0], signal.SIGKILL)
    assert alone, f"the dead relay still counted after {TAKEOVER_BOUND_SECONDS}s"
    assert drained, survivor_err
    assert 64 in _lanes_held(survivor_out), "the survivor never took the dead relay's lanes"
    assert relays[1].returncode == 0, survivor_err

    messages = drain_queue(rabbit.channel, queue, expect=len(ids), timeout=60)
    counts = Counter(message_ids(messages))
    violations = _check_order(messages)
    report_figures(
        f"\nlanes: 2 relays sent {sent[0]}/{sent[1]} of 4000 ({sent[0] / 40:.0f}%/"
        f"{sent[1] / 40:.0f}%); after a SIGKILL the survivor took all 64 lanes and had "
        f"drained the rest {takeover:.2f}s later, sending {_sent_by(survivor_out)}; "
        f"received {len(counts)} of {len(ids)} ids "
        f"({sum(counts.values()) - len(counts)} duplicates), "
        f"{violations} order violations"
    )
    assert set(counts) == set(ids)  # every id, nothing foreign
    assert violations == 0
    assert OutboxMessage.objects.dead().count() == 0


def _descents(messages: list[Any]) -> dict[str, int]:
    """Per key, how often a delivery's sequence number is not above the one before it
    (every delivery counted, duplicates included, in queue order).  One relay publishes a key's
    rows in order; a relay taking over a dead one's lane starts again from the first row
    not marked sent: one descent.  Two relays publishing one key at once would interleave
    their runs: several."""
    last: dict[str, int] = {}
    descents: Counter[str] = Counter()
    for message in messages:
        body = json.loads(message.body)
        key, seq = body["key"], body["seq"]
        if key in last and seq <= last[key]:
            descents[key] += 1
        last[key] = seq
    return dict(descents)


def test_a_killed_relays_lanes_are_taken_over_after_its_lease_through_pgbouncer(
    through_pgbouncer, broker, rabbit, exchange_name, re_settings, report_figures
):
    """Through PgBouncer (transaction pooling), two relays publish; one holding lanes is
    SIGKILLed.  Its leases expire (``RELAY_LEASE_SECONDS`` on the tests' clock, at least
    2 s) and the survivor takes every one of its lanes (new fencing tokens); every id
    arrives, per-key order holds, and no key was published by two relays at once."""
    from django.utils import timezone

    from reliable_events.models import LaneLease, RelayPresence
    from reliable_events.relay.leases import lease_seconds

    queue = rabbit.bind_queue(exchange_name, "#")
    re_settings(PUBLISH_ON_COMMIT=False)
    env = child_env(RELAY_BATCH_SIZE=100, RELAY_IDLE_SECONDS=4)
    lease = lease_seconds()
    relays = [manage("relay_outbox", env=env) for _ in range(2)]
    try:
        assert wait_until(lambda: len(lanes_by_relay()) == 2, timeout=60)
        owners = {
            int(process.rsplit(":", 1)[1]): owner
            for owner, process in RelayPresence.objects.values_list("owner", "process")
        }
        victim, survivor = owners[relays[0].pid], owners[relays[1].pid]
        # the relays' connections go through the pooler (this test's own one too)
        assert through_pgbouncer.clients(str(connection.settings_dict["NAME"])) >= 3
        ids = _publish(4000)
        assert wait_until(
            lambda: OutboxMessage.objects.sent().count() >= 800, timeout=60, interval=0.01
        )
        # kill while rows are in flight (published, not yet marked sent), if it can be seen
        wait_until(
            lambda: rabbit.count(queue) > OutboxMessage.objects.sent().count(),
            timeout=10,
            interval=0.002,
        )
        tokens = dict(LaneLease.objects.filter(owner=victim).values_list("lane", "token"))
        relays[0].send_signal(signal.SIGKILL)
        killed_at, killed_clock = time.monotonic(), timezone.now()
        relays[0].communicate(timeout=30)
        expiry = max(LaneLease.objects.filter(lane__in=tokens).values_list("expires_at", flat=True))

        def taken_over() -> bool:
            return (
                LaneLease.objects.filter(lane__in=tokens, owner=survivor).count() == len(tokens)
                or not OutboxMessage.objects.pending().exists()
            )

        took = wait_until(taken_over, timeout=lease + 5, interval=0.01)
        takeover = time.monotonic() - killed_at
        after = dict(LaneLease.objects.filter(lane__in=tokens).values_list("lane", "token"))
        drained = wait_until(lambda: not OutboxMessage.objects.pending().exists(), timeout=120)
    finally:
        _out, survivor_err = stop_process(relays[1], signal.SIGTERM)
        stop_process(relays[0], signal.SIGKILL)
    assert tokens, "the killed relay held no lane"
    assert took, f"the dead relay's lanes were not taken over within {lease + 5:.1f}s"
    assert drained, survivor_err
    assert relays[1].returncode == 0, survivor_err
    # every lane changed hands (a new token), and only after the dead relay's lease ended
    assert all(after[lane] > token for lane, token in tokens.items())
    assert expiry <= killed_clock + timedelta(seconds=lease + 1)

    messages = drain_queue(rabbit.channel, queue, expect=len(ids), timeout=60)
    counts = Counter(message_ids(messages))
    descents = _descents(messages)
    report_figures(
        f"\nlease takeover (PgBouncer): relay SIGKILLed holding {len(tokens)} lanes; the "
        f"survivor held them {takeover:.2f}s later (lease {lease:.2f}s); received "
        f"{len(counts)} of {len(ids)} ids ({sum(counts.values()) - len(counts)} duplicates), "
        f"{_check_order(messages)} order violations, {len(descents)} keys republished "
        f"from their first unmarked row, none by two relays at once"
    )
    assert set(counts) == set(ids)
    assert _check_order(messages) == 0
    assert all(n == 1 for n in descents.values()), descents
