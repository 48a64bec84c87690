#!/usr/bin/env python
"""Relay throughput: pending outbox rows -> broker-confirmed, against raw py-amqp.

Per round, on the same broker and with the same ~1 KiB persistent messages (same
properties and headers as the relay sends):

* **raw window** (the baseline): plain py-amqp, ``Channel.basic_publish`` with up to
  ``--raw-window`` outstanding publisher confirms, read with ``drain_events``;
* **kombu per-message**: kombu's ``confirm_publish=True`` transport option, which waits
  for each ``basic.ack`` (one round trip per message);
* **publisher only** (informational): ``AmqpPublisher.publish`` on prebuilt messages,
  no database: the ceiling of the relay's own publisher;
* **relay**: ``Relay.drain()`` (what ``relay_once()`` runs) over ``--rows`` pending rows
  seeded by one SQL statement, until every row is confirmed and marked sent;
* **relay through PgBouncer** (when ``pgbouncer`` is installed, unless
  ``--no-pgbouncer``): the same, with every database connection of the relay going
  through a private PgBouncer in transaction pooling mode (``tests/support/pgbouncer.py``),
  as a ratio to the same round's raw window.

Target (issue #2): relay >= 0.8 x raw window.  The verdict uses the median of the
per-round ratios (relay and raw measured back to back; the machine is shared and noisy);
the ratio of the medians is printed too.  The order inside a round alternates.

``--cluster`` runs the same rounds on a private 3-node RabbitMQ cluster started for the
run (``tests/support/rabbit_node.py``; never the machine's own broker): quorum queues,
the relay given the three nodes as its ``BROKER_URL`` list, the raw baseline on the
node the relay connects to first, in the same run.  A confirm then means a majority of
the nodes has the message, so both rates are lower than on one node; the ratio is what
is compared.

Usage: ``python bench/relay.py [--quick] [--rows N] [--rounds N] [--cluster]``
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common

TARGET_RATIO = 0.8
TOPIC = "bench.created"


def _messages(count: int) -> list[tuple[bytes, str, str]]:
    return [(common.body_for(n), str(uuid.uuid4()), common.key_for(n)) for n in range(count)]


def raw_window_rate(broker: common.BenchBroker, count: int, window: int) -> float:
    """Messages/s of plain py-amqp with a sliding window of ``window`` confirms."""
    from amqp import Message
    from kombu import Connection

    prepared = _messages(count)
    conn = Connection(broker.url)
    conn.connect()
    raw = conn.connection
    channel = raw.channel()
    channel.confirm_select()
    unconfirmed: dict[int, None] = {}

    def on_ack(tag: int, multiple: bool) -> None:
        if not multiple:
            unconfirmed.pop(tag, None)
            return
        for seq in list(unconfirmed):
            if seq > tag:
                break
            del unconfirmed[seq]

    channel.events["basic_ack"].add(on_ack)
    try:
        started = time.perf_counter()
        stamp = int(time.time())
        for seq, (body, message_id, key) in enumerate(prepared, start=1):
            while len(unconfirmed) >= window:
                raw.drain_events(timeout=30)
            unconfirmed[seq] = None
            channel.basic_publish(
                Message(
                    body,
                    content_type="application/json",
                    content_encoding="utf-8",
                    delivery_mode=2,
                    message_id=message_id,
                    type=TOPIC,
                    timestamp=stamp,
                    application_headers={"x-event-key": key},
                ),
                exchange=broker.exchange,
                routing_key=TOPIC,
            )
        while unconfirmed:
            raw.drain_events(timeout=30)
        elapsed = time.perf_counter() - started
    finally:
        conn.release()
    return count / elapsed


def kombu_confirm_rate(broker: common.BenchBroker, count: int) -> float:
    """Messages/s of kombu's ``confirm_publish=True`` (waits for each ack)."""
    from kombu import Connection, Exchange, Producer

    prepared = _messages(count)
    with Connection(broker.url, transport_options={"confirm_publish": True}) as conn:
        producer = Producer(
            conn.channel(), exchange=Exchange(broker.exchange, "topic"), auto_declare=False
        )
        started = time.perf_counter()
        stamp = int(time.time())
        for body, message_id, key in prepared:
            producer.publish(
                body,
                routing_key=TOPIC,
                content_type="application/json",
                content_encoding="utf-8",
                delivery_mode=2,
                message_id=message_id,
                type=TOPIC,
                timestamp=stamp,
                headers={"x-event-key": key},
                retry=False,
            )
        elapsed = time.perf_counter() - started
    return count / elapsed


