"""Prometheus metrics: bounded labels, the endpoint (never a 500), the metered publisher,
metrics switched off, and the multiprocess mode (PROMETHEUS_MULTIPROC_DIR)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Hashable, Iterator, Sequence
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from reliable_events import metrics, metrics_collector
from reliable_events.broker.base import UNROUTABLE_QUEUE, OutgoingMessage, Publisher, PublishResult
from reliable_events.consumer.base import HandlerResult, Outcome
from reliable_events.heartbeats import HeartbeatWriter
from reliable_events.metrics_collector import build_registry, capped
from reliable_events.models import KeyHold, ParkedEvent, QueuedMessage
from reliable_events.relay.claims import RelayReport
from reliable_events.topology import Topology, events_topology, unrouted_name
from reliable_events.unrouted import clear_cache
from tests.support.consumer_support import make_consumer
from tests.support.deadletter_factory import dead_letter, outbox_row
from tests.support.producer_support import database_not_answering

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _fresh(re_settings: Any) -> Iterator[None]:
    re_settings(METRICS_CACHE_SECONDS=0)
    metrics.reset()
    metrics_collector.clear_cache()
    yield
    metrics.reset()
    metrics_collector.clear_cache()


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def sample(name: str, **labels: str) -> float:
    return prometheus_client.REGISTRY.get_sample_value(name, labels) or 0.0


def test_capped_keeps_the_largest_labels_and_sums_the_rest_as_other() -> None:
    counts = [(f"topic.{n}", n + 1) for n in range(500)]
    total = sum(n for _, n in counts)
    result = capped(counts, total, 20)
    assert len(result) == 21
    assert sum(result.values()) == total
    assert result["topic.499"] == 500
    assert "topic.0" not in result
    assert capped([("a", 2)], 2, 20) == {"a": 2}
    assert capped([], 0, 20) == {}


@pytest.mark.django_db
def test_outbox_gauges_have_at_most_max_topics_labels(client: Client, re_settings: Any) -> None:
    re_settings(METRICS_MAX_TOPICS=5)
    for n in range(12):
        for _ in range(n + 1):
            outbox_row(status="pending", topic=f"t.{n}")
    outbox_row(status="dead", topic="t.dead")
    text = client.get("/metrics/").content.decode()
    pending = samples(text, "reliable_events_outbox_pending")
    assert len(pending) == 6
    assert sum(pending.values()) == sum(range(1, 13))
    assert pending[(("topic", "other"),)] == sum(range(1, 8))
    assert pending[(("topic", "t.11"),)] == 12
    assert samples(text, "reliable_events_outbox_dead") == {(("topic", "t.dead"),): 1}
    assert samples(text, "reliable_events_database_up") == {(): 1}


@pytest.mark.django_db(transaction=True)
def test_held_keys_parked_events_and_unrouted_events_are_gauges(
    client: Client, re_settings: Any
) -> None:
    re_settings(BROKER_URL="db://", METRICS_CACHE_SECONDS=0)
    clear_cache()
    text = client.get("/metrics/").content.decode()
    for name in ("held_keys", "parked_events", "unrouted_messages"):
        assert samples(text, f"reliable_events_{name}") == {(): 0}, name

    KeyHold.objects.create(consumer="c", key="k", dead_letter_id=1)
    for n in range(3):
        ParkedEvent.objects.create(consumer="c", key="k", message_id=f"m{n}", topic="t")
    for n in range(2):
        QueuedMessage.objects.create(queue=unrouted_name(), message_id=f"u{n}", body=b"{}")
    clear_cache()
    text = client.get("/metrics/").content.decode()
    assert samples(text, "reliable_events_held_keys") == {(): 1}
    assert samples(text, "reliable_events_parked_events") == {(): 3}
    assert samples(text, "reliable_events_unrouted_messages") == {(): 2}


def test_consumer_labels_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    found = metrics.instruments()
    assert found is not None
    monkeypatch.setattr(metrics, "MAX_CONSUMER_LABELS", len(found._labels) + 2)
    names = [f"capped.consumer.{n}" for n in range(6)]
    before = sample(
        "reliable_events_consumer_messages_total", consumer="other", outcome="processed"
    )
    for name in names:
        metrics.consumed(name, Outcome.PROCESSED, HandlerResult(Outcome.PROCESSED, seconds=0.01))
    labelled = [
        n
        for n in names
        if sample("reliable_events_consumer_messages_total", consumer=n, outcome="processed")
    ]
    assert labelled == names[:2]
    after = sample("reliable_events_consumer_messages_total", consumer="other", outcome="processed")
    assert after - before == 4


@pytest.mark.django_db
def test_the_endpoint_never_answers_500(client: Client, re_settings: Any) -> None:
    re_settings(BROKER_URL="amqp://user:sekret-pw@127.0.0.1:1//", CONNECT_TIMEOUT=0.2)
    dead_letter()
    for query in (
        "",
        "?name[]=reliable_events_outbox_pending",
        "?name[]=" + "x" * 5000,
        "?name[]=%00%ff&name[]=",
        "?" + "&".join(f"name[]=n{i}" for i in range(500)),
        "?foo=bar&&&=",
    ):
        for accept in ("", "application/openmetrics-text; version=1.0.0", "*/*;q=\x00", "x" * 3000):
            response = client.get("/metrics/" + query, HTTP_ACCEPT=accept)
            assert response.status_code == 200, (query, accept)
            assert b"sekret-pw" not in response.content
    only = client.get("/metrics/?name[]=reliable_events_dead_letters_open").content.decode()
    assert samples(only, "reliable_events_dead_letters_open") == {
        (("consumer", "billing.charge"),): 1
    }
    assert "reliable_events_outbox_pending" not in only
    assert client.post("/metrics/").status_code == 405
    assert client.head("/metrics/").status_code == 200


@pytest.mark.django_db
def test_the_health_endpoint_answers_400_or_503_never_500(
    client: Client, clean_registry: Any
) -> None:
    assert client.get("/health/").status_code == 200
    assert client.get("/health/?relay=banana").status_code == 400
    typo = client.get("/health/?consumer=mail.send")  # a probe's typo is not "healthy"
    assert typo.status_code == 400
    assert typo.json() == {"error": "unknown parameter(s) 'consumer': use relay and consumers"}
    assert client.get("/health/?Relay=1").status_code == 400
    twice = client.get("/health/?relay=1&relay=0")  # the last one used to win: "ok"
    assert twice.status_code == 400
    assert twice.json() == {"error": "relay given more than once: which one is meant?"}
    unknown = client.get("/health/?consumers=" + "nobody," * 300)
    assert unknown.status_code == 400
    assert client.get("/health/?consumers=%00%ff").status_code == 400
    assert client.get("/health/?consumers=all").status_code == 200
    for empty in ("", ",,"):  # it meant "every registered consumer", unsaid
        response = client.get("/health/?consumers=" + empty)
        assert response.status_code == 400
        assert response.json() == {
            "error": "consumers is empty: name them (consumers=a,b) or consumers=all"
        }
    relay = client.get("/health/?relay=1")
    assert relay.status_code == 503
    assert relay.json()["relay"] == {
        "required": True,
        "alive": 0,
        "failing": 0,
        "broker_error": "",
    }
    assert client.post("/health/").status_code == 405


@pytest.mark.django_db
def test_metrics_off_is_a_404_and_records_nothing(client: Client, re_settings: Any) -> None:
    re_settings(METRICS=False)
    metrics.reset()
    assert not metrics.enabled()
    assert client.get("/metrics/").status_code == 404
    publisher = FakePublisher()
    assert metrics.metered(publisher) is publisher
    before = sample(
        "reliable_events_consumer_messages_total", consumer="off.c", outcome="processed"
    )
    metrics.consumed("off.c", Outcome.PROCESSED, None)
    after = sample("reliable_events_consumer_messages_total", consumer="off.c", outcome="processed")
    assert after == before == 0
    assert metrics_collector.serve_metrics(0) is None


class FakePublisher(Publisher):
    """Settles each message by its topic: ``ok`` confirmed, ``nack``, ``return``,
    ``error`` refused, ``cut`` interrupted."""

    url = "fake://"

    def __init__(self) -> None:
        self.closed = False
        self.declared: list[Topology] = []

    def declare(self, topology: Topology) -> None:
        self.declared.append(topology)

    def connect(self) -> None:
        pass

    def publish(
        self, messages: Sequence[OutgoingMessage], *, timeout: float, wait: bool = True
    ) -> PublishResult:
        result = PublishResult()
        reasons = {
            "nack": "broker nacked the message (basic.nack)",
            "return": UNROUTABLE_QUEUE,
            "error": "encoding failed",
        }
        for message in messages:
            if message.topic == "ok":
                result.confirmed.append(message.ref)
            elif message.topic == "cut":
                result.interrupt([message.ref], "connection lost")
            else:
                result.fail([message.ref], reasons[message.topic])
        return result

    def close(self) -> None:
        self.closed = True

    @property
    def connected(self) -> bool:
        return True


def _message(ref: Hashable, topic: str) -> OutgoingMessage:
    return OutgoingMessage(
        ref=ref, message_id=str(ref), topic=topic, body=b"{}", exchange="events", routing_key=topic
    )


def test_the_metered_publisher_counts_each_outcome() -> None:
    names = ("attempts", "confirms", "nacks", "returns", "errors")
    before = {n: sample(f"reliable_events_publish_{n}_total") for n in names}
    latency = sample("reliable_events_confirm_latency_seconds_count")
    inner = FakePublisher()
    publisher = metrics.metered(inner)
    assert isinstance(publisher, metrics.MeteredPublisher)
    assert metrics.metered(publisher) is publisher
    topics = ["ok", "ok", "ok", "nack", "return", "return", "error", "cut"]
    result = publisher.publish([_message(i, t) for i, t in enumerate(topics)], timeout=1)
    assert len(result.confirmed) == 3
    delta = {n: sample(f"reliable_events_publish_{n}_total") - before[n] for n in names}
    assert delta == {"attempts": 8, "confirms": 3, "nacks": 1, "returns": 2, "errors": 2}
    assert sample("reliable_events_confirm_latency_seconds_count") - latency == 1
    assert publisher.url == "fake://"
    assert publisher.connected
    topology = events_topology()
    publisher.declare(topology)
    assert inner.declared == [topology]
    assert publisher.closed is False  # any other attribute is the inner publisher's
    publisher.close()
    assert inner.closed


_CHILD = """
import django, sys
django.setup()
from reliable_events import metrics
from reliable_events.consumer.base import HandlerResult, Outcome
result = HandlerResult(Outcome.PROCESSED, seconds=0.002)
for _ in range(int(sys.argv[1])):
    metrics.consumed("mp.consumer", Outcome.PROCESSED, result)
