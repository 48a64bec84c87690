"""Shared helpers of the benchmarks: Django setup, a private broker topology, seeding.

Every benchmark runs on its own PostgreSQL database (``bench.settings``, default
``re_bench``) and its own exchange and queue (random names, deleted at the end), so it
can run next to the test suite.  Figures are medians over several rounds; each script
prints one JSON line prefixed with ``BENCH-RESULT`` that ``bench/run`` collects.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
import uuid
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "BENCH-RESULT "
#: Keys of the benchmark events (events of one key are ordered).
KEYS = 1000
#: Size of the padding that makes an event body ~1 KiB of JSON.
PAD = 1000


def setup_django() -> None:
    """Configure Django with ``bench.settings`` and make sure the database is migrated."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
    os.environ.setdefault("RE_TEST_DATABASE", "postgres")
    _ensure_database()
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def _ensure_database() -> None:
    import psycopg

    name = os.environ.get("RE_BENCH_PG_NAME", "re_bench")
    params = {
        "host": os.environ.get("RE_TEST_PG_HOST", "127.0.0.1"),
        "port": os.environ.get("RE_TEST_PG_PORT", "5432"),
        "user": os.environ.get("RE_TEST_PG_USER", "postgres"),
        "password": os.environ.get("RE_TEST_PG_PASSWORD", ""),
        "dbname": "postgres",
        "autocommit": True,
    }
    with psycopg.connect(**params) as conn:  # type: ignore[arg-type]
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{name}"')


def amqp_url() -> str:
    from django.conf import settings

    return str(getattr(settings, "BENCH_AMQP_URL", None) or settings.AMQP_URL)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def body_for(n: int) -> bytes:
    """The ~1 KiB JSON body the benchmarks publish (same shape as the seeded rows)."""
    return json.dumps({"n": n, "pad": "x" * PAD}).encode()


def key_for(n: int) -> str:
    return f"k{n % KEYS}"


def lanes_of_keys() -> list[int]:
    """``lane_for(key_for(n))`` for n in 0..KEYS-1 (what publish_event would store)."""
    from reliable_events.conf import app_settings

    lanes = max(1, int(app_settings.LANES))
    return [zlib.crc32(key_for(n).encode()) % lanes for n in range(KEYS)]


# -- broker -------------------------------------------------------------------------------
class BenchBroker:
    """A private events exchange (+ its unrouted queue) and one queue bound to ``#``."""

    def __init__(self, url: str | None = None, *, quorum: bool = False) -> None:
        suffix = uuid.uuid4().hex[:10]
        self.exchange = f"bench-ev-{suffix}"
        self.queue = f"bench-q-{suffix}"
        self.url = url or amqp_url()
        #: Quorum queues (a RabbitMQ cluster: a confirm means a majority has the message).
        self.queue_arguments = {"x-queue-type": "quorum"} if quorum else {}
        self.extra_queues: list[str] = []

    def _channel(self) -> Any:
        from kombu import Connection

        conn = Connection(self.url)
        conn.connect()
        return conn, conn.connection.channel()

    def settings(self, **extra: Any) -> dict[str, Any]:
        from django.conf import settings

        config = dict(settings.RELIABLE_EVENTS)
        config.update({"BROKER_URL": self.url, "EXCHANGE": self.exchange})
        if self.queue_arguments:
            config["QUEUE_TYPE"] = "quorum"
        config.update(extra)
        return config

    def declare(self) -> None:
        conn, channel = self._channel()
        try:
            unrouted = f"{self.exchange}.unrouted"
            channel.exchange_declare(unrouted, "fanout", durable=True, auto_delete=False)
            channel.exchange_declare(
                self.exchange,
                "topic",
                durable=True,
                auto_delete=False,
                arguments={"alternate-exchange": unrouted},
            )
            args = self.queue_arguments
            channel.queue_declare(unrouted, durable=True, auto_delete=False, arguments=args)
            channel.queue_bind(unrouted, unrouted, "")
            channel.queue_declare(self.queue, durable=True, auto_delete=False, arguments=args)
            channel.queue_bind(self.queue, self.exchange, "#")
        finally:
            conn.release()

    def count(self) -> int:
        conn, channel = self._channel()
        try:
            return int(channel.queue_declare(self.queue, passive=True).message_count)
        finally:
            conn.release()

    def purge(self) -> None:
        conn, channel = self._channel()
        try:
            for queue in (self.queue, f"{self.exchange}.unrouted", *self.extra_queues):
                channel.queue_purge(queue)
        finally:
            conn.release()

    def delete(self, attempts: int = 5) -> None:
        """Delete the queues and exchanges (retrying: the broker may be restarting)."""
        for attempt in range(attempts):
            try:
                conn, channel = self._channel()
                try:
                    for queue in (self.queue, f"{self.exchange}.unrouted", *self.extra_queues):
                        channel.queue_delete(queue)
                    channel.exchange_delete(self.exchange)
                    channel.exchange_delete(f"{self.exchange}.unrouted")
                finally:
                    conn.release()
                return
            except Exception as exc:
                if attempt + 1 == attempts:
                    print(f"could not delete {self.exchange} and its queues: {exc}")
                    return
                time.sleep(2)