def publisher_rate(broker: common.BenchBroker, count: int, *, window: int, batch: int) -> float:
    """Messages/s of ``AmqpPublisher`` alone (prebuilt messages, no database)."""
    from reliable_events.broker import KEY_HEADER, AmqpPublisher, OutgoingMessage

    stamp = int(time.time())
    messages = [
        OutgoingMessage(
            ref=n,
            exchange=broker.exchange,
            routing_key=TOPIC,
            body=body,
            message_id=message_id,
            topic=TOPIC,
            headers={KEY_HEADER: key},
            timestamp=stamp,
        )
        for n, (body, message_id, key) in enumerate(_messages(count))
    ]
    publisher = AmqpPublisher(broker.url, window=window, declare_events_topology=False)
    publisher.connect()
    confirmed = 0
    try:
        started = time.perf_counter()
        for start in range(0, count, batch):
            result = publisher.publish(messages[start : start + batch], timeout=30, wait=False)
            confirmed += len(result.confirmed)
        confirmed += len(publisher.flush(timeout=30).confirmed)
        elapsed = time.perf_counter() - started
    finally:
        publisher.close()
    if confirmed != count:
        raise SystemExit(f"publisher run incomplete: {confirmed} of {count} confirmed")
    return count / elapsed


def relay_rate(
    broker: common.BenchBroker, count: int, *, batch: int | None, window: int | None
) -> tuple[float, Any]:
    """Events/s of ``Relay.drain()`` over ``count`` seeded pending rows."""
    from reliable_events.broker import open_publisher
    from reliable_events.relay import Relay

    common.truncate_outbox()
    common.seed_rows(count)
    relay = Relay(batch_size=batch, publisher=open_publisher(window=window))
    try:
        relay.publisher.declare(empty_topology())  # connect outside the timing, like raw
        started = time.perf_counter()
        report = relay.drain()
        elapsed = time.perf_counter() - started
    finally:
        relay.close()
    sent = common.count_status("sent")
    delivered = broker.count()
    if report.sent != count or sent != count or delivered < count:
        raise SystemExit(
            f"relay run incomplete: report={report} sent rows={sent} in queue={delivered}"
        )
    return count / elapsed, report


def relay_rate_pgbouncer(
    bouncer: Any, broker: common.BenchBroker, count: int, *, batch: int | None, window: int | None
) -> float:
    """:func:`relay_rate` with every connection of the Django alias through ``bouncer``."""
    from tests.support.pgbouncer import route_through

    with route_through(bouncer):
        return relay_rate(broker, count, batch=batch, window=window)[0]


@contextlib.contextmanager
def pgbouncer(enabled: bool) -> Any:
    """A private PgBouncer in front of the benchmark database (``None`` if disabled)."""
    from tests.support.pgbouncer import PgBouncer, available

    if not enabled or not available():
        yield None
        return
    from django.db import connection

    database = connection.settings_dict
    bouncer = PgBouncer(host=str(database["HOST"]), port=int(database["PORT"])).start()
    try:
        yield bouncer
    finally:
        bouncer.stop()


