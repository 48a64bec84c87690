#!/usr/bin/env python
"""Consumer throughput: an ``EventConsumer`` against a raw py-amqp consume-and-ack loop.

Per round, the same ``--count`` persistent ~1 KiB JSON events are put in a queue, then
drained by:

* **raw loop**: plain py-amqp, ``basic.qos(prefetch)``, manual ack; per message it
  decodes the JSON body and inserts one row (``Order.objects.create``) in autocommit,
  i.e. one commit per message, then acks.  No idempotency, no retries, no dead letters:
  the floor any hand-written reliable consumer starts from.
* **EventConsumer**: :class:`reliable_events.consumer.worker.Worker` running a consumer whose
  ``handle`` does the same insert; per message it validates the delivery, inserts the
  ``ProcessedMessage`` record and runs ``handle`` in one transaction (one commit), then
  acks.

Both queues are filled before a round starts; the two loops then take turns, ``--chunk``
messages each, so that both see the same background load (the machine may be shared).
A rate is messages per second of busy time, each turn timed from its first to its last
settled message.  Target (issue #3): EventConsumer >= 0.7 x raw, at the default settings
(``PREFETCH_COUNT`` 20, ``batch_size`` 1).  ``--prefetch`` and ``--batch`` compare other
settings.  Medians over ``--rounds`` rounds (the ratio: median of the per-round ratios).

It runs on its own database (``RE_BENCH_PG_NAME``, default ``re_bench_consume``, created
if missing) and a private exchange and queues (deleted at the end).

Usage: ``python bench/consume.py [--quick] [--count N] [--rounds N] [--prefetch N ...]
[--batch N ...]``
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

TARGET_RATIO = 0.7


def fill(broker: common.BenchBroker, queue: str, count: int) -> None:
    """Put ``count`` events in ``queue`` (through the exchange) and wait until they are in."""
    from kombu import Connection

    conn = Connection(broker.url)
    conn.connect()
    channel = conn.connection.channel()
    channel.confirm_select()
    try:
        for n in range(count):
            channel.basic_publish(
                common.amqp_message(n, "bench.created"),
                exchange=broker.exchange,
                routing_key="bench.created",
            )
        deadline = time.monotonic() + 120
        while channel.queue_declare(queue, passive=True).message_count < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{queue} did not fill up")
            time.sleep(0.1)
    finally:
        conn.release()


class Meter:
    """Messages and busy seconds over several chunks: ``rate = (n - chunks) / seconds``,
    each chunk timed from its first to its last settled message."""

    def __init__(self) -> None:
        self.messages = 0
        self.seconds = 0.0
        self.chunks = 0

    def add(self, messages: int, seconds: float) -> None:
        self.messages += messages
        self.seconds += seconds
        self.chunks += 1

    @property
    def rate(self) -> float:
        return (self.messages - self.chunks) / self.seconds if self.seconds else 0.0


def raw_chunk(
    broker: common.BenchBroker, queue: str, count: int, prefetch: int
) -> tuple[int, float]:
    """The raw py-amqp loop over ``count`` messages: decode, insert (autocommit), ack."""
    from kombu import Connection

    from tests.testapp.models import Order

    conn = Connection(broker.url)
    conn.connect()
    raw = conn.connection
    channel = raw.channel()
    channel.basic_qos(0, prefetch, False)
    stamps: list[float] = []

    def on_message(message: Any) -> None:
        if len(stamps) >= count:
            return  # past the chunk: left unacked, requeued when the channel closes
        payload = json.loads(message.body)
        Order.objects.create(reference=f"raw|{payload['n']}")
        channel.basic_ack(message.delivery_info["delivery_tag"])
        stamps.append(time.perf_counter())

    channel.basic_consume(queue, no_ack=False, callback=on_message)
    try:
        while len(stamps) < count:
            raw.drain_events(timeout=30)
    finally:
        conn.release()
    return len(stamps), stamps[-1] - stamps[0]


def consumer_chunk(consumer: Any, url: str, count: int, prefetch: int) -> tuple[int, float]:
    """The EventConsumer loop over ``count`` messages."""
    from reliable_events.consumer.worker import Worker

    worker = Worker([consumer], url=url, prefetch=prefetch, log_every=10**9)
    stats = worker.run(until_idle=5.0, max_messages=count)
    if stats.settled < count or stats.first_settled is None or stats.last_settled is None:
        raise RuntimeError(f"settled {stats.settled} of {count}: {stats}")
    if stats.reconnects:  # the broker is shared: someone may close every connection
        print(f"  (the consumer reconnected {stats.reconnects} time(s): {stats})", flush=True)
    return stats.settled, stats.last_settled - stats.first_settled


def reset_tables() -> None:
    from django.db import connection

    from reliable_events.models import ProcessedMessage
    from tests.testapp.models import Order

    with connection.cursor() as cursor:
        for model in (Order, ProcessedMessage):
            cursor.execute(f"TRUNCATE {model._meta.db_table} RESTART IDENTITY")


def run_round(
    broker: common.BenchBroker, consumer: Any, count: int, chunk: int, prefetch: int
) -> tuple[float, float]:
    """Both loops over ``count`` events each, alternating every ``chunk`` messages (so that
    both see the same background load); returns (raw rate, consumer rate)."""
    fill(broker, broker.queue, count)  # one publish feeds both queues
    reset_tables()
    raw, ours = Meter(), Meter()
    done = 0
    while done < count:
        size = min(chunk, count - done)
        raw.add(*raw_chunk(broker, broker.queue, size, prefetch))
        ours.add(*consumer_chunk(consumer, broker.url, size, prefetch))
        done += size
    return raw.rate, ours.rate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small run (4,000 events, 1 round)")
    parser.add_argument("--count", type=int, default=None, help="events per run (default 20000)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3)")
    parser.add_argument(
        "--chunk", type=int, default=2000, help="messages per turn when alternating (2000)"
    )
    parser.add_argument(
        "--prefetch", type=int, nargs="+", default=None, help="prefetch counts (PREFETCH_COUNT)"
    )
    parser.add_argument(
        "--batch", type=int, nargs="+", default=[1], help="consumer batch sizes (default 1)"
    )
    args = parser.parse_args(argv)
    count = args.count or (4000 if args.quick else 20000)
    rounds = args.rounds or (1 if args.quick else 3)
    os.environ.setdefault("RE_BENCH_PG_NAME", "re_bench_consume")

    common.setup_django()
    from django.db import connection

    from reliable_events.conf import app_settings
    from reliable_events.topology import declare_on_amqp_channel, full_topology

    prefetches = args.prefetch or [int(app_settings.PREFETCH_COUNT)]
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        sync_commit = cursor.fetchone()[0]
    results: dict[str, dict[str, Any]] = {}
    with common.bench_broker() as broker:
        consumer = common.bench_consumer("bench.consumer")
        broker.extra_queues.extend(spec.name for spec in consumer.queue_specs())
        conn, channel = broker._channel()
        try:
            declare_on_amqp_channel(channel, full_topology(consumer.queue_specs()))
        finally:
            conn.release()
        for prefetch in prefetches:
            for batch in args.batch:
                consumer.batch_size = batch
                label = f"prefetch={prefetch} batch={batch}"
                raw_rates: list[float] = []
                ec_rates: list[float] = []
                for number in range(1, rounds + 1):
                    raw, ours = run_round(broker, consumer, count, args.chunk, prefetch)
                    raw_rates.append(raw)
                    ec_rates.append(ours)
                    print(
                        f"{label} round {number}: raw {raw:,.0f}/s  EventConsumer {ours:,.0f}/s"
                        f"  ratio {ours / raw:.2f}",
                        flush=True,
                    )
                ratios = [ours / raw for raw, ours in zip(raw_rates, ec_rates, strict=True)]
                results[label] = {
                    "prefetch": prefetch,
                    "batch": batch,
                    "raw_rate": common.median(raw_rates),
                    "consumer_rate": common.median(ec_rates),
                    "ratio": common.median(ratios),
                    "samples": {"raw": raw_rates, "consumer": ec_rates, "ratio": ratios},
                }
        broker.purge()
        reset_tables()
    print(
        f"events={count} per loop and round, rounds={rounds}, alternating every {args.chunk}; "
        f"synchronous_commit={sync_commit}; {common.machine()} (medians)"
    )
    for label, figures in results.items():
        ratio = figures["ratio"]
        print(
            f"  {label:<22}: raw py-amqp loop {figures['raw_rate']:8,.0f} msg/s   "
            f"EventConsumer {figures['consumer_rate']:8,.0f} events/s   ratio {ratio:.2f} "
            f"(target >= {TARGET_RATIO}: {common.verdict(ratio >= TARGET_RATIO)})"
        )
    main_figures = next(iter(results.values()))
    common.emit(
        "consume",
        {
            "events": count,
            "rounds": rounds,
            "prefetch": main_figures["prefetch"],
            "batch": main_figures["batch"],
            "raw_rate": main_figures["raw_rate"],
            "consumer_rate": main_figures["consumer_rate"],
            "ratio": main_figures["ratio"],
            "target": TARGET_RATIO,
            "met": main_figures["ratio"] >= TARGET_RATIO,
            "synchronous_commit": sync_commit,
            "configurations": results,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
