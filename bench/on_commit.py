#!/usr/bin/env python
"""Commit -> broker-confirmed latency of the on-commit publish path.

Each operation is one transaction that stores one ~1 KiB event with ``publish_event``
(``PUBLISH_ON_COMMIT=True``) and commits.  Two ``transaction.on_commit`` callbacks
frame the library's hook: one registered before ``publish_event`` stamps the end of the
``COMMIT``; the publisher's ``publish`` is wrapped to stamp the moment the broker's
``basic.ack`` has been received.  The latency is the difference (it includes the hook's
claim query, building the message, the publish and RabbitMQ's confirm, which for a
persistent message on a durable queue waits for RabbitMQ's disk sync).  "Marked sent"
adds the ``UPDATE`` that records it.

Baseline, measured in the same run on the same broker: one persistent message published
with plain py-amqp on a warm confirm-mode channel, waiting for its ``basic.ack`` (the
broker round trip with its disk sync, nothing else).

Target (issue #2): p50 <= 5 ms, p99 <= 50 ms.  Samples of all rounds are pooled; the
machine is shared and noisy.

Usage: ``python bench/on_commit.py [--quick] [--ops N] [--rounds N]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common

TARGET_P50_MS = 5.0
TARGET_P99_MS = 50.0
TOPIC = "bench.created"


def raw_confirm_latencies(broker: common.BenchBroker, count: int) -> list[float]:
    """Seconds from ``basic_publish`` to its ``basic.ack``, one message at a time."""
    from kombu import Connection

    conn = Connection(broker.url)
    conn.connect()
    raw = conn.connection
    channel = raw.channel()
    channel.confirm_select()
    acks: list[int] = []
    channel.events["basic_ack"].add(lambda tag, multiple: acks.append(tag))
    latencies = []
    try:
        for n in range(count):
            seen = len(acks)
            started = time.perf_counter()
            channel.basic_publish(
                common.amqp_message(n, TOPIC),
                exchange=broker.exchange,
                routing_key=TOPIC,
            )
            while len(acks) == seen:
                raw.drain_events(timeout=10)
            latencies.append(time.perf_counter() - started)
    finally:
        conn.release()
    return latencies


class _Probe:
    """Stamps commit end, broker confirm and hook end of each transaction."""

    def __init__(self) -> None:
        self.committed = 0.0
        self.confirmed = 0.0
        self.marked = 0.0
        self.wrapped: Any = None

    def wrap(self, publisher: Any) -> None:
        original = publisher.publish

        def publish(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            self.confirmed = time.perf_counter()
            return result

        publisher.publish = publish
        self.wrapped = publisher

    def on_commit(self) -> None:
        self.committed = time.perf_counter()

    def after_hook(self) -> None:
        self.marked = time.perf_counter()


def on_commit_latencies(ops: int) -> tuple[list[float], list[float]]:
    """(commit -> confirmed, commit -> marked sent) seconds of ``ops`` transactions."""
    from django.db import transaction

    from reliable_events import publish_event
    from reliable_events.relay import dispatcher

    probe = _Probe()
    with transaction.atomic():  # warm up: connects the per-process publisher
        publish_event(TOPIC, {"warm": True})
    publisher = dispatcher.publisher
    if publisher is None:
        raise SystemExit("the on-commit hook did not open a publisher")
    probe.wrap(publisher)
    confirmed: list[float] = []
    marked: list[float] = []
    payload = {"n": 0, "pad": "x" * common.PAD}
    for n in range(ops):
        probe.confirmed = 0.0
        with transaction.atomic():
            transaction.on_commit(probe.on_commit)
            publish_event(TOPIC, payload, key=common.key_for(n))
            transaction.on_commit(probe.after_hook)
        if dispatcher.publisher is not publisher or not probe.confirmed:
            raise SystemExit("the on-commit hook did not publish through the probed publisher")
        confirmed.append(probe.confirmed - probe.committed)
        marked.append(probe.marked - probe.committed)
    return confirmed, marked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small run (200 ops, 1 round)")
    parser.add_argument("--ops", type=int, default=None, help="transactions per round (1000)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3)")
    args = parser.parse_args(argv)
    ops = args.ops or (200 if args.quick else 1000)
    rounds = args.rounds or (1 if args.quick else 3)

    common.setup_django()
    from reliable_events.models import OutboxMessage
    from reliable_events.relay import dispatcher

    confirmed: list[float] = []
    marked: list[float] = []
    raw: list[float] = []
    with common.bench_broker(PUBLISH_ON_COMMIT=True) as broker:
        for number in range(1, rounds + 1):
            common.truncate_outbox()
            dispatcher.reset()
            round_confirmed, round_marked = on_commit_latencies(ops)
            sent = OutboxMessage.objects.sent().count()
            if sent != ops + 1:
                raise SystemExit(f"the on-commit hook sent {sent} of {ops + 1} events")
            broker.purge()
            round_raw = raw_confirm_latencies(broker, ops)
            broker.purge()
            confirmed.extend(round_confirmed)
            marked.extend(round_marked)
            raw.extend(round_raw)
            print(
                f"round {number}: commit->confirmed p50 {_ms(round_confirmed, 0.5)} "
                f"p99 {_ms(round_confirmed, 0.99)}   raw confirm p50 {_ms(round_raw, 0.5)} "
                f"p99 {_ms(round_raw, 0.99)}",
                flush=True,
            )
        common.truncate_outbox()
    p50, p90, p99 = (common.percentile(confirmed, q) * 1000 for q in (0.5, 0.9, 0.99))
    m50, m99 = (common.percentile(marked, q) * 1000 for q in (0.5, 0.99))
    r50, r99 = (common.percentile(raw, q) * 1000 for q in (0.5, 0.99))
    met = p50 <= TARGET_P50_MS and p99 <= TARGET_P99_MS
    print(f"ops={ops} per round, rounds={rounds} (pooled samples, ms)")
    print(f"  raw py-amqp publish -> ack (baseline) : p50 {r50:6.2f}  p99 {r99:6.2f}")
    print(
        f"  commit -> broker-confirmed             : p50 {p50:6.2f}  p90 {p90:6.2f}  "
        f"p99 {p99:6.2f}  max {max(confirmed) * 1000:6.2f}"
    )
    print(f"  commit -> marked sent                  : p50 {m50:6.2f}  p99 {m99:6.2f}")
    print(
        f"  ratio to raw: p50 {p50 / r50:.2f}, p99 {p99 / r99:.2f}; target p50 <= "
        f"{TARGET_P50_MS:g} ms, p99 <= {TARGET_P99_MS:g} ms: {common.verdict(met)}"
    )
    common.emit(
        "on_commit",
        {
            "ops": ops,
            "rounds": rounds,
            "p50_ms": p50,
            "p90_ms": p90,
            "p99_ms": p99,
            "max_ms": max(confirmed) * 1000,
            "marked_p50_ms": m50,
            "marked_p99_ms": m99,
            "raw_p50_ms": r50,
            "raw_p99_ms": r99,
            "target_p50_ms": TARGET_P50_MS,
            "target_p99_ms": TARGET_P99_MS,
            "met": met,
            "table": [
                {
                    "benchmark": "on-commit commit->confirmed p50 (ms)",
                    "value": p50,
                    "baseline": "raw py-amqp publish->ack p50",
                    "baseline_value": r50,
                    "ratio": p50 / r50,
                    "target": f"<= {TARGET_P50_MS:g} ms",
                    "met": p50 <= TARGET_P50_MS,
                },
                {
                    "benchmark": "on-commit commit->confirmed p99 (ms)",
                    "value": p99,
                    "baseline": "raw py-amqp publish->ack p99",
                    "baseline_value": r99,
                    "ratio": p99 / r99,
                    "target": f"<= {TARGET_P99_MS:g} ms",
                    "met": p99 <= TARGET_P99_MS,
                },
            ],
        },
    )
    return 0


def _ms(values: list[float], q: float) -> str:
    return f"{common.percentile(values, q) * 1000:6.2f} ms"


if __name__ == "__main__":
    sys.exit(main())
