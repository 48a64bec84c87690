"""The ordering ledger: per-key order through 4 ordered consumer processes, kills and a
broker restart.

* ``RE_ORDERED_LEDGER_EVENTS`` events (default 200,000; about 8 minutes alone on 2 cores,
  20,000 take about 2) on 1,000 keys, each with its
  key's sequence number (1, 2, 3, ...), committed by this test as outbox rows
  (1,000 per transaction) while everything runs;
* one ``relay_outbox`` and 4 ``consume_events`` processes of one ordered consumer (8
  partition queues, shipped defaults otherwise; ``tests/testapp/consumers.py``);
* every 2-5 s a random consumer process is SIGKILLed and started again at once;
* the broker - a private node (``tests/support/rabbit_node.py``), never the shared one -
  is SIGKILLed and restarted once, at ~40 % of the events.

The handler checks each event against its key's last applied sequence number under a
row lock, in its own table (``KeySequence``), and records both in its effect.  Then:
0 lost (every committed id has its effect), 0 applied twice (a unique effect per id), 0
per-key order violations (every effect's ``seq`` is its key's previous one + 1).
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import transaction
from django.utils import timezone

from reliable_events.models import DeadLetter, OutboxMessage
from reliable_events.publishing import lane_for
from tests.support import rabbit_node
from tests.support.consumer_support import make_consumer
from tests.support.ledger_support import Fleet, db
from tests.support.producer_support import child_env
from tests.testapp.consumers import ORDERED_CONSUMER_ENV
from tests.testapp.models import Effect, KeySequence

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.postgres,
    pytest.mark.slow,
    pytest.mark.skipif(not rabbit_node.available(), reason="RabbitMQ is not installed here"),
]

EVENTS = int(os.environ.get("RE_ORDERED_LEDGER_EVENTS", "200000"))
KEYS = 1000
CONSUMERS = 4
PER_TRANSACTION = 1000
#: The whole run (set-up to assertions) stays within this, hangs included.
BUDGET_SECONDS = float(os.environ.get("RE_ORDERED_LEDGER_BUDGET", "1500"))
pytestmark.append(pytest.mark.timeout(int(BUDGET_SECONDS) + 120))
TOPIC = "ordered.changed"
#: A consumer process logs this once subscribed.
CONSUMING = "reliable_events: consuming"


@pytest.fixture
def node() -> Iterator[rabbit_node.RabbitNode]:
    with rabbit_node.private_rabbit_node() as started:
        yield started


def _produce(run: str, stop: threading.Event, produced: list[int]) -> None:
    """Commit the events in key-interleaved order: event ``n`` is key ``n % KEYS``.

    The rows ``publish_event`` would write, inserted 1,000 per statement (this test
    proves the consumers' order; the producer's path has its own ledgers)."""
    due = timezone.now()
    for start in range(0, EVENTS, PER_TRANSACTION):
        if stop.is_set():
            return
        rows = []
        for n in range(start, min(EVENTS, start + PER_TRANSACTION)):
            key, message_id = f"k{n % KEYS}", f"{run}-{n}"
            rows.append(
                OutboxMessage(
                    message_id=message_id,
                    topic=TOPIC,
                    key=key,
                    lane=lane_for(key, message_id),
                    payload={"seq": n // KEYS + 1},
                    headers={},
                    next_attempt_at=due,
                )
            )
        with transaction.atomic():
            OutboxMessage.objects.bulk_create(rows)
        produced[0] = min(EVENTS, start + PER_TRANSACTION)


def _chaos(fleet: Fleet, stop: threading.Event, errors: list[BaseException]) -> None:
    """Every 2-5 s, SIGKILL a consumer process that is consuming (on a loaded machine
    a process may need longer than that to start) and start it again at once."""
    rng = random.Random()
    try:
        while not stop.wait(rng.uniform(2.0, 5.0)):
            with fleet.lock:
                up = [
                    key
                    for key, child in fleet.children.items()
                    if key[0] == "consumer" and CONSUMING in child.log.read_text(errors="replace")
                ]
            if up:
                fleet.kill_and_restart(rng.choice(up))
            fleet.revive()
    except BaseException as exc:  # reported by the test
        errors.append(exc)


def test_ordered_consumers_keep_per_key_order_through_kills_and_a_broker_restart(
    node: rabbit_node.RabbitNode,
    settings: Any,
    clean_registry: Any,
    tmp_path: Path,
    report_figures: Any,
) -> None:
    started = time.monotonic()
    deadline = started + BUDGET_SECONDS
    run = f"ordered-{uuid.uuid4().hex[:8]}"
    name = f"{run}.apply"
    settings.RELIABLE_EVENTS = {
        **settings.RELIABLE_EVENTS,
        "BROKER_URL": node.url,
        "EXCHANGE": f"test-ev-{run}",
        "PUBLISH_ON_COMMIT": False,
        "CONSUMER_RECONNECT_MAX": 2.0,
        "CONSUMER_LOG_EVERY": 500,
    }
    twin = make_consumer(clean_registry, name=name, topics=["ordered.#"])
    twin.ordered = True
    KeySequence.objects.bulk_create(
        KeySequence(consumer=name, key=f"k{k}", seq=0) for k in range(KEYS)
    )
    from reliable_events.topology_service import declare_all

    declare_all()  # before the first publish: nothing is unrouted

    env = child_env()
    env.pop("COVERAGE_PROCESS_START", None)
    env.update(
        PYTHONUNBUFFERED="1",
        RE_TEST_LOG_LEVEL="INFO",
        **{ORDERED_CONSUMER_ENV: json.dumps({"name": name, "topics": ["ordered.#"]})},
    )
    fleet = Fleet(
        env=env,
        logs=tmp_path,
        consumer=name,
        run=run,
        events=EVENTS,
        producer_count=1,
        per_transaction=PER_TRANSACTION,
        max_seconds=BUDGET_SECONDS,
    )
    stop = threading.Event()
    errors: list[BaseException] = []
    chaos = threading.Thread(target=_chaos, args=(fleet, stop, errors))
    produced = [0]
    marks: dict[str, float] = {}

    def applied() -> int:
        return db(lambda: Effect.objects.filter(consumer=name).count())

    try:
        with fleet.lock:
            for i in range(CONSUMERS):
                fleet.start("consumer", i)
            fleet.start("relay", 0)
        chaos.start()
        producer = threading.Thread(target=_produce, args=(run, stop, produced))
        producer.start()
        while producer.is_alive() and produced[0] < EVENTS * 0.4:
            time.sleep(0.2)
        marks["broker restart at"] = time.monotonic() - started
        marks["applied at restart"] = applied()
        fleet.note("private broker SIGKILLed")
        node.kill()
        node.restart()
        fleet.note("private broker accepts connections again")
        producer.join(max(0.0, deadline - time.monotonic()))
        marks["produced"] = time.monotonic() - started
        marks["applied when produced"] = applied()
        while applied() < EVENTS and time.monotonic() < deadline:
            fleet.revive()
            time.sleep(1.0)
        marks["applied"] = time.monotonic() - started
        stop.set()
        chaos.join(60)
        fleet.stop(("consumer", "relay"))
    finally:
        stop.set()
        fleet.kill_all()
        (tmp_path / "timeline.log").write_text("\n".join(fleet.timeline) + "\n")
    wall = time.monotonic() - started

    committed = set(
        OutboxMessage.objects.filter(message_id__startswith=run).values_list(
            "message_id", flat=True
        )
    )
    effects = list(Effect.objects.filter(consumer=name).values_list("message_id", "payload"))
    ids = [message_id for message_id, _ in effects]
    violations = [
        (message_id, payload)
        for message_id, payload in effects
        if payload["seq"] != payload["prev"] + 1
    ]
    lost = committed - set(ids)
    if violations:  # each key's story, for the post-mortem (timeline.log has the kills)
        broken = {payload["key"] for _, payload in violations}
        story = sorted(
            (p["key"], p["at"], m, p["seq"], p["prev"], p["pid"], p["redelivered"])
            for m, p in effects
            if p["key"] in broken
        )
        (tmp_path / "violations.log").write_text("\n".join(map(str, story)) + "\n")
    twice = len(ids) - len(set(ids))
    letters = DeadLetter.objects.filter(consumer=name).count()
    final = set(KeySequence.objects.filter(consumer=name).values_list("seq", flat=True))
    consumer_log = fleet.text("consumer")
    report_figures(
        f"\nordered ledger: events={len(committed)} (expected {EVENTS}) keys={KEYS} "
        f"consumers={CONSUMERS} applied={len(set(ids))} lost={len(lost)} "
        f"applied_twice={twice} order_violations={len(violations)} dead_letters={letters}"
        f"\n  kills={fleet.kills} broker_restarts=1 unexpected_exits="
        f"{len(fleet.unexpected_exits)} redeliveries_seen="
        f"{consumer_log.count('received a redelivered message')} "
        f"duplicates_absorbed={consumer_log.count('skipped duplicate')}"
        f"\n  wall_time={wall:.1f}s rate={len(set(ids)) / max(wall, 0.001):.0f}/s "
        + " ".join(f"{k}={v:.1f}s" for k, v in marks.items())
    )

    assert not errors, f"the chaos thread failed: {errors[0]!r}"
    assert len(committed) == EVENTS
    assert fleet.kills >= 3, "the consumers were not killed (the run proved nothing)"
    assert not lost, f"{len(lost)} committed event(s) never applied: {sorted(lost)[:10]}"
    assert twice == 0
    assert letters == 0
    assert not violations, f"per-key order broken: {violations[:5]}"
    assert final == {EVENTS // KEYS}
