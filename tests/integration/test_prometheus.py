"""A real Prometheus scrapes the web endpoint (this test's live server, the test URLconf
including ``reliable_events.urls_metrics``) and a ``consume_events --metrics-port``
process, with the shipped alert rules loaded: the counters move in its HTTP API, and a
dead letter, a stopped consumer, a killed one, a stopped relay and a dead outbox row make
the matching alerts go pending (or firing).  ``tests/prometheus/alerts_test.yml`` tests
every rule's expression with promtool.

Only the scrape and evaluation intervals are short (1 s, the test's Prometheus config);
the rules are ``contrib/prometheus/alerts.yml`` as shipped, and heartbeats run on the
suite's ``TIME_SCALE``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import amqp
import pytest
from django.db import connection, transaction
from django.utils import timezone

from reliable_events import publish_event
from reliable_events.heartbeats import HeartbeatWriter
from reliable_events.liveness import liveness
from reliable_events.models import DeadLetter, OutboxMessage
from reliable_events.topology import declare_on_amqp_channel, full_topology, unrouted_name
from tests.support.consumer_support import applied, make_consumer, queue_names, unique_name
from tests.support.prometheus_server import ALERT_RULES, PrometheusServer, binary, free_port

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.rabbitmq, pytest.mark.postgres]

ROOT = Path(__file__).resolve().parents[2]
ALERT_RULES_TESTS = ROOT / "tests" / "prometheus" / "alerts_test.yml"
needs_prometheus = pytest.mark.skipif(
    binary("prometheus") is None or binary("promtool") is None,
    reason="Debian's prometheus package is not installed (.ci/run installs it)",
)


@needs_prometheus
@pytest.mark.django_db(transaction=False)
def test_the_shipped_alert_rules_pass_promtool() -> None:
    result = subprocess.run(
        [str(binary("promtool")), "check", "rules", str(ALERT_RULES)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 13 rules found" in result.stdout


def without_annotations(rules: str) -> str:
    """``rules`` with every rule's ``annotations:`` block cut out (indentation decides
    where a block ends: the YAML is ours, written in block style)."""
    kept: list[str] = []
    cut_deeper_than: int | None = None
    for line in rules.splitlines():
        indent = len(line) - len(line.lstrip())
        if cut_deeper_than is not None and (not line.strip() or indent > cut_deeper_than):
            continue
        cut_deeper_than = indent if line.strip() == "annotations:" else None
        if cut_deeper_than is None:
            kept.append(line)
    return "\n".join(kept) + "\n"


def test_every_shipped_alert_has_a_case_where_it_fires() -> None:
    shipped = re.findall(r"^\s*- alert: (\w+)$", ALERT_RULES.read_text(), re.M)
    firing = re.findall(
        r"alertname: (\w+)\n\s*exp_alerts:\n\s*- exp_labels:", ALERT_RULES_TESTS.read_text()
    )
    assert len(shipped) == 13
    assert sorted(set(shipped)) == sorted(set(firing))
    assert "annotations:" not in without_annotations(ALERT_RULES.read_text())


@needs_prometheus
@pytest.mark.django_db(transaction=False)
def test_the_shipped_alert_rules_pass_their_promtool_unit_tests(tmp_path: Path) -> None:
    (tmp_path / "alerts.yml").write_text(without_annotations(ALERT_RULES.read_text()))
    shutil.copy(ALERT_RULES_TESTS, tmp_path / "alerts_test.yml")
    result = subprocess.run(
        [str(binary("promtool")), "test", "rules", "alerts_test.yml"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_a_queue_with_messages_and_no_consumer_is_down_though_its_process_beats(
    broker: dict[str, Any], rabbit: Any, exchange_name: str, clean_registry: Any, re_settings: Any
) -> None:
    re_settings(METRICS_CACHE_SECONDS=0)
    consumer = make_consumer(clean_registry, name=unique_name("prom.idle"))
    rabbit.queues.extend(queue_names(consumer))
    declare_on_amqp_channel(rabbit.channel, full_topology(consumer.queue_specs()))
    HeartbeatWriter("consumer", [consumer.name]).tick()
    state = liveness().consumer(consumer.name)
    assert state is not None
    assert (state.alive, state.messages, state.queue_consumers, state.problem) == (True, 0, 0, "")
    with transaction.atomic():
        publish_event("orders.created", {"n": 1})
    state = liveness().consumer(consumer.name)
    assert state is not None
    assert state.messages == 1
    assert state.problem == (
        f"1 message(s) waiting in {consumer.queue_name()} and nobody consuming it"
    )


def test_an_ordered_consumers_backlog_is_its_partitions_summed(
    broker: dict[str, Any], rabbit: Any, exchange_name: str, clean_registry: Any, re_settings: Any
) -> None:
    """An ordered consumer has no ``<name>`` queue: its messages wait in its partitions."""
    re_settings(METRICS_CACHE_SECONDS=0)
    consumer = make_consumer(clean_registry, name=unique_name("prom.ordered"))
    consumer.ordered = True
    rabbit.queues.extend(queue_names(consumer))
    rabbit.exchanges.append(f"{consumer.name}.hash")
    declare_on_amqp_channel(
        rabbit.channel, full_topology(consumer.queue_specs(), consumer.exchange_specs())
    )
    HeartbeatWriter("consumer", [consumer.name]).tick()
    with transaction.atomic():
        for n in range(12):
            publish_event("orders.created", {"n": n}, key=f"k{n}")
    state = liveness().consumer(consumer.name)
    assert state is not None
    first, last = queue_names(consumer)[0], queue_names(consumer)[-1]
    assert state.queue == f"{first} … {last.rsplit('.', 1)[-1]}"
    assert (state.messages, state.queue_consumers, state.retrying, state.queue_error) == (
        12,
        0,
        None,
        "",
    )
    assert state.problem == f"12 message(s) waiting in {state.queue} and nobody consuming it"


def _until(server: PrometheusServer, expr: str, expected: float, what: str) -> None:
    server.wait_for(lambda: server.value(expr) == expected, 30, f"{what}: {expr} == {expected}")


def _alert(server: PrometheusServer, name: str, consumer: str | None = None) -> str:
    """The state of alert ``name`` (of ``consumer``) once it is pending or firing."""
    labels = {} if consumer is None else {"consumer": consumer}
    state: str = server.wait_for(
        lambda: (
            server.alert_state(name, **labels) in ("pending", "firing")
            and server.alert_state(name, **labels)
        ),
        30,
        f"alert {name}" + (f" for {consumer}" if consumer else ""),
    )
    return state


@needs_prometheus
@pytest.mark.slow
def test_prometheus_scrapes_web_and_consumer_and_alerts_fire(
    broker: dict[str, Any],
    rabbit: Any,
    exchange_name: str,
    clean_registry: Any,
    live_server: Any,
    re_settings: Any,
    tmp_path: Path,
) -> None:
    re_settings(METRICS_CACHE_SECONDS=0.2, UNROUTED_CACHE_SECONDS=0.2)
    name = unique_name("prom.consumer")
    spec = {"name": name, "topics": ["orders.*"], "max_retries": 2, "retry_delays": [0.2]}
    twin = make_consumer(
        clean_registry, name=name, topics=["orders.*"], max_retries=2, retry_delays=[0.2]
    )
    rabbit.queues.extend(queue_names(twin))
    declare_on_amqp_channel(rabbit.channel, full_topology(twin.queue_specs()))
    port = free_port()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "PYTHONPATH": str(ROOT),
        "RE_TEST_DATABASE": "postgres",
        "RE_TEST_PG_NAME": str(connection.settings_dict["NAME"]),
        "RE_TEST_RELIABLE_EVENTS": json.dumps({**broker, "METRICS_CACHE_SECONDS": 0.2}),
        "RE_TEST_CONSUMER": json.dumps(spec),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = (tmp_path / "consumer.log").open("w")
    child = subprocess.Popen(
        [sys.executable, "manage.py", "consume_events", name, "--metrics-port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    relay_port = free_port()
    relay_log = (tmp_path / "relay.log").open("w")
    relay: subprocess.Popen[bytes] | None = None
    victim: subprocess.Popen[bytes] | None = None
    web = live_server.url.removeprefix("http://")
    targets = {
        "web": (web, "/metrics/"),
        "consumer": (f"127.0.0.1:{port}", "/metrics"),
        "relay": (f"127.0.0.1:{relay_port}", "/metrics"),
    }
    server = PrometheusServer(tmp_path, targets)
    try:
        server.wait_for(
            lambda: (
                {job: up for job, up in server.targets_up().items() if up}
                == {"web": True, "consumer": True}
            ),
            30,
            "the web and consumer targets up",
        )
        alive = f'reliable_events_consumer_alive{{consumer="{name}"}}'
        _until(server, alive, 1, "the consumer's heartbeat, seen by the web endpoint")
        server.wait_for(  # pending while the consumer had not beaten yet; not any more
            lambda: server.alert_state("ReliableEventsConsumerAbsent", consumer=name) is None,
            30,
            "the consumer-absent alert to clear",
        )
        confirms = 'sum(reliable_events_publish_confirms_total{job="web"})'
        before = server.value(confirms) or 0.0

        for number in range(5):
            with transaction.atomic():
                publish_event("orders.created", {"number": number}, key=f"k{number}")
        processed = (
            f'sum(reliable_events_consumer_messages_total{{job="consumer",consumer="{name}",'
            'outcome="processed"})'
        )
        _until(server, processed, 5, "the consumer's counter")
        _until(server, confirms, before + 5, "the web process's confirms")
        handled = f'sum(reliable_events_handler_seconds_count{{consumer="{name}"}})'
        assert server.value(handled) == 5
        assert applied(name) == 5

        # Left to a relay daemon (no on-commit publish): its own counters move.
        relay = subprocess.Popen(
            [sys.executable, "manage.py", "relay_outbox", "--metrics-port", str(relay_port)],
            cwd=ROOT,
            env=env,
            stdout=relay_log,
            stderr=subprocess.STDOUT,
        )
        server.wait_for(lambda: server.targets_up().get("relay"), 30, "the relay target up")
        _until(server, "reliable_events_relays_alive", 1, "the relay daemon's heartbeat")
        server.wait_for(  # pending while no relay ran; not any more
            lambda: server.alert_state("ReliableEventsRelayDown") is None,
            30,
            "the relay-down alert to clear",
        )
        assert server.value('max(reliable_events_broker_up{job="web"})') == 1
        re_settings(PUBLISH_ON_COMMIT=False)
        for number in range(3):
            with transaction.atomic():
                publish_event("orders.created", {"number": number}, key=f"r{number}")
        _until(server, processed, 8, "the consumer's counter")
        _until(server, 'sum(reliable_events_publish_confirms_total{job="relay"})', 3, "relay")
        # observed when the run ends, after its confirms were counted: a scrape may fall between
        batches = 'sum(reliable_events_relay_batch_seconds_count{job="relay"})'
        server.wait_for(lambda: (server.value(batches) or 0) >= 1, 30, "the relay's batch time")
        assert server.value(confirms) == before + 5

        # An event no queue is bound for: the broker keeps it in the unrouted queue.
        rabbit.queues.append(unrouted_name())
        with transaction.atomic():
            publish_event("nobody.listens", {"number": 1})
        _until(server, 'reliable_events_unrouted_messages{job="web"}', 1, "the unrouted count")
        assert _alert(server, "ReliableEventsUnroutedEvents") in ("pending", "firing")

        # A poison message: dead-lettered at once; the open dead letters grow.
        rabbit.channel.basic_publish(
            amqp.Message(b"{not json", content_type="application/json", message_id="poison-1"),
            exchange=exchange_name,
            routing_key="orders.created",
        )
        poison = (
            f'sum(reliable_events_consumer_messages_total{{consumer="{name}",outcome="poison"}})'
        )
        _until(server, poison, 1, "the poison counter")
        _until(server, f'reliable_events_dead_letters_open{{consumer="{name}"}}', 1, "dead letters")
        assert DeadLetter.objects.filter(consumer=name).count() == 1
        assert _alert(server, "ReliableEventsDeadLettersGrowing", name) in ("pending", "firing")

        # The consumer stops: it is absent at once (a clean stop), and the alert follows.
        child.send_signal(signal.SIGTERM)
        assert child.wait(30) == 0
        _until(server, alive, 0, "the stopped consumer")
        assert _alert(server, "ReliableEventsConsumerAbsent", name) in ("pending", "firing")
        url = f"{live_server.url}/health/?consumers={name}"
        with pytest.raises(urllib.error.HTTPError) as failed:
            urllib.request.urlopen(url, timeout=5)
        assert failed.value.code == 503
        body = json.loads(failed.value.read())
        assert body["consumers"][name]["alive"] is False

        # Another process of it is killed (kill -9, no clean stop): it turns silent.
        victim = subprocess.Popen(
            [sys.executable, "manage.py", "consume_events", name],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        _until(server, alive, 1, "the second consumer process's heartbeat")
        silent = f'reliable_events_consumer_processes_silent{{consumer="{name}"}}'
        assert server.value(silent) == 0
        victim.kill()
        victim.wait()
        _until(server, silent, 1, "the killed process, silent")
        assert _alert(server, "ReliableEventsConsumerProcessSilent", name) == "firing"

        # The relay daemon stops too: no relay publishes.
        relay.send_signal(signal.SIGTERM)
        assert relay.wait(30) == 0
        _until(server, "max(reliable_events_relays_alive)", 0, "the stopped relay")
        assert _alert(server, "ReliableEventsRelayDown") in ("pending", "firing")

        # An outbox row the relay gave up on: it reaches no consumer until retried.
        OutboxMessage.objects.create(
            message_id=unique_name("dead"),
            topic="orders.dead",
            payload={},
            status="dead",
            attempts=10,
            next_attempt_at=timezone.now(),
            last_error="returned: NO_ROUTE",
        )
        _until(server, 'max(reliable_events_outbox_dead{topic="orders.dead"})', 1, "dead rows")
        assert _alert(server, "ReliableEventsOutboxDead") in ("pending", "firing")
    finally:
        for process in (child, relay, victim):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        log.close()
        relay_log.close()
        server.stop()