"""


def test_multiprocess_mode_sums_every_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "PYTHONPATH": str(ROOT),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
    }
    children = [
        subprocess.Popen([sys.executable, "-c", _CHILD, str(n)], cwd=ROOT, env=env) for n in (7, 5)
    ]
    assert [child.wait(60) for child in children] == [0, 0]
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    out = prometheus_client.generate_latest(build_registry(database=False)).decode()
    counted = samples(out, "reliable_events_consumer_messages_total")
    assert counted == {(("consumer", "mp.consumer"), ("outcome", "processed")): 12}
    assert samples(out, "reliable_events_handler_seconds_count") == {
        (("consumer", "mp.consumer"),): 12
    }


@pytest.mark.django_db
def test_the_dashboard_and_alert_rules_use_only_exposed_metrics(
    client: Client, clean_registry: Any, re_settings: Any
) -> None:
    re_settings(BROKER_URL="db://")
    make_consumer(clean_registry, name="dash.c")
    HeartbeatWriter("consumer", ["dash.c"]).tick()
    HeartbeatWriter("relay").tick()
    outbox_row(status="pending")
    outbox_row(status="dead")
    metrics.consumed("dash.c", Outcome.PROCESSED, HandlerResult(Outcome.PROCESSED, seconds=0.01))
    metrics.relay_run(RelayReport(claimed=1, seconds=0.01))
    metrics.handed_over("breaker_open", 1)
    metrics.metered(FakePublisher()).publish([_message(1, "ok")], timeout=1)
    text = client.get("/metrics/").content.decode()
    families = list(text_string_to_metric_families(text))
    exposed = {s.name for f in families for s in f.samples}
    dashboard = json.loads((ROOT / "contrib/grafana/reliable_events.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    rules = (ROOT / "contrib/prometheus/alerts.yml").read_text()
    used = set(re.findall(r"reliable_events_[a-z_]+", " ".join(exprs) + rules))
    assert len(used) >= 15
    # Samples only with a setting this configuration leaves out (its samples with it:
    # tests/integration/test_queue_unacked.py): declared all the same, on the dashboard
    # only (an alert on it would stay silent without the setting).
    needs_setting = {"reliable_events_queue_messages_unacked"}
    assert used - exposed == needs_setting
    assert needs_setting <= {f.name for f in families}
    assert not [name for name in needs_setting if name in rules]


def test_the_commands_metrics_port_serves_this_process(re_settings: Any) -> None:
    metrics.consumed("port.c", Outcome.PROCESSED, None)
    server = metrics_collector.serve_metrics(0, address="127.0.0.1")
    assert server is not None
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    counted = samples(text, "reliable_events_consumer_messages_total")
    # The label it was counted under: "other" once the suite has seen MAX_CONSUMER_LABELS.
    found = metrics.instruments()
    assert found is not None
    label = found.consumer_label("port.c")
    assert counted[(("consumer", label), ("outcome", "processed"))] >= 1
    assert "reliable_events_outbox_pending" not in text  # the web endpoint's


_WITHOUT_CLIENT = """
import sys
sys.modules["prometheus_client"] = None  # not installed
import django
django.setup()
from django.test import Client
from django.test.utils import setup_test_environment
setup_test_environment()
from reliable_events import metrics
from reliable_events.consumer.base import Outcome
from reliable_events.metrics_collector import serve_metrics
assert not metrics.available() and not metrics.enabled()
metrics.consumed("c", Outcome.PROCESSED, None)
publisher = object()
assert metrics.metered(publisher) is publisher
assert serve_metrics(0) is None
assert Client().get("/metrics/").status_code == 404
print("ok")
"""


def test_without_prometheus_client_everything_is_a_no_op() -> None:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "PYTHONPATH": str(ROOT)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_CLIENT], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


@pytest.mark.django_db(transaction=True)
def test_a_scrape_while_the_database_does_not_answer_says_so_and_the_next_reconnects(
    client: Client,
) -> None:
    outbox_row(status="pending")
    with database_not_answering():
        response = client.get("/metrics/")
    assert response.status_code == 200
    text = response.content.decode()
    assert samples(text, "reliable_events_database_up") == {(): 0}
    assert samples(text, "reliable_events_outbox_pending") == {}
    text = client.get("/metrics/").content.decode()
    assert samples(text, "reliable_events_database_up") == {(): 1}
    assert samples(text, "reliable_events_outbox_pending") == {(("topic", "orders.created"),): 1}
