#!/usr/bin/env python
"""Observability overhead: relay drain and consumer with the features on vs off, same run.

Features (``--features``, default all): each is switched on or off as a whole, by its
setting, in the same process:

* ``tracing``: the OpenTelemetry SDK is installed for the whole run (a
  ``BatchSpanProcessor`` into an exporter that drops the spans: what an application
  exporting to a collector pays on the hot path, minus the network), and ``TRACING``
  is on or off.  Every event carries a ``traceparent`` in both runs (as ``publish_event``
  stores it), so the relay links every message of its batches and the consumer opens a
  ``process`` span per delivery, child of that context.  ``--sdk none`` leaves the SDK
  out (the API's non-recording spans): this app's own share of the cost, without the
  SDK's recording of each span.
* ``metrics``: the Prometheus metrics (``METRICS``; on by default when
  ``prometheus_client`` is installed, so "off" here is ``METRICS = False``).

A new feature is one entry of :data:`FEATURES`: a function ``(on) -> settings`` (it may
also install what it needs once).

Per round, back to back and alternating the order: the relay drains ``--rows`` seeded
pending rows (``Relay.drain()``), then the consumer (``Worker``, shipped defaults) drains
``--count`` messages from a RabbitMQ queue, each with the features off and on.
Target (issue #13): on / off >= 0.9 for each, the median of the per-round ratios.

Usage: ``python bench/observability.py [--quick] [--rows N] [--count N] [--rounds N]
[--features tracing ...] [--sdk batch|none]``
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common

TARGET_RATIO = 0.9
TOPIC = "bench.created"


# -- features ---------------------------------------------------------------------------------
_sdk_installed = False
#: ``--sdk``: ``batch`` (the SDK, a ``BatchSpanProcessor``) or ``none`` (the API alone).
sdk_mode = ["batch"]
#: Spans the SDK exported so far (dropped), and how to flush its queue first.
spans_exported = [0]
_flush: list[Callable[[], Any]] = []


def exported_spans() -> int:
    for flush in _flush:
        flush()
    return spans_exported[0]


def tracing(on: bool) -> dict[str, Any]:
    """OpenTelemetry: the SDK installed once (spans dropped by the exporter); ``TRACING``."""
    global _sdk_installed
    if not _sdk_installed and sdk_mode[0] == "batch":
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )

        class Dropped(SpanExporter):
            def export(self, spans: Sequence[Any]) -> SpanExportResult:
                spans_exported[0] += len(spans)
                return SpanExportResult.SUCCESS

        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(Dropped()))
        trace.set_tracer_provider(provider)
        _flush.append(provider.force_flush)
        _sdk_installed = True
    return {"TRACING": on}


def metrics(on: bool) -> dict[str, Any]:
    """Prometheus metrics: ``METRICS`` (decided once per process: :func:`applied` resets
    that decision around each measurement)."""
    return {"METRICS": on}


FEATURES: dict[str, Callable[[bool], dict[str, Any]]] = {"tracing": tracing, "metrics": metrics}


def settings_for(features: Sequence[str], on: bool) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for name in features:
        config.update(FEATURES[name](on))
    return config


# -- the two measurements -------------------------------------------------------------------
@contextmanager
def applied(settings: dict[str, Any]) -> Iterator[None]:
    """``RELIABLE_EVENTS = settings`` for what is built inside, the process-wide metrics
    decision taken again on the way in and out."""
    from django.test import override_settings

    from reliable_events import metrics as app_metrics

    with override_settings(RELIABLE_EVENTS=settings):
        app_metrics.reset()
        if "METRICS" in settings and app_metrics.enabled() is not bool(settings["METRICS"]):
            raise SystemExit(f"METRICS = {settings['METRICS']} did not take (prometheus_client?)")
        try:
            yield
        finally:
            app_metrics.reset()


def traceparent(n: int) -> str:
    return f"00-{uuid.uuid4().hex}-{n + 1:016x}-01"


def seed_traced_rows(count: int) -> None:
    """``count`` pending rows, each with a ``traceparent`` (as ``publish_event`` stores it)."""
    from django.db import connection

    common.seed_rows(count, analyze=False)
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {common.outbox_table()} SET headers = jsonb_build_object('traceparent', "
            "'00-' || md5(id::text) || '-' || lpad(to_hex(id), 16, '0') || '-01')"
        )
        cursor.execute(f"ANALYZE {common.outbox_table()}")


def relay_rate(broker: common.BenchBroker, rows: int, config: dict[str, Any]) -> float:
    from reliable_events.relay import Relay

    common.truncate_outbox()
    seed_traced_rows(rows)
    with applied(broker.settings(PUBLISH_ON_COMMIT=False, **config)):
        relay = Relay()
        try:
            relay.publisher.connect()
            started = time.perf_counter()
            report = relay.drain()
            elapsed = time.perf_counter() - started
        finally:
            relay.close()
    if report.sent != rows:
        raise SystemExit(f"relay run incomplete: {report}")
    broker.purge()
    return rows / elapsed


def fill(broker: common.BenchBroker, queue: str, count: int) -> None:
    """``count`` events with a ``traceparent`` header in ``queue``, confirmed."""
    from amqp import Message
    from kombu import Connection

    conn = Connection(broker.url)
    conn.connect()
    channel = conn.connection.channel()
    channel.confirm_select()
    try:
        for n in range(count):
            channel.basic_publish(
                Message(
                    common.body_for(n),
                    content_type="application/json",
                    content_encoding="utf-8",
                    delivery_mode=2,
                    message_id=str(uuid.uuid4()),
                    type=TOPIC,
                    application_headers={
                        "x-event-key": common.key_for(n),
                        "traceparent": traceparent(n),
                    },
                ),
                exchange=broker.exchange,
                routing_key=TOPIC,
            )
    finally:
        conn.release()


def make_consumer() -> Any:
    from reliable_events.consumer import Event, EventConsumer
    from tests.testapp.models import Order

    class ObservedConsumer(EventConsumer):
        name = f"bench.observed-{uuid.uuid4().hex[:10]}"
        topics = ["bench.#"]
        max_retries = 0

        def handle(self, event: Event) -> None:
            Order.objects.create(reference=f"obs|{event.payload['n']}")

    return ObservedConsumer


def consumer_rate(
    broker: common.BenchBroker, consumer: Any, count: int, config: dict[str, Any]
) -> float:
    from reliable_events.consumer.worker import Worker

    fill(broker, consumer.queue_name(), count)
    with applied(broker.settings(**config)):
        worker = Worker([consumer], url=broker.url, log_every=10**9)
        stats = worker.run(until_idle=10.0, max_messages=count)
    if stats.settled < count or stats.first_settled is None or stats.last_settled is None:
        raise SystemExit(f"consumer run incomplete: {stats}")
    return (count - 1) / (stats.last_settled - stats.first_settled)


# -- main ------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small run (1 round)")
    parser.add_argument("--rows", type=int, default=None, help="relay rows (default 20000)")
    parser.add_argument("--count", type=int, default=None, help="consumer messages (3000)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 5)")
    parser.add_argument("--features", nargs="+", choices=sorted(FEATURES), default=sorted(FEATURES))
    parser.add_argument(
        "--sdk",
        choices=["batch", "none"],
        default="batch",
        help="tracing: the OpenTelemetry SDK with a BatchSpanProcessor (default), or none "
        "(the API's non-recording spans: this app's own share)",
    )
    args = parser.parse_args(argv)
    sdk_mode[0] = args.sdk
    rows = args.rows or (5000 if args.quick else 20000)
    count = args.count or (1000 if args.quick else 3000)
    rounds = args.rounds or (1 if args.quick else 5)
    features = list(args.features)

    common.setup_django()
    from reliable_events.consumer.worker import Worker

    samples: dict[str, list[float]] = {
        "relay_off": [],
        "relay_on": [],
        "consumer_off": [],
        "consumer_on": [],
    }
    with common.bench_broker(PUBLISH_ON_COMMIT=False) as broker:
        consumer = make_consumer()
        broker.extra_queues.append(consumer.queue_name())
        declaring = Worker([consumer], url=broker.url)
        declaring.transport.connect()  # its queue, bound
        declaring.close()  # else its prefetched messages wait for the garbage collector
        for number in range(1, rounds + 1):
            order = [False, True] if number % 2 else [True, False]
            for on in order:
                config = settings_for(features, on)
                state = "on" if on else "off"
                before = exported_spans()
                samples[f"relay_{state}"].append(relay_rate(broker, rows, config))
                samples[f"consumer_{state}"].append(consumer_rate(broker, consumer, count, config))
                made = exported_spans() - before
                recording = "tracing" in features and sdk_mode[0] == "batch"
                if recording and (made >= count if on else made == 0) is False:
                    raise SystemExit(f"tracing {state}: {made} spans for {count} deliveries")
            print(
                f"round {number}: relay off {samples['relay_off'][-1]:,.0f}/s on "
                f"{samples['relay_on'][-1]:,.0f}/s; consumer off "
                f"{samples['consumer_off'][-1]:,.0f}/s on {samples['consumer_on'][-1]:,.0f}/s",
                flush=True,
            )
        common.truncate_outbox()
    table = []
    figures: dict[str, Any] = {"features": features, "sdk": args.sdk, "rows": rows, "count": count}
    shown = "+".join(features)
    if "tracing" in features and args.sdk == "none":
        shown += " (OpenTelemetry API alone, no SDK)"
    for part, label in (("relay", "relay drain"), ("consumer", "consumer")):
        ratios = [
            on / off for on, off in zip(samples[f"{part}_on"], samples[f"{part}_off"], strict=True)
        ]
        ratio = common.median(ratios)
        met = ratio >= TARGET_RATIO
        on_rate, off_rate = (common.median(samples[f"{part}_{s}"]) for s in ("on", "off"))
        print(
            f"  {label}: {shown} on {on_rate:,.0f}/s vs off {off_rate:,.0f}/s = "
            f"{ratio:.2f} (median of rounds; target >= {TARGET_RATIO}: {common.verdict(met)})"
        )
        figures[f"{part}_ratio"] = ratio
        table.append(
            {
                "benchmark": f"{label}, {shown} on (events/s)",
                "value": on_rate,
                "baseline": "same, off",
                "baseline_value": off_rate,
                "ratio": ratio,
                "target": f">= {TARGET_RATIO}",
                "met": met,
            }
        )
    common.emit("observability", {**figures, "samples": samples, "table": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
