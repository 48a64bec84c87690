"""EventConsumer, its registry and topology, and decoding deliveries (no broker needed)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from django.db import connection

from reliable_events.consumer import (
    QUORUM_DELIVERY_LIMIT,
    Event,
    EventConsumer,
    Outcome,
    record_processed,
    registry,
)
from reliable_events.consumer.wire import FIRST_FAILED_HEADER, HISTORY_HEADER, read_first_failed
from reliable_events.consuming import (
    ATTEMPT_HEADER,
    BAD_ATTEMPT_HEADER,
    BAD_MESSAGE_ID,
    NO_MESSAGE_ID,
    NOT_JSON,
    TOO_LARGE,
    TOPIC_HEADER,
    WRONG_CONTENT_TYPE,
    Delivery,
    Failure,
    Poison,
    application_frame,
    decode_event,
    fingerprint,
    json_safe,
    parse_attempt,
    read_history,
    retry_headers,
)
from reliable_events.exceptions import ConfigurationError, PermanentError, UnknownConsumer
from reliable_events.models import ProcessedMessage
from tests.support.consumer_support import applied, make_consumer

EXCHANGE = "events"


def delivery(body: bytes = b'{"order_id": 1}', **overrides: object) -> Delivery:
    properties: dict[str, object] = {
        "content_type": "application/json",
        "content_encoding": "utf-8",
        "message_id": "m-1",
        "type": "orders.created",
        "timestamp": 1_700_000_000,
    }
    headers: dict[str, object] = {"x-event-key": "42", "tenant": "a"}
    for name, value in overrides.items():
        if name == "headers":
            assert isinstance(value, dict)
            headers = value
        elif value is None:
            properties.pop(name, None)
        else:
            properties[name] = value
    return Delivery(
        consumer="c",
        body=body,
        properties=properties,
        headers=headers,
        exchange=EXCHANGE,
        routing_key="orders.created",
    )


def decode(d: Delivery, max_bytes: int = 1000) -> Event:
    return decode_event(d, max_bytes=max_bytes, exchange=EXCHANGE)


# -- decoding ----------------------------------------------------------------------------
def test_a_well_formed_delivery_becomes_an_event():
    event = decode(delivery())
    assert event.id == "m-1"
    assert event.topic == "orders.created"
    assert event.key == "42"
    assert event.payload == {"order_id": 1}
    assert event.headers == {"tenant": "a"}  # the app's x- headers are not user headers
    assert event.attempt == 1
    assert event.published_at == datetime.fromtimestamp(1_700_000_000, tz=UTC)


def test_without_use_tz_wire_times_are_naive_in_the_time_zone(settings):
    """A project with ``USE_TZ = False`` keeps naive datetimes in ``TIME_ZONE``: the event's
    publication time and a retry's first failure are handed over that way (SQLite refuses
    an aware one in a query then), and the retry header still names the instant."""
    settings.USE_TZ = False
    settings.TIME_ZONE = "Asia/Tokyo"  # UTC+9, no daylight saving
    assert decode(delivery()).published_at == datetime(2023, 11, 15, 7, 13, 20)
    at_noon_utc = datetime(2024, 1, 1, 21, 0)
    for header in (
        b"2024-01-01T12:00:00+00:00",
        datetime(2024, 1, 1, 12, 0),  # an AMQP timestamp as py-amqp decodes it (UTC)
    ):
        assert read_first_failed({FIRST_FAILED_HEADER: header}) == at_noon_utc
    failure = first_failure(at_noon_utc, history=[])
    written = retry_headers(delivery(), decode(delivery()), failure)[FIRST_FAILED_HEADER]
    assert written == "2024-01-01T21:00:00+09:00"
    assert read_first_failed({FIRST_FAILED_HEADER: written}) == at_noon_utc


@pytest.mark.parametrize(
    ("d", "reason"),
    [
        (delivery(b'{"pad": "' + b"x" * 2000 + b'"}'), TOO_LARGE),
        (delivery(content_type="text/plain"), WRONG_CONTENT_TYPE),
        (delivery(content_type="application/x-python-serialize"), WRONG_CONTENT_TYPE),
        (delivery(content_encoding="gzip"), WRONG_CONTENT_TYPE),
        (delivery(b"\xff\xfe not utf-8"), NOT_JSON),
        (delivery(b"{not json"), NOT_JSON),
        (delivery(b'{"x": NaN}'), NOT_JSON),
        (delivery(b""), NOT_JSON),
        (delivery(message_id=None), NO_MESSAGE_ID),
        (delivery(message_id="  "), NO_MESSAGE_ID),
        (delivery(message_id="x" * 300), BAD_MESSAGE_ID),
        (delivery(headers={ATTEMPT_HEADER: "two"}), BAD_ATTEMPT_HEADER),
        (delivery(headers={ATTEMPT_HEADER: 0}), BAD_ATTEMPT_HEADER),
        (delivery(headers={ATTEMPT_HEADER: 1.5}), BAD_ATTEMPT_HEADER),
        (delivery(headers={ATTEMPT_HEADER: True}), BAD_ATTEMPT_HEADER),
    ],
)
def test_poison_deliveries_name_their_defect(d, reason):
    with pytest.raises(Poison) as info:
        decode(d)
    assert info.value.reason == reason


def test_poison_with_a_json_body_keeps_the_payload():
    with pytest.raises(Poison) as info:
        decode(delivery(message_id=None))
    assert info.value.payload == {"order_id": 1}


def test_a_missing_content_type_is_read_as_json():
    assert decode(delivery(content_type=None, content_encoding=None)).payload == {"order_id": 1}


def test_content_type_parameters_and_case_are_accepted():
    d = delivery(content_type="Application/JSON; charset=utf-8", content_encoding="UTF-8")
    assert decode(d).payload == {"order_id": 1}


@pytest.mark.parametrize(("value", "expected"), [(None, 1), (1, 1), (3, 3), ("4", 4), (b"5", 5)])
def test_attempt_header(value, expected):
    assert parse_attempt(value) == expected


def test_topic_falls_back_to_the_header_then_the_routing_key():
    d = delivery(type=None, headers={TOPIC_HEADER: "orders.paid"})
    assert decode(d).topic == "orders.paid"
    d = delivery(type=None, headers={})
    assert decode(d).topic == "orders.created"  # routing key on the events exchange
    d.exchange, d.routing_key = "", "some-queue"
    assert decode(d).topic == ""  # via the default exchange the routing key is a queue


# -- failure details ---------------------------------------------------------------------
def _raise_in_app_code() -> None:
    json.loads("{")  # raises inside the standard library


def test_application_frame_skips_library_frames():
    try:
        _raise_in_app_code()
    except ValueError as exc:
        where = application_frame(exc.__traceback__)
    assert where == f"{__name__}.test_application_frame_skips_library_frames"


def test_fingerprint_is_stable_and_distinguishes_types():
    assert fingerprint("ValueError", "a.b") == fingerprint("ValueError", "a.b")
    assert fingerprint("ValueError", "a.b") != fingerprint("KeyError", "a.b")
    assert len(fingerprint("ValueError", "a.b")) == 16


def test_json_safe_turns_amqp_values_into_storable_json():
    value = {
        "when": datetime(2024, 1, 2, tzinfo=UTC),
        "raw": b"\xffa",
        "nul": "a\x00b",
        "nan": float("nan"),
        "deep": [{"n": 1}],
    }
    safe = json_safe(value)
    json.dumps(safe, allow_nan=False)
    assert safe["when"] == "2024-01-02T00:00:00+00:00"
    assert "\x00" not in safe["nul"]
    assert safe["deep"] == [{"n": 1}]


def first_failure(at: datetime, history: list[dict[str, Any]]) -> Failure:
    """A handler's first failed attempt (``ValueError: bad``) at ``at``."""
    return Failure(
        attempt=1,
        at=at,
        error_type="ValueError",
        error_message="bad",
        traceback="",
        fingerprint="f",
        history=history,
        first_failed_at=at,
    )


