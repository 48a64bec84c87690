"""CloudEvents as a consumer decodes them: structured envelopes that carry trace context,
envelopes that are broken (each a poison ``undecodable`` with its reason), and the event
time of a message stored without one."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from reliable_events.broker.base import KEY_HEADER, Delivery, OutgoingMessage
from reliable_events.cloudevents import STRUCTURED_CONTENT_TYPE, attributes, structured
from reliable_events.consumer.base import Event
from reliable_events.consumer.wire import UNDECODABLE, Poison, decode_event

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def message(**headers: str) -> OutgoingMessage:
    return OutgoingMessage(
        ref=1,
        exchange="events",
        routing_key="orders.created",
        body=b'{"order": 7}',
        message_id="m-1",
        topic="orders.created",
        headers=dict(headers),
        timestamp=datetime(2026, 11, 29, 12, 0, tzinfo=UTC),
    )


def received(body: bytes, content_type: str = STRUCTURED_CONTENT_TYPE) -> Delivery:
    return Delivery(
        consumer="orders",
        body=body,
        properties={"content_type": content_type},
        headers={},
    )


def decode(delivery: Delivery) -> Event:
    return decode_event(delivery, max_bytes=1 << 20, exchange="events")


def test_a_structured_event_keeps_its_trace_context_through_the_envelope() -> None:
    sent = structured(message(traceparent=TRACEPARENT, tracestate="k=v"), "/shop")
    envelope = json.loads(sent.body)
    assert (envelope["traceparent"], envelope["tracestate"]) == (TRACEPARENT, "k=v")
    event = decode(received(sent.body, sent.content_type))
    assert event.id == "m-1"
    assert event.payload == {"order": 7}
    assert event.headers["traceparent"] == TRACEPARENT
    assert event.headers["tracestate"] == "k=v"


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"\xff\xfe not utf-8", "not a JSON object of spec 1.0"),
        (b'{"specversion": "1.0", "id": ', "not a JSON object of spec 1.0"),
        (b'["specversion", "1.0"]', "not a JSON object of spec 1.0"),
        (b'{"specversion": "0.3", "id": "m", "type": "t", "data": {}}', "spec 1.0"),
        (
            b'{"specversion": "1.0", "id": "m", "type": "t", "data_base64": "AAEC"}',
            "the CloudEvent's data is not JSON",
        ),
        (
            b'{"specversion": "1.0", "id": "m", "type": "t", "datacontenttype": "text/xml",'
            b' "data": "<a/>"}',
            "the CloudEvent's data is not JSON (text/xml)",
        ),
    ],
)
def test_a_broken_structured_envelope_is_poison_with_its_reason(body: bytes, why: str) -> None:
    with pytest.raises(Poison) as caught:
        decode(received(body))
    assert caught.value.reason == UNDECODABLE
    assert why in caught.value.detail


def test_a_message_without_a_stored_time_gets_the_time_it_is_sent() -> None:
    before = datetime.now(UTC)
    attrs = attributes(
        OutgoingMessage(
            ref=1,
            exchange="events",
            routing_key="r",
            body=b"{}",
            message_id="m",
            topic="t",
            headers={KEY_HEADER: "order-1"},
        ),
        "/shop",
    )
    sent = datetime.fromisoformat(attrs["time"])
    assert before <= sent <= datetime.now(UTC) + timedelta(seconds=1)
    assert attrs["time"].endswith("Z")
    assert attrs["subject"] == "order-1"
