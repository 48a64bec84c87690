"""Security against the real RabbitMQ: a pickled body sent by a plain AMQP client is
dead-lettered and never unpickled; a wrong password (``ACCESS_REFUSED``) never shows up
in logs, errors, stored rows, command output, admin pages or API responses.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import amqp
import pytest
from django.contrib.auth.models import User
from django.test import Client
from rest_framework.test import APIClient

from reliable_events.consuming import WRONG_CONTENT_TYPE, Worker
from reliable_events.models import DeadLetter
from reliable_events.topology import declare_on_amqp_channel, full_topology
from tests.support.consumer_support import applied, make_consumer, queue_names, run_worker_thread
from tests.support.producer_support import with_port
from tests.support.security_support import (
    SECRET,
    broker_failure_surfaces,
    consumer_class,
    leaks,
    pickled_body,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.rabbitmq, pytest.mark.postgres]


def test_a_pickled_body_from_the_wire_is_dead_lettered_never_unpickled(
    clean_registry: Any, broker: Any, rabbit: Any, tmp_path: Path
) -> None:
    marker = tmp_path / "unpickled.marker"
    body = pickled_body(marker)
    consumer = make_consumer(clean_registry)
    rabbit.queues.extend(queue_names(consumer))
    declare_on_amqp_channel(rabbit.channel, full_topology(consumer.queue_specs()))
    for message_id, props in (
        ("pickled", {"content_type": "application/x-python-serialize"}),
        ("pickled-binary", {"content_type": "application/json", "content_encoding": "binary"}),
        ("pickled-untyped", {}),  # no content type: read as JSON, which it is not
    ):
        rabbit.channel.basic_publish(
            amqp.Message(body, message_id=message_id, delivery_mode=2, **props),
            exchange="",
            routing_key=consumer.name,
        )
    rabbit.channel.basic_publish(
        amqp.Message(b"{}", message_id="good", content_type="application/json"),
        exchange="",
        routing_key=consumer.name,
    )

    stats = run_worker_thread(Worker([consumer]), timeout=60, until_idle=0.6)

    assert not marker.exists(), "a consumer unpickled a message body"
    letters = {d.message_id: d for d in DeadLetter.objects.all()}
    assert {k: v.reason for k, v in letters.items()} == {
        "pickled": WRONG_CONTENT_TYPE,
        "pickled-binary": WRONG_CONTENT_TYPE,
        "pickled-untyped": "not-json",
    }
    assert all(letter.payload is None and letter.raw_body for letter in letters.values())
    assert applied(consumer, "good") == 1
    assert stats.poison == 3
    assert rabbit.count(consumer.name) == 0
    # The raw body really was a working pickle (the check above could fail).
    pickle.loads(body)
    assert marker.exists()


def test_a_refused_password_never_appears_anywhere(
    settings: Any,
    amqp_url: str,
    clean_registry: Any,
    admin_client: Client,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="reliable_events")
    port = urlsplit(amqp_url).port or 5672
    url = with_port(amqp_url, port, password=SECRET)
    settings.RELIABLE_EVENTS = {
        **settings.RELIABLE_EVENTS,
        "BROKER_URL": url,
        "CONNECT_TIMEOUT": 5,
        "CONSUMER_RECONNECT_MAX": 0.5,
    }
    api = APIClient()
    api.force_authenticate(User.objects.get(username="admin"))

    surfaces = broker_failure_surfaces(url, consumer_class(clean_registry), admin_client, api)

    refused = surfaces["BrokerError"] + surfaces["OutboxMessage.last_error"]
    assert "ACCESS_REFUSED" in refused or "AccessRefused" in refused, refused
    assert leaks(SECRET, surfaces, caplog.text) == []
