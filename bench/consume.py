#!/usr/bin/env python
"""Consumer throughput: ``EventConsumer`` at its defaults against raw py-amqp loops.

Per round, the same ``--count`` persistent ~1 KiB JSON events are put in three queues
(one publish feeds all three), then drained by, taking turns ``--chunk`` messages each so
that all see the same background load (the machine may be shared):

* **(a) raw per-message loop**: plain py-amqp, ``basic.qos(20)``, manual ack; per message
  it decodes the JSON body, inserts one row (``Order.objects.create``) in autocommit (one
  commit per message), then acks.  No idempotency, no retries, no dead letters.
* **(b) raw batch loop, the limit**: py-amqp, ``basic.qos(200)``; the same insert per
  message, one transaction per 100 messages, then one ``basic.ack(multiple=True)``.
* **EventConsumer, defaults**: :class:`reliable_events.consumer.worker.Worker` with the
  shipped settings (``CONSUMER_BATCH_SIZE`` 100, one savepoint per handler, the batch's
  idempotency records in one insert, ``PREFETCH_COUNT`` twice the batch); its ``handle``
  does the same insert.

A rate is messages per second of busy time, each turn timed from its first to its last
settled message.  Target (issue #11): EventConsumer >= 0.8 x (b).  Then, per round:
``EventConsumer`` in 1 and in 2 processes on one queue of ``--count`` events (target:
2 processes >= 1.7 x one; the machine has 2 cores) and a plain Celery task with
``acks_late`` doing the same insert (Celery's default prefork pool, one child process:
the peer a user would otherwise pick).  Medians over ``--rounds`` rounds.

It runs on its own database (``RE_BENCH_PG_NAME``, default ``re_bench_consume``, created
if missing) and a private exchange and queues (deleted at the end).

Usage: ``python bench/consume.py [--quick] [--count N] [--rounds N] [--no-celery]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common

TARGET_RATIO = 0.8
TARGET_SCALING = 1.7
RAW_PREFETCH = 20
LIMIT_BATCH = 100


def fill(broker: common.BenchBroker, queues: list[str], count: int, *, direct: bool) -> None:
    """Publish ``count`` events (through the exchange, or straight to ``queues[0]`` when
    ``direct``) and wait until every queue of ``queues`` holds them."""
    from kombu import Connection

    conn = Connection(broker.url)
    conn.connect()
    channel = conn.connection.channel()
    channel.confirm_select()
    try:
        for n in range(count):
            channel.basic_publish(
                common.amqp_message(n, "bench.created"),
                exchange="" if direct else broker.exchange,
                routing_key=queues[0] if direct else "bench.created",
            )
        deadline = time.monotonic() + 120
        for queue in queues:
            while channel.queue_declare(queue, passive=True).message_count < count:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{queue} did not fill up")
                time.sleep(0.1)
    finally:
        conn.release()


class Meter:
    """Messages and busy seconds over several chunks: ``rate = (n - chunks) / seconds``."""

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


def raw_chunk(broker: common.BenchBroker, queue: str, count: int) -> tuple[int, float]:
    """(a): decode, insert (autocommit), ack, per message."""
    from kombu import Connection

    from tests.testapp.models import Order

    conn = Connection(broker.url)
    conn.connect()
    raw = conn.connection
    channel = raw.channel()
    channel.basic_qos(0, RAW_PREFETCH, False)
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


def batch_chunk(broker: common.BenchBroker, queue: str, count: int) -> tuple[int, float]:
    """(b): the same insert per message, a commit per 100, one multiple ack per commit."""
    from django.db import transaction
    from kombu import Connection

    from tests.testapp.models import Order

    conn = Connection(broker.url)
    conn.connect()
    raw = conn.connection
    channel = raw.channel()
    channel.basic_qos(0, 2 * LIMIT_BATCH, False)
    pending: list[Any] = []
    stamps: list[float] = []

    def on_message(message: Any) -> None:
        pending.append(message)

    def commit(messages: list[Any]) -> None:
        with transaction.atomic():
            for message in messages:
                payload = json.loads(message.body)
                Order.objects.create(reference=f"batch|{payload['n']}")
        channel.basic_ack(messages[-1].delivery_info["delivery_tag"], multiple=True)
        now = time.perf_counter()
        stamps.extend(now for _ in messages)

    channel.basic_consume(queue, no_ack=False, callback=on_message)
    try:
        while len(stamps) < count:
            want = min(LIMIT_BATCH, count - len(stamps))
            while len(pending) < want:
                try:
                    raw.drain_events(timeout=0.002 if pending else 30)
                except TimeoutError:
                    break
            taken, pending[:] = pending[:want], pending[want:]
            commit(taken)
    finally:
        conn.release()
    return len(stamps), stamps[-1] - stamps[0]


def consumer_chunk(consumer: Any, url: str, count: int) -> tuple[int, float]:
    """The EventConsumer loop (defaults) over ``count`` messages."""
    from reliable_events.consumer.worker import Worker

    worker = Worker([consumer], url=url, log_every=10**9)
    stats = worker.run(until_idle=5.0, max_messages=count)
    if stats.settled < count or stats.first_settled is None or stats.last_settled is None:
        raise RuntimeError(f"settled {stats.settled} of {count}: {stats}")
    if stats.reconnects:  # the broker is shared: someone may close every connection
        print(f"  (the consumer reconnected {stats.reconnects} time(s): {stats})", flush=True)
    return stats.settled, stats.last_settled - stats.first_settled


def make_consumer(name: str) -> Any:
    from reliable_events.consumer import Event, EventConsumer
    from tests.testapp.models import Order

    class BenchConsumer(EventConsumer):
        topics = ["bench.#"]
        max_retries = 0
        retry_delays = [1]
        abstract = True

        def handle(self, event: Event) -> None:
            Order.objects.create(reference=f"ec|{event.payload['n']}")

    BenchConsumer.name = name
    return BenchConsumer


def reset_tables() -> None:
    from django.db import connection

    from reliable_events.models import ProcessedMessage
    from tests.testapp.models import Order

    with connection.cursor() as cursor:
        for model in (Order, ProcessedMessage):
            cursor.execute(f"TRUNCATE {model._meta.db_table} RESTART IDENTITY")


# -- processes -----------------------------------------------------------------------------
def child_main(args: argparse.Namespace) -> int:
    """One consumer process: connect, say ready, wait for the go, drain, report."""
    common.setup_django()
    from django.test import override_settings

    from reliable_events.consumer.worker import Worker

    config = json.loads(args.child_settings)
    with override_settings(RELIABLE_EVENTS=config):
        worker = Worker([make_consumer(args.child)], log_every=10**9)
        worker.transport.connect()
        Path(args.ready).touch()
        while not Path(args.go).exists():
            time.sleep(0.005)
        stats = worker.run(until_idle=2.0)
    Path(args.out).write_text(
        json.dumps(
            {"settled": stats.settled, "first": stats.first_settled, "last": stats.last_settled}
        )
    )
    return 0


def processes_rate(broker: common.BenchBroker, name: str, count: int, processes: int) -> float:
    """``count`` events drained by ``processes`` consumer processes started together."""
    from django.conf import settings

    fill(broker, [name], count, direct=True)
    reset_tables()
    folder = Path(tempfile.mkdtemp(prefix="bench-consume-"))
    go = folder / "go"
    children = []
    for number in range(processes):
        command = [
            sys.executable,
            __file__,
            "--child",
            name,
            "--child-settings",
            json.dumps(settings.RELIABLE_EVENTS),
            "--ready",
            str(folder / f"ready-{number}"),
            "--go",
            str(go),
            "--out",
            str(folder / f"out-{number}"),
        ]
        children.append(subprocess.Popen(command, env=dict(os.environ)))
    deadline = time.monotonic() + 120
    while not all((folder / f"ready-{n}").exists() for n in range(processes)):
        if time.monotonic() > deadline or any(c.poll() is not None for c in children):
            raise RuntimeError("consumer processes did not start")
        time.sleep(0.02)
    go.touch()
    for child in children:
        child.wait(timeout=600)
    reports = [json.loads((folder / f"out-{n}").read_text()) for n in range(processes)]
    settled = sum(r["settled"] for r in reports)
    if settled < count:
        raise RuntimeError(f"{processes} processes settled {settled} of {count}")
    first = min(r["first"] for r in reports if r["first"] is not None)
    last = max(r["last"] for r in reports if r["last"] is not None)
    return float((settled - 1) / (last - first))


def celery_app(url: str) -> Any:
    from celery import Celery

    app = Celery("bench_consume", broker=url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
    )

    @app.task(name="bench.apply_order", acks_late=True)
    def apply_order(n: int) -> None:
        from tests.testapp.models import Order

        Order.objects.create(reference=f"celery|{n}")

    return app


def celery_child(args: argparse.Namespace) -> int:
    """A Celery worker (its default prefork pool, one child process) for the task queue
    ``--celery``.  Not the solo pool: with a deep queue its event loop sat idle with the
    prefetched messages unacked (2,000 queued: 8 tasks/s; prefork: ~200/s)."""
    common.setup_django()
    app = celery_app(common.amqp_url())
    worker = app.Worker(
        pool="prefork",
        concurrency=1,
        queues=[args.celery],
        loglevel="ERROR",
        without_heartbeat=True,
        without_mingle=True,
        without_gossip=True,
        quiet=True,
        hostname=f"bench-{uuid.uuid4().hex[:8]}@localhost",
    )
    worker.start()
    return 0


def celery_rate(count: int) -> float:
    """A plain Celery ``acks_late`` task doing the same insert, ``count`` of them queued."""
    from tests.testapp.models import Order

    queue = f"bench-celery-{uuid.uuid4().hex[:10]}"
    app = celery_app(common.amqp_url())
    task = app.tasks["bench.apply_order"]
    with app.connection_for_write() as conn:
        for n in range(count):
            task.apply_async(args=[n], queue=queue, connection=conn)
    reset_tables()
    command = [sys.executable, __file__, "--celery", queue]
    child = subprocess.Popen(command, env=dict(os.environ))
    try:
        first: float | None = None
        deadline = time.monotonic() + 600
        while True:
            done = Order.objects.count()
            now = time.monotonic()
            if done and first is None:
                first, first_count = now, done
            if done >= count or now > deadline:
                break
            time.sleep(0.02)
        if first is None or done < count:
            raise RuntimeError(f"celery applied {done} of {count}")
        return (done - first_count) / (now - first)
    finally:
        child.terminate()
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        with app.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)


# -- the run -------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small run (3,000 events, 1 round)")
    parser.add_argument("--count", type=int, default=None, help="events per loop (10000)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3)")
    parser.add_argument("--chunk", type=int, default=2000, help="messages per turn (2000)")
    parser.add_argument("--no-celery", action="store_true", help="skip the Celery peer")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-settings", help=argparse.SUPPRESS)
    parser.add_argument("--ready", help=argparse.SUPPRESS)
    parser.add_argument("--go", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--celery", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("RE_BENCH_PG_NAME", "re_bench_consume")
    if args.child:
        return child_main(args)
    if args.celery:
        return celery_child(args)
    count = args.count or (3000 if args.quick else 10000)
    rounds = args.rounds or (1 if args.quick else 3)

    common.setup_django()
    from django.db import connection

    from reliable_events.conf import app_settings
    from reliable_events.topology import declare_on_amqp_channel, full_topology

    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        sync_commit = cursor.fetchone()[0]
    samples: dict[str, list[float]] = {
        key: [] for key in ("raw", "limit", "ours", "ratio", "one", "two", "scaling", "celery")
    }
    with common.bench_broker() as broker:
        consumer = make_consumer(f"bench.consumer-{uuid.uuid4().hex[:10]}")
        batch_queue = f"{broker.queue}-b"
        broker.extra_queues.extend([batch_queue, *(spec.name for spec in consumer.queue_specs())])
        conn, channel = broker._channel()
        try:
            declare_on_amqp_channel(channel, full_topology(consumer.queue_specs()))
            channel.queue_declare(batch_queue, durable=True, auto_delete=False)
            channel.queue_bind(batch_queue, broker.exchange, "#")
        finally:
            conn.release()
        for number in range(1, rounds + 1):
            fill(broker, [broker.queue, batch_queue, consumer.queue_name()], count, direct=False)
            reset_tables()
            raw, limit, ours = Meter(), Meter(), Meter()
            done = 0
            while done < count:
                size = min(args.chunk, count - done)
                raw.add(*raw_chunk(broker, broker.queue, size))
                limit.add(*batch_chunk(broker, batch_queue, size))
                ours.add(*consumer_chunk(consumer, broker.url, size))
                done += size
            one = processes_rate(broker, consumer.queue_name(), count, 1)
            two = processes_rate(broker, consumer.queue_name(), count, 2)
            peer = float("nan") if args.no_celery else celery_rate(max(1000, count // 5))
            figures = {
                "raw": raw.rate,
                "limit": limit.rate,
                "ours": ours.rate,
                "ratio": ours.rate / limit.rate,
                "one": one,
                "two": two,
                "scaling": two / one,
                "celery": peer,
            }
            for key, value in figures.items():
                samples[key].append(value)
            print(
                f"round {number}: (a) raw {raw.rate:,.0f}/s  (b) limit {limit.rate:,.0f}/s  "
                f"EventConsumer {ours.rate:,.0f}/s  ratio {figures['ratio']:.2f}  "
                f"1 process {one:,.0f}/s  2 processes {two:,.0f}/s ({two / one:.2f}x)  "
                f"Celery {peer:,.0f}/s",
                flush=True,
            )
        broker.purge()
        reset_tables()
    med = {key: common.median(values) for key, values in samples.items()}
    batch = int(app_settings.CONSUMER_BATCH_SIZE)
    table = [
        {
            "benchmark": f"EventConsumer defaults, batch {batch} (events/s)",
            "value": med["ours"],
            "baseline": f"raw loop, commit per {LIMIT_BATCH} + multiple ack",
            "baseline_value": med["limit"],
            "ratio": med["ratio"],
            "target": f">= {TARGET_RATIO}",
            "met": med["ratio"] >= TARGET_RATIO,
        },
        {
            "benchmark": "raw loop, commit + ack per message (events/s)",
            "value": med["raw"],
            "baseline": "EventConsumer defaults",
            "baseline_value": med["ours"],
            "ratio": med["raw"] / med["ours"],
            "target": "",
            "met": None,
        },
        {
            "benchmark": "EventConsumer x 2 processes (events/s)",
            "value": med["two"],
            "baseline": "1 process",
            "baseline_value": med["one"],
            "ratio": med["scaling"],
            "target": f">= {TARGET_SCALING}",
            "met": med["scaling"] >= TARGET_SCALING,
        },
        {
            "benchmark": "Celery acks_late task, prefork pool, 1 process (events/s)",
            "value": med["celery"],
            "baseline": "EventConsumer, 1 process",
            "baseline_value": med["one"],
            "ratio": med["celery"] / med["one"],
            "target": "",
            "met": None,
        },
    ]
    print(
        f"events={count} per loop and round, rounds={rounds}, alternating every {args.chunk}; "
        f"synchronous_commit={sync_commit}; {common.machine()} (medians)"
    )
    print(f"  (a) raw per-message loop           {med['raw']:8,.0f} events/s")
    print(f"  (b) raw batch loop (the limit)      {med['limit']:8,.0f} events/s")
    print(
        f"  EventConsumer, defaults             {med['ours']:8,.0f} events/s   "
        f"{med['ratio']:.2f} x (b) (target >= {TARGET_RATIO}: "
        f"{common.verdict(med['ratio'] >= TARGET_RATIO)}); {med['ours'] / med['raw']:.2f} x (a)"
    )
    print(
        f"  EventConsumer, 1 / 2 processes      {med['one']:8,.0f} / {med['two']:,.0f} events/s   "
        f"{med['scaling']:.2f} x (target >= {TARGET_SCALING}: "
        f"{common.verdict(med['scaling'] >= TARGET_SCALING)})"
    )
    print(f"  Celery task, acks_late, prefork x1 {med['celery']:8,.0f} events/s")
    common.emit(
        "consume",
        {
            "events": count,
            "rounds": rounds,
            "batch": batch,
            "raw_rate": med["raw"],
            "limit_rate": med["limit"],
            "consumer_rate": med["ours"],
            "ratio": med["ratio"],
            "target": TARGET_RATIO,
            "met": med["ratio"] >= TARGET_RATIO,
            "one_process": med["one"],
            "two_processes": med["two"],
            "scaling": med["scaling"],
            "celery_rate": med["celery"],
            "synchronous_commit": sync_commit,
            "samples": samples,
            "table": table,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