@contextmanager
def bench_broker(
    *, url: str | None = None, quorum: bool = False, **extra_settings: Any
) -> Iterator[BenchBroker]:
    """A :class:`BenchBroker`, with ``RELIABLE_EVENTS`` pointed at it, deleted on exit."""
    from django.test import override_settings

    broker = BenchBroker(url, quorum=quorum)
    broker.declare()
    try:
        with override_settings(RELIABLE_EVENTS=broker.settings(**extra_settings)):
            yield broker
    finally:
        try:
            from reliable_events.relay import dispatcher

            dispatcher.reset()
        finally:
            broker.delete()


# -- database -------------------------------------------------------------------------------
def outbox_table() -> str:
    from reliable_events.models import OutboxMessage

    return OutboxMessage._meta.db_table


def truncate_outbox() -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {outbox_table()} RESTART IDENTITY")


def seed_rows(
    count: int, *, status: str = "pending", age_seconds: float = 0.0, analyze: bool = True
) -> None:
    """Insert ``count`` ~1 KiB events in one ``INSERT ... SELECT generate_series``.

    The rows look like ``publish_event`` wrote them (keys ``k0..k999``, their lanes).
    ``status="sent"`` makes history rows, confirmed ``age_seconds`` ago.  ``analyze=False``
    leaves the table's statistics as they were (what autovacuum lag looks like).
    """
    from django.db import connection

    sent_at = "now() - make_interval(secs => %(age)s)" if status == "sent" else "NULL"
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            INSERT INTO {outbox_table()} (message_id, topic, key, lane, queue, payload,
                headers, status, attempts, next_attempt_at, created_at, sent_at, last_error)
            SELECT gen_random_uuid()::text, 'bench.created', 'k' || (g %% {KEYS}),
                (%(lanes)s::int[])[(g %% {KEYS}) + 1], '',
                jsonb_build_object('n', g, 'pad', repeat('x', {PAD})), '{{}}'::jsonb,
                %(status)s, %(attempts)s, now() - make_interval(secs => %(age)s),
                now() - make_interval(secs => %(age)s), {sent_at}, ''
            FROM generate_series(1, %(count)s) AS g
            """,
            {
                "lanes": lanes_of_keys(),
                "status": status,
                "attempts": 1 if status == "sent" else 0,
                "age": age_seconds,
                "count": count,
            },
        )
        if analyze:
            cursor.execute(f"ANALYZE {outbox_table()}")


def count_status(status: str) -> int:
    from reliable_events.models import OutboxMessage

    return OutboxMessage.objects.filter(status=status).count()


# -- reporting ------------------------------------------------------------------------------
def machine() -> dict[str, str]:
    """What the figures came from."""
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except OSError:
        pass
    return {
        "cpus": str(os.cpu_count()),
        "cpu": cpu,
        "ram": ram,
        "python": platform.python_version(),
        "postgresql": _pg_version(),
        "rabbitmq": _rabbit_version(),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def _pg_version() -> str:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        return str(cursor.fetchone()[0])


def _rabbit_version() -> str:
    from kombu import Connection

    try:
        with Connection(amqp_url()) as conn:
            conn.connect()
            props = conn.connection.server_properties
            return str(props.get("version", "?"))
    except Exception:  # only informative
        return "?"


def emit(name: str, figures: dict[str, Any]) -> None:
    """Print the machine-readable result line ``bench/run`` collects."""
    print(RESULT_PREFIX + json.dumps({"bench": name, **figures}), flush=True)


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def amqp_message(n: int, topic: str) -> Any:
    """Event ``n`` as a raw py-amqp message (what the relay would publish for it)."""
    from amqp import Message

    return Message(
        body_for(n),
        content_type="application/json",
        content_encoding="utf-8",
        delivery_mode=2,
        message_id=str(uuid.uuid4()),
        type=topic,
        application_headers={"x-event-key": key_for(n)},
    )


def bench_consumer(prefix: str) -> Any:
    """A new consumer class (named ``<prefix>-<random>``) of ``bench.#`` whose handler
    creates one ``Order`` per event, without retries."""
    from reliable_events.consumer import Event, EventConsumer
    from tests.testapp.models import Order

    class BenchConsumer(EventConsumer):
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        topics = ["bench.#"]
        max_retries = 0
        retry_delays = [1]

        def handle(self, event: Event) -> None:
            Order.objects.create(reference=f"ec|{event.payload['n']}")

    return BenchConsumer
