"""``consume_events`` as a real process: killed, restarted, stopped, cut off from its
database; and the consumers hosted by ``celery worker``.

The child runs ``python manage.py consume_events`` with ``DJANGO_SETTINGS_MODULE=
tests.settings`` on this test's database (``RE_TEST_PG_NAME``) and broker
(``RE_TEST_RELIABLE_EVENTS``); its consumer comes from ``tests/consumers_app/consumers.py``
(described by ``RE_TEST_CONSUMER``).  Effects are counted as ``Order`` rows, which have
no unique constraint: a second application would show as 2.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import amqp
import pytest
from django.db import connection

from reliable_events.liveness import liveness
from reliable_events.models import DeadLetter, Heartbeat, OutboxMessage, ProcessedMessage
from reliable_events.queue_depths import clear_cache as liveness_cache_clear
from reliable_events.topology import declare_on_amqp_channel, full_topology
from tests.support.consumer_support import applied, make_consumer, queue_names, unique_name
from tests.support.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.rabbitmq, pytest.mark.postgres]

ROOT = Path(__file__).resolve().parents[2]


def wait_for(condition: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or condition}")


class Child:
    """One consumer process (``consume_events`` or ``celery worker``)."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._out = log.open("w")
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=self._out, stderr=subprocess.STDOUT
        )

    def output(self) -> str:
        self._out.flush()
        return self.log.read_text()

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"child did not exit in {timeout}s:\n{self.output()}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._out.close()


class Harness:
    def __init__(self, env: dict[str, str], name: str, tmp_path: Path, rabbit: Any, exchange: str):
        self.env = env
        self.name = name
        self.tmp_path = tmp_path
        self.rabbit = rabbit
        self.exchange = exchange
        self.children: list[Child] = []

    def start(self, *args: str, extra_env: dict[str, str] | None = None) -> Child:
        argv = [sys.executable, "manage.py", "consume_events", self.name, *args]
        return self._spawn(argv, extra_env)

    def start_celery(self) -> Child:
        argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tests.consumers_app.celery_app",
            "worker",
            "--pool=solo",
            "--concurrency=1",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--loglevel=INFO",
        ]
        return self._spawn(argv, None)

    def _spawn(self, argv: list[str], extra_env: dict[str, str] | None) -> Child:
        log = self.tmp_path / f"child-{len(self.children)}.log"
        child = Child(argv, {**self.env, **(extra_env or {})}, log)
        self.children.append(child)
        return child

    def send(self, message_id: str, payload: dict[str, Any]) -> None:
        self.rabbit.channel.basic_publish(
            amqp.Message(
                json.dumps(payload).encode(),
                content_type="application/json",
                content_encoding="utf-8",
                delivery_mode=2,
                message_id=message_id,
                type="orders.created",
            ),
            exchange=self.exchange,
            routing_key="orders.created",
        )

    def marker(self, message_id: str) -> Path:
        return self.tmp_path / f"{message_id}.marker"

    def ready_count(self) -> int:
        return int(self.rabbit.count(self.name))


@pytest.fixture
def harness(broker, rabbit, exchange_name, clean_registry, tmp_path) -> Iterator[Harness]:
    name = unique_name("env.consumer")
    spec = {
        "name": name,
        "topics": ["orders.*"],
        "max_retries": 2,
        "retry_delays": [0.2],
        "marker_dir": str(tmp_path),
    }
    # The same consumer, declared from here so that messages can be sent before it starts.
    twin = make_consumer(
        clean_registry, name=name, topics=["orders.*"], max_retries=2, retry_delays=[0.2]
    )
    rabbit.queues.extend(queue_names(twin))
    declare_on_amqp_channel(rabbit.channel, full_topology(twin.queue_specs()))
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "PYTHONPATH": str(ROOT),
        "RE_TEST_DATABASE": "postgres",
        "RE_TEST_PG_NAME": str(connection.settings_dict["NAME"]),
        "RE_TEST_RELIABLE_EVENTS": json.dumps(broker),
        "RE_TEST_CONSUMER": json.dumps(spec),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("COVERAGE_PROCESS_START", None)
    h = Harness(env, name, tmp_path, rabbit, exchange_name)
    yield h
    for child in h.children:
        child.stop()


def test_sigkill_inside_handle_then_restart_applies_once(harness):
    first = harness.start()
    harness.send("m-1", {"action": "hang"})
    wait_for(harness.marker("m-1").exists, what="the handler to start")
    assert applied(harness.name, "m-1") == 0  # its transaction is open, not committed
    first.proc.send_signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL

    second = harness.start("--until-idle", "2")
    assert second.wait() == 0, second.output()
    assert applied(harness.name, "m-1") == 1
    assert ProcessedMessage.objects.filter(consumer=harness.name, message_id="m-1").count() == 1
    assert not DeadLetter.objects.exists()
    assert harness.ready_count() == 0
    assert "processed=1" in second.output()


def test_sigkill_after_commit_before_ack_then_restart_skips_the_redelivery(harness):
    first = harness.start()
    harness.send("m-1", {"action": "die-after-commit"})
    assert first.wait() == -signal.SIGKILL
    assert applied(harness.name, "m-1") == 1  # committed, never acked

    second = harness.start("--until-idle", "2")
    assert second.wait() == 0, second.output()
    assert applied(harness.name, "m-1") == 1
    assert "processed=0 duplicates=1" in second.output()
    assert harness.ready_count() == 0