def empty_topology() -> Any:
    from reliable_events.topology import Topology

    return Topology(exchanges=(), queues=())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small run (5,000 rows, 1 round)")
    parser.add_argument("--rows", type=int, default=None, help="pending rows (default 20000)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 5)")
    parser.add_argument("--kombu-messages", type=int, default=None, help="default 2000")
    parser.add_argument("--batch", type=int, default=None, help="RELAY_BATCH_SIZE override")
    parser.add_argument("--window", type=int, default=None, help="CONFIRM_WINDOW override")
    parser.add_argument("--raw-window", type=int, default=500, help="raw baseline window")
    parser.add_argument(
        "--cluster", action="store_true", help="on a private 3-node cluster, quorum queues"
    )
    parser.add_argument(
        "--no-pgbouncer", action="store_true", help="skip the run through PgBouncer"
    )
    args = parser.parse_args(argv)
    rows = args.rows or (5000 if args.quick else 20000)
    rounds = args.rounds or (1 if args.quick else 5)
    kombu_count = args.kombu_messages or (500 if args.quick else 2000)

    common.setup_django()
    from reliable_events.conf import app_settings

    samples: dict[str, list[float]] = {
        "raw": [],
        "kombu": [],
        "publisher": [],
        "relay": [],
        "pgbouncer": [],
    }
    ratios: list[float] = []
    pooled_ratios: list[float] = []
    with contextlib.ExitStack() as stack:
        url = None
        if args.cluster:
            from tests.support.rabbit_node import private_rabbit_cluster

            print("starting a private 3-node RabbitMQ cluster ...", flush=True)
            url = stack.enter_context(private_rabbit_cluster()).url
        broker = stack.enter_context(
            common.bench_broker(url=url, quorum=args.cluster, PUBLISH_ON_COMMIT=False)
        )
        bouncer = stack.enter_context(pgbouncer(not (args.no_pgbouncer or args.cluster)))
        batch = args.batch or int(app_settings.RELAY_BATCH_SIZE)
        window = args.window or int(app_settings.CONFIRM_WINDOW)
        for number in range(1, rounds + 1):
            measured: dict[str, float] = {}
            order = ["raw", "relay"] if number % 2 else ["relay", "raw"]
            extra = ["pgbouncer"] if bouncer is not None else []
            for which in [*order, *extra, "publisher", "kombu"]:
                if which == "pgbouncer":
                    measured[which] = relay_rate_pgbouncer(
                        bouncer, broker, rows, batch=batch, window=window
                    )
                elif which == "raw":
                    measured[which] = raw_window_rate(broker, rows, args.raw_window)
                elif which == "relay":
                    measured[which] = relay_rate(broker, rows, batch=batch, window=window)[0]
                elif which == "publisher":
                    measured[which] = publisher_rate(broker, rows, window=window, batch=batch)
                else:
                    measured[which] = kombu_confirm_rate(broker, kombu_count)
                broker.purge()
            for name, value in measured.items():
                samples[name].append(value)
            ratios.append(measured["relay"] / measured["raw"])
            pooled = ""
            if "pgbouncer" in measured:
                pooled_ratios.append(measured["pgbouncer"] / measured["raw"])
                pooled = (
                    f"  via PgBouncer {measured['pgbouncer']:,.0f}/s"
                    f" (ratio {pooled_ratios[-1]:.2f})"
                )
            print(
                f"round {number}: raw {measured['raw']:,.0f}/s  relay {measured['relay']:,.0f}/s"
                f"  (ratio {ratios[-1]:.2f}){pooled}"
                f"  publisher-only {measured['publisher']:,.0f}/s"
                f"  kombu {measured['kombu']:,.0f}/s",
                flush=True,
            )
        common.truncate_outbox()
    raw, kombu, publisher, relay = (
        common.median(samples[name]) for name in ("raw", "kombu", "publisher", "relay")
    )
    ratio = common.median(ratios)
    met = ratio >= TARGET_RATIO
    where = "3-node cluster, quorum queues" if args.cluster else "one node, classic queues"
    print(f"rows={rows} rounds={rounds} batch={batch} window={window} {where} (medians)")
    print(f"  raw py-amqp, window {args.raw_window:<5}  : {raw:10,.0f} msg/s   (baseline)")
    print(f"  kombu confirm_publish=True  : {kombu:10,.0f} msg/s")
    print(f"  AmqpPublisher alone, no DB  : {publisher:10,.0f} msg/s")
    print(f"  relay, outbox -> confirmed  : {relay:10,.0f} events/s")
    table_pooled: list[dict[str, Any]] = []
    if pooled_ratios:
        pooled_rate = common.median(samples["pgbouncer"])
        pooled_ratio = common.median(pooled_ratios)
        print(f"  relay via PgBouncer (txn)   : {pooled_rate:10,.0f} events/s")
        print(
            f"  relay via PgBouncer / raw = {pooled_ratio:.2f} median of rounds "
            f"(target >= {TARGET_RATIO}: {common.verdict(pooled_ratio >= TARGET_RATIO)})"
        )
        table_pooled.append(
            {
                "benchmark": "relay drain via PgBouncer, transaction pooling (events/s)",
                "value": pooled_rate,
                "baseline": f"raw py-amqp window {args.raw_window}",
                "baseline_value": raw,
                "ratio": pooled_ratio,
                "target": f">= {TARGET_RATIO}",
                "met": pooled_ratio >= TARGET_RATIO,
            }
        )
    print(
        f"  relay / raw = {ratio:.2f} median of rounds, {relay / raw:.2f} of medians "
        f"(target >= {TARGET_RATIO}: {common.verdict(met)}); relay / kombu = {relay / kombu:.1f}x;"
        f" relay / publisher alone = {relay / publisher:.2f}"
    )
    common.emit(
        "relay_cluster" if args.cluster else "relay",
        {
            "broker": where,
            "rows": rows,
            "rounds": rounds,
            "batch": batch,
            "window": window,
            "raw_window_rate": raw,
            "kombu_confirm_rate": kombu,
            "publisher_rate": publisher,
            "relay_rate": relay,
            "ratio": ratio,
            "ratio_of_medians": relay / raw,
            "target": TARGET_RATIO,
            "met": met,
            "samples": {**samples, "ratios": ratios, "pgbouncer_ratios": pooled_ratios},
            "table": [
                {
                    "benchmark": f"relay drain (events/s), {where}",
                    "value": relay,
                    "baseline": f"raw py-amqp window {args.raw_window}",
                    "baseline_value": raw,
                    "ratio": ratio,
                    "target": f">= {TARGET_RATIO}",
                    "met": met,
                },
                {
                    "benchmark": "kombu confirm per message (msg/s)",
                    "value": kombu,
                    "baseline": f"raw py-amqp window {args.raw_window}",
                    "baseline_value": raw,
                    "ratio": kombu / raw,
                    "target": "",
                    "met": None,
                },
                {
                    "benchmark": "AmqpPublisher alone, no DB (msg/s)",
                    "value": publisher,
                    "baseline": f"raw py-amqp window {args.raw_window}",
                    "baseline_value": raw,
                    "ratio": publisher / raw,
                    "target": "",
                    "met": None,
                },
                *table_pooled,
            ],
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