def test_retry_headers_drop_broker_headers_and_carry_the_history():
    d = delivery(headers={"x-death": [{"count": 1}], "x-first-death-queue": "q", "tenant": "a"})
    event = decode(d)
    now = datetime(2024, 1, 1, tzinfo=UTC)
    failure = first_failure(
        now, history=[{"attempt": 1, "at": now.isoformat(), "error": "ValueError: bad"}]
    )
    headers = retry_headers(d, event, failure)
    assert headers[ATTEMPT_HEADER] == 2
    assert headers[TOPIC_HEADER] == "orders.created"
    assert headers["tenant"] == "a"
    assert not [k for k in headers if k.startswith(("x-death", "x-first-death"))]
    assert read_history(headers) == failure.history


def test_retry_headers_as_other_amqp_clients_type_them_are_read():
    """Another client may send the history as a byte array and the first failure as an
    AMQP timestamp; neither may be lost, and nonsense is read as nothing."""
    history = [{"attempt": 1, "at": "2024-01-01T00:00:00+00:00", "error": "E"}]
    assert read_history({HISTORY_HEADER: json.dumps(history).encode()}) == history
    assert read_history({HISTORY_HEADER: '{"attempt": 1}'}) == []
    naive = datetime(2024, 1, 1, 12, 30)
    assert read_first_failed({FIRST_FAILED_HEADER: naive}) == naive.replace(tzinfo=UTC)
    stamp = b"2024-01-01T12:30:00+00:00"
    assert read_first_failed({FIRST_FAILED_HEADER: stamp}) == naive.replace(tzinfo=UTC)