def test_an_event_published_in_handle_survives_a_kill_exactly_once(harness, rabbit, exchange_name):
    invoices = rabbit.bind_queue(exchange_name, "invoices.#")
    first = harness.start()
    harness.send("m-1", {"action": "hang", "publish_topic": "invoices.created"})
    wait_for(harness.marker("m-1").exists, what="the handler to start")
    first.proc.send_signal(signal.SIGKILL)
    first.wait()
    assert not OutboxMessage.objects.filter(topic="invoices.created").exists()

    second = harness.start("--until-idle", "2")
    assert second.wait() == 0, second.output()
    [row] = OutboxMessage.objects.filter(topic="invoices.created")
    assert row.payload == {"caused_by": "m-1"}
    assert row.status == OutboxMessage.Status.SENT
    messages = rabbit.get_all(invoices, expect=1, timeout=5)
    assert [json.loads(m.body) for m in messages] == [{"caused_by": "m-1"}]
    assert applied(harness.name, "m-1") == 1


def test_sigterm_finishes_the_current_message_acks_and_exits_0(harness):
    child = harness.start()
    harness.send("m-1", {"action": "sleep", "seconds": 2})
    harness.send("m-2", {})
    wait_for(harness.marker("m-1").exists, what="the handler to start")
    child.proc.send_signal(signal.SIGTERM)
    assert child.wait(30) == 0, child.output()
    assert applied(harness.name, "m-1") == 1
    assert applied(harness.name, "m-2") == 0
    assert "stopped by SIGTERM" in child.output()
    wait_for(lambda: harness.ready_count() == 1, 10, "m-2 back in the queue")


def test_the_loop_survives_its_database_going_away_mid_handler(harness):
    proxy = TcpProxy(
        os.environ.get("RE_TEST_PG_HOST", "127.0.0.1"),
        int(os.environ.get("RE_TEST_PG_PORT", "5432")),
    ).start()
    try:
        child = harness.start(extra_env={"RE_TEST_PG_PORT": str(proxy.port)})
        harness.send("m-1", {"action": "stall", "seconds": 1})
        wait_for(harness.marker("m-1").exists, what="the handler to start")
        proxy.stop()  # the database is gone while the handler runs
        time.sleep(3)
        assert child.proc.poll() is None, child.output()  # the loop survives
        assert applied(harness.name, "m-1") == 0
        proxy.start()
        harness.send("m-2", {})
        wait_for(lambda: applied(harness.name, "m-2") == 1, 30, "m-2 processed")
        child.proc.send_signal(signal.SIGTERM)
        assert child.wait(30) == 0, child.output()
    finally:
        proxy.stop()
    assert applied(harness.name, "m-1") == 1
    assert not DeadLetter.objects.exists()
    output = child.output()
    assert "waiting for the database" in output
    assert "database_outages=1" in output
    assert harness.ready_count() == 0


def test_a_frozen_consumer_process_holds_its_message_and_shows_as_silent(harness):
    child = harness.start()
    harness.send("m-1", {})
    wait_for(lambda: applied(harness.name, "m-1") == 1, 30, "m-1 processed")
    wait_for(lambda: Heartbeat.objects.filter(pid=child.proc.pid).exists(), 10, "a heartbeat")
    child.proc.send_signal(signal.SIGSTOP)
    try:
        harness.send("m-2", {})
        # Its connection is open: the broker hands m-2 to it, where it waits unacked.
        wait_for(lambda: harness.ready_count() == 0, 10, "m-2 delivered to the frozen process")

        def silent() -> Any:
            liveness_cache_clear()
            return liveness().consumer(harness.name)

        wait_for(lambda: silent().silent == 1, 30, "the frozen process counted as silent")
        state = silent()
        assert "stopped beating" in state.warning
        assert "without a clean stop: killed, frozen, or cut off from the database" in state.warning
        assert "up to twice CONSUMER_HEARTBEAT" in state.warning  # RabbitMQ
        assert applied(harness.name, "m-2") == 0
    finally:
        child.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: applied(harness.name, "m-2") == 1, 30, "m-2 processed once thawed")
    wait_for(lambda: silent().silent == 0, 30, "its heartbeat back")
    child.proc.send_signal(signal.SIGTERM)
    assert child.wait(30) == 0, child.output()
    assert (silent().silent, silent().warning) == (0, "")  # a clean stop is not silent
    assert applied(harness.name, "m-1") == applied(harness.name, "m-2") == 1


def test_celery_worker_hosts_the_consumers(harness):
    worker = harness.start_celery()
    harness.send("m-1", {})
    harness.send("m-1", {})
    wait_for(lambda: applied(harness.name, "m-1") == 1, 60, "the celery-hosted consumer")
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.wait(60) == 0, worker.output()
    assert applied(harness.name, "m-1") == 1
    assert harness.ready_count() == 0
    assert ProcessedMessage.objects.filter(consumer=harness.name).count() == 1
