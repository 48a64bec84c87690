#!/usr/bin/env python
"""The database transport (``db://``) on PostgreSQL: consumer throughput and relay rate.

* **Consumer**: per round, ``--count`` ~1 KiB events are put in two queues of the queue
  table, then drained by

  - a **raw loop** (hand-written SQL on the same database and driver): per message, one
    transaction of ``DELETE ... RETURNING`` (the row picked ``FOR UPDATE SKIP LOCKED``),
    JSON decode, the ``ProcessedMessage`` insert (``ON CONFLICT DO NOTHING``) and the
    ``Order`` insert, ``COMMIT``;
  - the **EventConsumer** on :class:`~reliable_events.consumer.worker.Worker` with
    ``BROKER_URL = "db://"``: the same work through the library (claim, decode and
    validate, idempotency record and ``handle`` in a savepoint, delete, commit).

  The two take turns, ``--chunk`` messages each (same background load).  Rate: messages
  per busy second.  ``--batch`` sizes (default 1 and 20: ``CONSUMER_BATCH_SIZE``) are
  each compared with the same per-message raw loop, as in bench/consume.py.  No target:
  the library's loop costs two more round trips per message (the savepoint around
  ``handle``, which lets a failed handler's retry or dead letter commit with the claim).
* **Relay**: ``--count`` pending outbox rows (one consumer bound to their topic), drained
  by ``Relay.drain()`` into the queue table (claim, route, insert, mark sent), against a
  hand-written loop doing the same per batch of ``RELAY_BATCH_SIZE`` in one transaction
  (``SELECT ... FOR UPDATE SKIP LOCKED``, ``executemany`` insert, ``UPDATE ... sent``).

Medians over ``--rounds`` rounds (ratios: median of per-round ratios).  Runs on its own
database (``RE_BENCH_PG_NAME``, default ``re_bench_dbtransport``).  PostgreSQL only:
SQLite's figures are dominated by its file sync and say little about the code.

Usage: ``python bench/dbtransport.py [--quick] [--count N] [--rounds N] [--chunk N]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common

RAW_QUEUE = "bench-raw"


def queue_table() -> str:
    from reliable_events.models import QueuedMessage

    return QueuedMessage._meta.db_table


def fill(queue: str, count: int) -> None:
    """``count`` ~1 KiB events in ``queue``, as the relay writes them."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            INSERT INTO {queue_table()} (queue, message_id, topic, key, headers, body,
                attempt, available_at, created_at)
            SELECT %(queue)s, gen_random_uuid()::text, 'bench.created', 'k' || (g %% {common.KEYS}),
                jsonb_build_object('x-event-key', 'k' || (g %% {common.KEYS})),
                convert_to(json_build_object('n', g, 'pad', repeat('x', {common.PAD}))::text,
                    'UTF8'), 1, now(), now()
            FROM generate_series(1, %(count)s) AS g
            """,
            {"queue": queue, "count": count},
        )
        cursor.execute(f"ANALYZE {queue_table()}")


def reset_tables() -> None:
    from django.db import connection

    from reliable_events.models import ProcessedMessage
    from tests.testapp.models import Order

    with connection.cursor() as cursor:
        for table in (Order._meta.db_table, ProcessedMessage._meta.db_table, queue_table()):
            cursor.execute(f"TRUNCATE {table} RESTART IDENTITY")
        cursor.execute(f"TRUNCATE {common.outbox_table()} RESTART IDENTITY")


# -- consumer ---------------------------------------------------------------------------
def raw_chunk(count: int) -> tuple[int, float]:
    """The hand-written loop: claim + delete, idempotency record, effect, one commit each."""
    from django.db import connection

    from reliable_events.models import ProcessedMessage
    from tests.testapp.models import Order

    connection.ensure_connection()
    raw: Any = connection.connection
    claim = (
        f"DELETE FROM {queue_table()} WHERE id = (SELECT id FROM {queue_table()} "
        "WHERE queue = %s AND available_at <= statement_timestamp() ORDER BY id LIMIT 1 "
        "FOR UPDATE SKIP LOCKED) RETURNING message_id, topic, body"
    )
    record = (
        f"INSERT INTO {ProcessedMessage._meta.db_table} (consumer, message_id, topic) "
        "VALUES (%s, %s, %s) ON CONFLICT (consumer, message_id) DO NOTHING"
    )
    effect = f"INSERT INTO {Order._meta.db_table} (reference) VALUES (%s)"
    stamps: list[float] = []
    with raw.cursor() as cursor:
        while len(stamps) < count:
            with raw.transaction():
                cursor.execute(claim, [RAW_QUEUE])
                row = cursor.fetchone()
                if row is None:
                    raise RuntimeError("the raw queue ran dry")
                message_id, topic, body = row
                payload = json.loads(bytes(body))
                cursor.execute(record, ["raw", message_id, topic])
                cursor.execute(effect, [f"raw|{payload['n']}"])
            stamps.append(time.perf_counter())
    return len(stamps), stamps[-1] - stamps[0]


def consumer_chunk(consumer: Any, count: int) -> tuple[int, float]:
    from reliable_events.consumer.worker import Worker

    worker = Worker([consumer], url="db://", log_every=10**9)
    stats = worker.run(until_idle=5.0, max_messages=count)
    if stats.processed < count or stats.first_settled is None or stats.last_settled is None:
        raise RuntimeError(f"processed {stats.processed} of {count}: {stats}")
    return stats.processed, stats.last_settled - stats.first_settled


def consumer_round(consumer: Any, count: int, chunk: int) -> tuple[float, float]:
    reset_tables()
    fill(RAW_QUEUE, count)
    fill(consumer.queue_name(), count)
    raw_n = raw_s = ours_n = ours_s = 0.0
    turns = 0
    done = 0
    while done < count:
        size = min(chunk, count - done)
        n, seconds = raw_chunk(size)
        raw_n, raw_s = raw_n + n, raw_s + seconds
        n, seconds = consumer_chunk(consumer, size)
        ours_n, ours_s = ours_n + n, ours_s + seconds
        turns += 1
        done += size
    return (raw_n - turns) / raw_s, (ours_n - turns) / ours_s


# -- relay -------------------------------------------------------------------------------
def raw_relay(batch: int) -> int:
    """Hand-written outbox -> queue table: claim a batch, insert its rows, mark it sent."""
    from django.db import connection

    from reliable_events.models import OutboxMessage

    outbox = OutboxMessage._meta.db_table
    moved = 0
    raw: Any = connection.connection
    with raw.cursor() as cursor:
        while True:
            with raw.transaction():
                cursor.execute(
                    "SELECT id, message_id, topic, key, payload::text, headers::text "
                    f"FROM {outbox} WHERE status = 'pending' "
                    "AND next_attempt_at <= statement_timestamp() "
                    "ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED",
                    [batch],
                )
                rows = cursor.fetchall()
                if not rows:
                    return moved
                cursor.executemany(
                    f"INSERT INTO {queue_table()} (queue, message_id, topic, key, headers, body, "
                    "attempt, available_at) VALUES (%s, %s, %s, %s, %s::jsonb, %s, 1, "
                    "statement_timestamp())",
                    [(RAW_QUEUE, r[1], r[2], r[3], r[5], r[4].encode()) for r in rows],
                )
                cursor.execute(
                    f"UPDATE {outbox} SET status = 'sent', sent_at = statement_timestamp(), "
                    "attempts = attempts + 1 WHERE id = ANY(%s)",
                    [[r[0] for r in rows]],
                )
            moved += len(rows)


def relay_round(count: int) -> tuple[float, float]:
    from django.db import connection

    from reliable_events.conf import app_settings
    from reliable_events.relay import Relay

    reset_tables()
    common.seed_rows(count)
    connection.ensure_connection()
    started = time.perf_counter()
    moved = raw_relay(int(app_settings.RELAY_BATCH_SIZE))
    raw_rate = moved / (time.perf_counter() - started)
    reset_tables()
    common.seed_rows(count)
    relay = Relay()
    try:
        report = relay.drain()
    finally:
        relay.close()
    if report.sent != count or moved != count:
        raise RuntimeError(f"moved {moved}, relay sent {report.sent} of {count}")
    return raw_rate, report.sent / report.seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small run (1,000 events, 1 round)")
    parser.add_argument("--count", type=int, default=None, help="events per loop (default 4000)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3)")
    parser.add_argument("--chunk", type=int, default=2000, help="messages per consumer turn")
    parser.add_argument(
        "--batch", type=int, nargs="+", default=[1, 20], help="consumer batch sizes (1 20)"
    )
    args = parser.parse_args(argv)
    count = args.count or (1000 if args.quick else 4000)
    rounds = args.rounds or (1 if args.quick else 3)
    os.environ.setdefault("RE_BENCH_PG_NAME", "re_bench_dbtransport")
    common.setup_django()
    from django.conf import settings
    from django.test import override_settings

    config = {**settings.RELIABLE_EVENTS, "BROKER_URL": "db://", "EXCHANGE": "bench-events"}
    consumers: dict[int, dict[str, list[float]]] = {
        batch: {"raw": [], "ours": [], "ratio": []} for batch in args.batch
    }
    relay: dict[str, list[float]] = {"raw": [], "ours": [], "ratio": []}

    def add(samples: dict[str, list[float]], raw: float, ours: float) -> None:
        for key, value in (("raw", raw), ("ours", ours), ("ratio", ours / raw)):
            samples[key].append(value)

    with override_settings(RELIABLE_EVENTS=config):
        consumer = common.bench_consumer("bench.db-consumer")
        for number in range(1, rounds + 1):
            for batch, samples in consumers.items():
                consumer.batch_size = batch
                raw, ours = consumer_round(consumer, count, args.chunk)
                add(samples, raw, ours)
                print(
                    f"consumer batch {batch} round {number}: raw SQL loop {raw:,.0f}/s  "
                    f"EventConsumer on db:// {ours:,.0f}/s  ratio {ours / raw:.2f}",
                    flush=True,
                )
            raw, ours = relay_round(count)
            add(relay, raw, ours)
            print(
                f"relay round {number}: hand-written outbox->queue {raw:,.0f}/s  Relay.drain() "
                f"into db:// {ours:,.0f}/s  ratio {ours / raw:.2f}",
                flush=True,
            )
        reset_tables()
    print(f"events={count} per loop and round, rounds={rounds}; {common.machine()} (medians)")
    table = []
    for batch, samples in consumers.items():
        row = {
            "benchmark": f"EventConsumer on db://, batch {batch} (events/s)",
            "value": common.median(samples["ours"]),
            "baseline": "raw SQL claim+delete+insert loop",
            "baseline_value": common.median(samples["raw"]),
            "ratio": common.median(samples["ratio"]),
            "target": "",
            "met": None,
        }
        table.append(row)
        print(
            f"  EventConsumer on db://, batch {batch}: {row['value']:,.0f} events/s vs raw SQL "
            f"loop {row['baseline_value']:,.0f}/s, ratio {row['ratio']:.2f}"
        )
    table.append(
        {
            "benchmark": "relay drain into db:// (events/s)",
            "value": common.median(relay["ours"]),
            "baseline": "hand-written outbox->queue batches",
            "baseline_value": common.median(relay["raw"]),
            "ratio": common.median(relay["ratio"]),
            "target": "",
            "met": None,
        }
    )
    print(
        f"  relay into db://: {table[-1]['value']:,.0f} events/s vs hand-written "
        f"{table[-1]['baseline_value']:,.0f}/s, ratio {table[-1]['ratio']:.2f}"
    )
    common.emit(
        "dbtransport",
        {
            "events": count,
            "rounds": rounds,
            "samples": {"consumer": consumers, "relay": relay},
            "table": table,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
