#!/usr/bin/env python
"""The cost of the Prometheus metrics and heartbeats: consumer and relay, metrics on vs off.

In the same run, on the same broker and database:

* **consumer**: the ``EventConsumer`` loop of ``bench/consume.py`` (same consumer, same
  ~1 KiB events, default prefetch and batch size) with ``METRICS = False`` (the
  baseline) and ``METRICS = True``, taking turns every ``--chunk`` messages so that both
  see the same background load (the heartbeat writes in both: it is not optional);
* **relay**: ``Relay.drain()`` of ``bench/relay.py`` over ``--rows`` seeded pending
  rows, off and on alternately (the order alternates per round).

Target (issue 13): on / off >= 0.9 for each.  Medians of the per-round ratios.

Usage: ``python bench/metrics.py [--quick] [--count N] [--rows N] [--rounds N]``
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common, consume, relay

TARGET_RATIO = 0.9


def switch(on: bool) -> None:
    """Turn the metrics on or off for what is built next (settings + the cached decision)."""
    from django.conf import settings

    from reliable_events import metrics
    from reliable_events.relay import dispatcher

    settings.RELIABLE_EVENTS = {**settings.RELIABLE_EVENTS, "METRICS": on}
    metrics.reset()
    dispatcher.reset()
    assert metrics.enabled() is on


def consumer_round(
    broker: common.BenchBroker, consumer: Any, count: int, chunk: int
) -> tuple[float, float]:
    consume.fill(broker, [consumer.queue_name()], count * 2, direct=True)
    consume.reset_tables()
    off, on = consume.Meter(), consume.Meter()
    done = 0
    while done < count:
        size = min(chunk, count - done)
        for meter, state in ((off, False), (on, True)):
            switch(state)
            meter.add(*consume.consumer_chunk(consumer, broker.url, size))
        done += size
    return off.rate, on.rate


def relay_round(broker: common.BenchBroker, rows: int, number: int) -> tuple[float, float]:
    measured: dict[bool, float] = {}
    for state in (False, True) if number % 2 else (True, False):
        switch(state)
        measured[state] = relay.relay_rate(broker, rows, batch=None, window=None)[0]
        broker.purge()
    return measured[False], measured[True]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small run (1 round)")
    parser.add_argument("--count", type=int, default=None, help="events per loop (default 10000)")
    parser.add_argument("--rows", type=int, default=None, help="relay rows (default 20000)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3)")
    parser.add_argument("--chunk", type=int, default=1000, help="messages per turn (1000)")
    args = parser.parse_args(argv)
    count = args.count or (3000 if args.quick else 10000)
    rows = args.rows or (5000 if args.quick else 20000)
    rounds = args.rounds or (1 if args.quick else 3)
    os.environ.setdefault("RE_BENCH_PG_NAME", "re_bench_metrics")

    common.setup_django()
    from reliable_events.topology import declare_on_amqp_channel, full_topology

    samples: dict[str, list[float]] = {k: [] for k in ("c_off", "c_on", "r_off", "r_on")}
    consumer_ratios: list[float] = []
    relay_ratios: list[float] = []
    with common.bench_broker(PUBLISH_ON_COMMIT=False) as broker:
        consumer = consume.make_consumer(f"bench.metrics-{uuid.uuid4().hex[:10]}")
        broker.extra_queues.extend(spec.name for spec in consumer.queue_specs())
        conn, channel = broker._channel()
        try:
            declare_on_amqp_channel(channel, full_topology(consumer.queue_specs()))
        finally:
            conn.release()
        for number in range(1, rounds + 1):
            c_off, c_on = consumer_round(broker, consumer, count, args.chunk)
            broker.purge()
            r_off, r_on = relay_round(broker, rows, number)
            for key, value in zip(samples, (c_off, c_on, r_off, r_on), strict=True):
                samples[key].append(value)
            consumer_ratios.append(c_on / c_off)
            relay_ratios.append(r_on / r_off)
            print(
                f"round {number}: consumer off {c_off:,.0f}/s on {c_on:,.0f}/s "
                f"({consumer_ratios[-1]:.2f}); relay off {r_off:,.0f}/s on {r_on:,.0f}/s "
                f"({relay_ratios[-1]:.2f})",
                flush=True,
            )
        common.truncate_outbox()
        consume.reset_tables()
    c_ratio, r_ratio = common.median(consumer_ratios), common.median(relay_ratios)
    met = c_ratio >= TARGET_RATIO and r_ratio >= TARGET_RATIO
    medians = {key: common.median(values) for key, values in samples.items()}
    print(f"events={count} rows={rows} rounds={rounds}; {common.machine()} (medians)")
    print(
        f"  consumer: off {medians['c_off']:,.0f}/s  on {medians['c_on']:,.0f}/s  "
        f"ratio {c_ratio:.2f}"
    )
    print(
        f"  relay   : off {medians['r_off']:,.0f}/s  on {medians['r_on']:,.0f}/s  "
        f"ratio {r_ratio:.2f}  (target >= {TARGET_RATIO} each: {common.verdict(met)})"
    )
    common.emit(
        "metrics",
        {
            "events": count,
            "rows": rows,
            "rounds": rounds,
            "consumer_off_rate": medians["c_off"],
            "consumer_on_rate": medians["c_on"],
            "consumer_ratio": c_ratio,
            "relay_off_rate": medians["r_off"],
            "relay_on_rate": medians["r_on"],
            "relay_ratio": r_ratio,
            "ratio": min(c_ratio, r_ratio),
            "target": TARGET_RATIO,
            "met": met,
            "samples": {"consumer": consumer_ratios, "relay": relay_ratios},
            "table": [
                {
                    "benchmark": "EventConsumer, metrics on (events/s)",
                    "value": medians["c_on"],
                    "baseline": "same loop, METRICS = False",
                    "baseline_value": medians["c_off"],
                    "ratio": c_ratio,
                    "target": f">= {TARGET_RATIO}",
                    "met": c_ratio >= TARGET_RATIO,
                },
                {
                    "benchmark": "relay drain, metrics on (events/s)",
                    "value": medians["r_on"],
                    "baseline": "same drain, METRICS = False",
                    "baseline_value": medians["r_off"],
                    "ratio": r_ratio,
                    "target": f">= {TARGET_RATIO}",
                    "met": r_ratio >= TARGET_RATIO,
                },
            ],
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
