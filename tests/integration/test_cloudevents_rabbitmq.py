"""CloudEvents 1.0 on RabbitMQ, read with the official CloudEvents Python SDK.

Events published with ``CLOUDEVENTS = "binary"`` and ``"structured"`` are taken from a
real RabbitMQ queue and parsed by ``cloudevents`` (its AMQP protocol binding, JSON
format); CloudEvents made by the SDK itself (no AMQP ``message_id``) and legacy messages
are consumed by an ``EventConsumer``, through a delay-queue retry too.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from cloudevents.core.bindings.amqp import AMQPMessage, from_amqp, to_binary, to_structured
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from django.db import transaction

from reliable_events import publish_event
from reliable_events.consumer import Event, EventConsumer
from reliable_events.consuming import Worker
from reliable_events.models import DeadLetter
from reliable_events.relay import relay_once
from tests.support.consumer_support import make_consumer

pytestmark = [pytest.mark.rabbitmq, pytest.mark.django_db(transaction=True)]


def _raw(body: Any) -> bytes:
    """py-amqp hands a body with ``content_encoding`` over as text."""
    return body if isinstance(body, bytes) else str(body).encode()


def read_with_sdk(message: Any) -> Any:
    """A message taken from RabbitMQ, parsed by the CloudEvents SDK (auto mode)."""
    return from_amqp(
        AMQPMessage(
            properties={"content-type": message.properties.get("content_type")},
            application_properties=dict(message.properties.get("application_headers") or {}),
            application_data=_raw(message.body),
        ),
        JSONFormat(),
    )


def send_what_the_hook_left() -> None:
    """The relay, as it runs beside every project: on a loaded machine the on-commit
    hook's connect (``ON_COMMIT_CONNECT_TIMEOUT``, 0.25 s) may time out, and the row then
    waits for it.  Both build the message the same way (``build_message``)."""
    relay_once()


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_published_events_are_cloudevents_the_sdk_reads(broker, rabbit, re_settings, mode):
    re_settings(CLOUDEVENTS=mode, CLOUDEVENTS_SOURCE="https://shop.example/orders")
    queue = rabbit.bind_queue(broker["EXCHANGE"], "orders.#")
    before = datetime.now(UTC).replace(microsecond=0)
    with transaction.atomic():
        publish_event(
            "orders.created", {"order": 7, "lines": [1, 2]}, key="o-7", message_id=f"m-{mode}"
        )
    send_what_the_hook_left()
    [message] = rabbit.get_all(queue, expect=1)
    event = read_with_sdk(message)
    assert event.get_specversion() == "1.0"
    assert event.get_id() == f"m-{mode}"
    assert event.get_type() == "orders.created"
    assert event.get_source() == "https://shop.example/orders"
    assert event.get_subject() == "o-7"
    assert event.get_time() >= before
    assert event.get_data() == {"order": 7, "lines": [1, 2]}
    if mode == "binary":
        assert message.properties["content_type"] == "application/json"
        assert json.loads(_raw(message.body)) == {"order": 7, "lines": [1, 2]}  # the body
        assert message.properties["application_headers"]["cloudEvents:id"] == "m-binary"
    else:
        assert message.properties["content_type"] == "application/cloudevents+json"
        assert event.get_datacontenttype() == "application/json"


def test_the_consumer_reads_binary_structured_sdk_made_and_legacy_events(
    broker, rabbit, re_settings, clean_registry
):
    attempts: dict[str, int] = {}

    def fail_first(consumer: EventConsumer, event: Event) -> None:
        attempts[event.id] = event.attempt
        if event.attempt == 1 and event.id.startswith("retry-"):
            raise RuntimeError("transient")

    consumer = make_consumer(
        clean_registry, topics=["orders.#"], retry_delays=[0.2], behaviour=fail_first
    )
    worker = Worker([consumer], url=broker["BROKER_URL"])
    worker.transport.connect()  # declares the consumer's queues
    for mode in ("off", "binary", "structured"):
        re_settings(CLOUDEVENTS=mode)
        with transaction.atomic():
            publish_event("orders.created", {"mode": mode}, message_id=f"ours-{mode}")
            publish_event("orders.created", {"mode": mode}, message_id=f"retry-{mode}")
        send_what_the_hook_left()
    sdk_made = (
        ("sdk-binary", to_binary, {"from": "sdk-binary"}),
        ("sdk-structured", to_structured, {"from": "sdk-structured"}),
        ("sdk-base64", to_structured, b"\x00\x01"),  # data_base64: not JSON, poison
    )
    for name, encode, data in sdk_made:
        made = CloudEvent(
            {"id": name, "source": "/elsewhere", "type": "orders.created", "specversion": "1.0"},
            data,
        )
        amqp_message = encode(made, JSONFormat())
        rabbit.channel.basic_publish(
            _py_amqp(amqp_message), exchange=broker["EXCHANGE"], routing_key="orders.created"
        )
    worker.run(until_idle=2.0)
    seen = {event.id: event for event in consumer.calls}
    for mode in ("off", "binary", "structured"):
        assert seen[f"ours-{mode}"].payload == {"mode": mode}
        assert seen[f"ours-{mode}"].topic == "orders.created"
        assert attempts[f"retry-{mode}"] == 2  # retried through the delay queue, still read
        assert seen[f"retry-{mode}"].payload == {"mode": mode}
    assert seen["sdk-binary"].payload == {"from": "sdk-binary"}
    assert seen["sdk-structured"].payload == {"from": "sdk-structured"}
    assert seen["sdk-structured"].topic == "orders.created"
    # Its dead letter is found by the CloudEvent's id (the AMQP message had none).
    letter = DeadLetter.objects.get()
    assert (letter.message_id, letter.reason, letter.topic) == (
        "sdk-base64",
        "undecodable",
        "orders.created",
    )
    assert "the CloudEvent's data is not JSON" in letter.error_message


def _py_amqp(message: AMQPMessage) -> Any:
    """An SDK-made AMQP message as a py-amqp message (no AMQP ``message_id``: the
    CloudEvent's ``id`` is the only id it has)."""
    import amqp

    return amqp.Message(
        message.application_data,
        content_type=message.properties.get("content-type"),
        application_headers=dict(message.application_properties),
        delivery_mode=2,
    )