def test_a_timestamp_beyond_the_calendar_is_no_publication_time():
    event = decode(delivery(timestamp=10**20))
    assert event.published_at is None


# -- consumers, registry, topology -------------------------------------------------------
def test_subclasses_register_and_reset_empties_the_registry(clean_registry):
    class ReserveStock(EventConsumer):
        name = "inventory.reserve-stock-test"
        topics = ["orders.created"]

        def handle(self, event: Event) -> None:
            pass

    assert clean_registry.get("inventory.reserve-stock-test") is ReserveStock
    clean_registry.reset()
    clean_registry._discovered = True  # do not re-import real consumers modules here
    with pytest.raises(UnknownConsumer):
        clean_registry.get("inventory.reserve-stock-test")


def test_two_consumers_with_one_name_are_refused(clean_registry):
    class First(EventConsumer):
        name = "dup.name"
        topics = ["orders.*"]

    with pytest.raises(ConfigurationError, match="two consumers are named"):

        class Second(EventConsumer):
            name = "dup.name"
            topics = ["other.*"]

    assert clean_registry.get("dup.name") is First


@pytest.mark.parametrize(
    "attrs",
    [
        {"name": "bad name"},
        {"topics": []},
        {"topics": "orders.created"},
        {"topics": ["orders..created"]},
        {"max_retries": -1},
        {"retry_delays": [-1]},
        {"name": "x" * 200},
        {"batch_size": 0},
    ],
)
def test_invalid_consumers_are_refused(clean_registry, attrs):
    base = {"name": "valid.name", "topics": ["orders.*"], "handle": lambda self, event: None}
    with pytest.raises(ConfigurationError):
        type("Bad", (EventConsumer,), {**base, **attrs})


@pytest.mark.parametrize(
    ("attrs", "error"),
    [
        ({"hold_key_on_dead_letter": True}, "hold_key_on_dead_letter needs ordered = True"),
        ({"ordered": True, "partitions": 0}, "partitions must be an int from 1 to 64"),
        ({"ordered": True, "partitions": 65}, "partitions must be an int from 1 to 64"),
        ({"ordered": True, "partitions": "4"}, "partitions must be an int from 1 to 64"),
    ],
)
def test_ordering_options_out_of_range_are_refused(clean_registry, attrs, error):
    base = {"name": "valid.name", "topics": ["orders.*"], "handle": lambda self, event: None}
    with pytest.raises(ConfigurationError, match=error):
        type("Bad", (EventConsumer,), {**base, **attrs})
    assert "valid.name" not in registry.names()


def test_consumers_module_of_the_test_app_defines_nothing_without_its_env(monkeypatch):
    monkeypatch.delenv("RE_TEST_CONSUMER", raising=False)
    registry.autodiscover()
    assert not [name for name in registry.names() if name.startswith("env.")]


def test_topology_is_a_bound_queue_and_delay_queues_back_into_it(clean_registry, settings):
    consumer = make_consumer(clean_registry, max_retries=5, retry_delays=[1, 5, 15])
    specs = {spec.name: spec for spec in consumer.queue_specs()}
    main = specs[consumer.name]
    assert main.bindings == (("events", "orders.*"),)
    assert main.arguments == {}
    assert list(specs) == [consumer.name] + [f"{consumer.name}.retry.{n}" for n in (1, 2, 3)]
    for n, delay in ((1, 1), (2, 5), (3, 15)):
        spec = specs[f"{consumer.name}.retry.{n}"]
        assert spec.bindings == ()  # nothing routes here but our own re-publish
        assert spec.arguments == {
            "x-message-ttl": delay * 1000,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": consumer.name,
        }
    # the last delay repeats for later retries
    assert [consumer.retry_queue_for(n) for n in (1, 2, 3, 4, 5)] == [
        f"{consumer.name}.retry.{n}" for n in (1, 2, 3, 3, 3)
    ]
    assert [consumer.delay_for(n) for n in (1, 2, 3, 4, 5)] == [1, 5, 15, 15, 15]


