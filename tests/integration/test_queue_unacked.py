"""Messages a consumer process holds unacked show, with ``BROKER_MANAGEMENT_URL``.

A passive declare counts a queue's ready messages only: a process that took a batch and
cannot finish it (its database down, frozen) leaves "0 waiting" on every page.  With the
management API configured, the held messages show as *unacked* in liveness,
``outbox_status`` (text and JSON) and the metrics, against a private RabbitMQ node that
runs the management plugin.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import timedelta
from io import StringIO
from typing import Any

import amqp
import prometheus_client
import pytest
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from reliable_events import queue_depths
from reliable_events.heartbeats import HeartbeatWriter
from reliable_events.liveness import ConsumerLiveness, liveness
from reliable_events.metrics_collector import build_registry
from reliable_events.metrics_collector import clear_cache as clear_metrics_cache
from reliable_events.models import Heartbeat
from tests.support.consumer_support import make_consumer
from tests.support.rabbit_node import available, private_rabbit_node

pytestmark = [
    pytest.mark.rabbitmq,
    pytest.mark.django_db,
    pytest.mark.skipif(not available(), reason="RabbitMQ server scripts not installed"),
]


def _settled(name: str, ready: int, unacked: int, timeout: float = 30.0) -> ConsumerLiveness:
    """The consumer's liveness once the broker's figures read ``ready`` and ``unacked``
    (its statistics lag by up to ``collect_statistics_interval``)."""
    deadline = time.monotonic() + timeout
    while True:
        queue_depths.clear_cache()
        state = liveness().consumer(name)
        assert state is not None
        if (state.messages, state.unacked) == (ready, unacked):
            return state
        if time.monotonic() > deadline:
            raise AssertionError(
                f"expected {ready} ready and {unacked} unacked, the broker says "
                f"{state.messages} and {state.unacked} ({state.unacked_error or state.queue_error})"
            )
        time.sleep(0.25)


def _unacked_gauge(name: str) -> float | None:
    clear_metrics_cache()
    text = prometheus_client.generate_latest(build_registry(database=True)).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            unacked = sample.name == "reliable_events_queue_messages_unacked"
            if unacked and sample.labels.get("consumer") == name:
                return float(sample.value)
    return None


def test_messages_held_unacked_by_a_process_show_everywhere(
    re_settings: Any, clean_registry: Any, admin_client: Client
) -> None:
    with private_rabbit_node(management=True) as node:
        re_settings(
            BROKER_URL=node.url,
            BROKER_MANAGEMENT_URL=node.management_url,
            EXCHANGE=f"test-ev-{uuid.uuid4().hex[:10]}",
            METRICS=True,
        )
        consumer = make_consumer(clean_registry, topics=["held.*"])
        call_command("declare_topology", stdout=StringIO())
        queue = consumer.queue_name()
        connection = amqp.Connection(f"127.0.0.1:{node.port}", userid="guest", password="guest")
        connection.connect()
        channel = connection.channel()
        for n in range(5):
            channel.basic_publish(
                amqp.Message(json.dumps({"n": n}), delivery_mode=2), exchange="", routing_key=queue
            )
        held = [channel.basic_get(queue, no_ack=False) for _ in range(3)]
        assert all(message is not None for message in held)

        state = _settled(consumer.name, ready=2, unacked=3)
        assert state.unacked_error == ""
        out = StringIO()
        call_command("outbox_status", stdout=out)
        assert f"(2 waiting in {queue}, 3 unacked" in out.getvalue()
        out = StringIO()
        call_command("outbox_status", "--json", stdout=out)
        shown = {c["name"]: c for c in json.loads(out.getvalue())["liveness"]["consumers"]}
        assert (shown[consumer.name]["messages"], shown[consumer.name]["unacked"]) == (2, 3)
        assert _unacked_gauge(consumer.name) == 3.0
        # The process holding them froze: its warning says how many the broker counts.
        writer = HeartbeatWriter("consumer", [consumer.name])
        assert writer.tick()
        assert writer.row_id is not None
        Heartbeat.objects.filter(pk=writer.row_id).update(
            last_seen=timezone.now() - timedelta(seconds=2 * liveness().timeout_seconds)
        )
        queue_depths.clear_cache()
        frozen = liveness().consumer(consumer.name)
        assert frozen is not None
        assert frozen.silent == 1
        assert "a frozen one keeps its unacked messages (the broker counts 3 now)" in (
            frozen.warning
        )
        page = admin_client.get(reverse("admin:reliable_events_overview")).content.decode()
        table = page.split('<table id="re-consumers">')[1].split("</table>")[0]
        assert ">Unacked</th>" in table
        row = next(row for row in table.split("<tr") if f"<td>{consumer.name}</td>" in row)
        assert '<td class="re-count" title="">3</td>' in row

        connection.close()  # the process is gone: what it held is ready again
        _settled(consumer.name, ready=5, unacked=0)

        # The API refusing us (a wrong password) shows as the reason, without the password.
        re_settings(BROKER_MANAGEMENT_URL=node.management_url.replace("guest@", "n0t-it@"))
        queue_depths.clear_cache()
        refused = liveness().consumer(consumer.name)
        assert refused is not None
        assert (refused.messages, refused.unacked) == (5, None)
        assert refused.unacked_error == "management API: HTTP 401 Unauthorized"
        assert "n0t-it" not in json.dumps(liveness().as_dict())