def test_quorum_topology_sets_the_delivery_limit_and_safe_dead_lettering(clean_registry, settings):
    settings.RELIABLE_EVENTS = {**settings.RELIABLE_EVENTS, "QUEUE_TYPE": "quorum"}
    consumer = make_consumer(clean_registry, max_retries=2, retry_delays=[1])
    specs = {spec.name: spec for spec in consumer.queue_specs()}
    assert specs[consumer.name].arguments == {
        "x-queue-type": "quorum",
        "x-delivery-limit": QUORUM_DELIVERY_LIMIT,
    }
    retry = specs[f"{consumer.name}.retry.1"].arguments
    assert retry["x-queue-type"] == "quorum"
    assert retry["x-dead-letter-strategy"] == "at-least-once"
    assert retry["x-overflow"] == "reject-publish"
    from reliable_events.conf import app_settings

    assert app_settings.MAX_DELIVERIES < QUORUM_DELIVERY_LIMIT


# -- EventConsumer.process: the transaction and the idempotency record -------------------
@pytest.mark.django_db(transaction=True)
def test_process_applies_once_then_reports_duplicates(clean_registry):
    consumer = make_consumer(clean_registry)
    event = Event(id="m-1", topic="orders.created", key=None, payload={})
    first = consumer().process(event)
    second = consumer().process(event)
    assert first.outcome is Outcome.PROCESSED
    assert second.outcome is Outcome.DUPLICATE
    assert applied(consumer, "m-1") == 1
    assert len(consumer.calls) == 1
    assert ProcessedMessage.objects.filter(consumer=consumer.name, message_id="m-1").count() == 1


@pytest.mark.django_db(transaction=True)
def test_a_failing_handler_rolls_back_its_effects_and_the_record(clean_registry):
    def fail(consumer: EventConsumer, event: Event) -> None:
        raise PermanentError("no such order")

    consumer = make_consumer(clean_registry, behaviour=fail)
    result = consumer().process(Event(id="m-1", topic="t", key=None, payload={}))
    assert result.outcome is Outcome.FAILED
    assert result.permanent
    assert "PermanentError: no such order" in result.traceback
    assert applied(consumer) == 0
    assert not ProcessedMessage.objects.filter(consumer=consumer.name).exists()
    # the same message can be processed later
    assert consumer().process(Event(id="m-1", topic="t", key=None, payload={})).outcome is (
        Outcome.FAILED
    )


@pytest.mark.django_db
def test_process_inside_an_outer_transaction(clean_registry):
    """Inside an open transaction (a TestCase) the handler runs in a savepoint."""
    consumer = make_consumer(clean_registry)
    event = Event(id="m-1", topic="orders.created", key=None, payload={})
    assert consumer().process(event).outcome is Outcome.PROCESSED
    assert consumer().process(event).outcome is Outcome.DUPLICATE
    assert applied(consumer, "m-1") == 1


@pytest.mark.django_db(transaction=True)
def test_record_processed_is_idempotent_per_consumer():
    from django.db import transaction

    with transaction.atomic():
        assert record_processed(connection.alias, "a", "m-1", "t")
        assert not record_processed(connection.alias, "a", "m-1", "t")
        assert record_processed(connection.alias, "b", "m-1", "t")
    assert ProcessedMessage.objects.count() == 2
    assert ProcessedMessage.objects.filter(processed_at__isnull=True).count() == 0


# -- coalesced acks -------------------------------------------------------------------------
class RecordingChannel:
    def __init__(self) -> None:
        self.acks: list[tuple[int, bool]] = []

    def basic_ack(self, tag: int, multiple: bool = False) -> None:
        self.acks.append((tag, multiple))


def test_coalesced_acks_never_cover_an_unsettled_delivery():
    from reliable_events.consuming import AmqpTransport

    transport = AmqpTransport("amqp://x", [], prefetch=20, heartbeat=0, connect_timeout=1)
    channel = RecordingChannel()
    transport._channel = channel
    transport._unsettled = {1, 2, 3, 4}
    for tag in (1, 2):
        transport.ack(Delivery(consumer="c", body=b"", properties={}, headers={}, tag=tag))
    assert channel.acks == []  # coalesced
    transport.flush_acks()
    assert channel.acks == [(2, True)]  # 1 and 2 in one frame: nothing below 2 is open
    transport.ack(Delivery(consumer="c", body=b"", properties={}, headers={}, tag=4))
    transport.flush_acks()  # 3 is still being processed: 4 alone
    assert channel.acks[1:] == [(4, False)]
    transport._unsettled = set(range(5, 30))
    for tag in range(5, 15):  # half the prefetch window settles: sent without waiting
        transport.ack(Delivery(consumer="c", body=b"", properties={}, headers={}, tag=tag))
    assert channel.acks[2:] == [(14, True)]
