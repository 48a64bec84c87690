"""Bad input at the consumer: raw AMQP messages sent straight to a consumer's queue.

Random bodies (hypothesis), huge bodies, wrong content types and encodings, missing or
garbage message ids, ``x-event-attempt`` as text, negative, huge or of odd AMQP types,
and headers of every AMQP table type.  Each bad message is dead-lettered with its reason
(and acked: nothing loops in the queue), the loop keeps consuming, and a good message
sent after them is processed.  The consumer runs in this process (``Worker``) on the
real RabbitMQ and PostgreSQL, bounded by ``until_idle``.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from decimal import Decimal
from typing import Any

import amqp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reliable_events.consumer import Event, EventConsumer
from reliable_events.consuming import (
    ATTEMPT_HEADER,
    BAD_ATTEMPT_HEADER,
    BAD_MESSAGE_ID,
    FIRST_FAILED_HEADER,
    HISTORY_HEADER,
    NO_MESSAGE_ID,
    NOT_JSON,
    PERMANENT_ERROR,
    RAW_BODY_LIMIT,
    TOO_LARGE,
    TOPIC_HEADER,
    WRONG_CONTENT_TYPE,
    Worker,
    WorkerStats,
)
from reliable_events.exceptions import PermanentError
from reliable_events.models import DeadLetter
from reliable_events.topology import declare_on_amqp_channel, full_topology
from tests.support.consumer_support import (
    RecordingConsumer,
    applied,
    make_consumer,
    queue_names,
    run_worker_thread,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.rabbitmq, pytest.mark.postgres]

#: Bounded runs: the worker exits after this long without a delivery.
IDLE = 0.6


def fail_when_asked(consumer: EventConsumer, event: Event) -> None:
    """Good bodies of the form ``{"fail": true}`` fail permanently (dead letter)."""
    if isinstance(event.payload, dict) and event.payload.get("fail"):
        raise PermanentError("asked to fail")


@pytest.fixture
def consumer(clean_registry: Any, broker: Any, rabbit: Any) -> type[RecordingConsumer]:
    """A consumer whose queue (and delay queue) exists on the broker, deleted after."""
    cls = make_consumer(clean_registry, topics=["fuzz.#"], max_retries=1, behaviour=fail_when_asked)
    rabbit.queues.extend(queue_names(cls))
    declare_on_amqp_channel(rabbit.channel, full_topology(cls.queue_specs()))
    return cls


def send_raw(rabbit: Any, queue: str, body: bytes, **properties: Any) -> None:
    """Publish straight to ``queue`` through the default exchange, with exactly the
    ``properties`` given (no defaults filled in)."""
    rabbit.channel.basic_publish(amqp.Message(body, **properties), exchange="", routing_key=queue)


def good(message_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "content_type": "application/json",
        "content_encoding": "utf-8",
        "delivery_mode": 2,
        "message_id": message_id,
        "type": "fuzz.created",
        **extra,
    }


def run(consumer: type[EventConsumer]) -> WorkerStats:
    return run_worker_thread(Worker([consumer], prefetch=10), timeout=120, until_idle=IDLE)


def letters_by_id(consumer: type[EventConsumer]) -> dict[str, DeadLetter]:
    letters = list(DeadLetter.objects.filter(consumer=consumer.name))
    by_id = {letter.message_id: letter for letter in letters}
    assert len(by_id) == len(letters), "one message, several dead letters"
    return by_id


def assert_drained(rabbit: Any, consumer: type[EventConsumer]) -> None:
    for queue in queue_names(consumer):
        assert rabbit.count(queue) == 0, f"{queue} still holds messages"


def is_json(body: bytes) -> bool:
    """The oracle: UTF-8 text that is JSON (without NaN/Infinity, which JSON lacks)."""

    def refuse(name: str) -> Any:
        raise ValueError(name)

    try:
        json.loads(body.decode("utf-8"), parse_constant=refuse)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return False
    return True


# -- random bodies --------------------------------------------------------------------------
bodies = st.one_of(
    st.binary(max_size=600),
    st.text(max_size=200).map(str.encode),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=8), children, max_size=4)
        ),
        max_leaves=12,
    ).map(lambda value: json.dumps(value).encode()),
    st.sampled_from(
        [b"", b"{", b"nul", b"NaN", b"[1,]", b'"\\ud800"', b"\xef\xbb\xbf{}", b'{"a":1}x', b"\x00"]
    ),
)


@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(bodies, min_size=5, max_size=25))
def test_random_bodies_are_applied_or_dead_lettered_and_the_loop_goes_on(
    consumer: type[EventConsumer], rabbit: Any, batch: list[bytes]
) -> None:
    tag = uuid.uuid4().hex[:8]
    ids = [f"{tag}-{n}" for n in range(len(batch))]
    for message_id, body in zip(ids, batch, strict=True):
        send_raw(rabbit, consumer.name, body, **good(message_id))
    send_raw(rabbit, consumer.name, b'{"ok": true}', **good(f"{tag}-good"))

    run(consumer)

    letters = letters_by_id(consumer)
    for message_id, body in zip(ids, batch, strict=True):
        if is_json(body):
            assert applied(consumer, message_id) == 1, body
            assert message_id not in letters
        else:
            assert applied(consumer, message_id) == 0, body
            letter = letters[message_id]
            assert letter.reason == NOT_JSON, (body, letter.reason)
            assert letter.payload is None
            assert letter.raw_body or not body
    assert applied(consumer, f"{tag}-good") == 1
    assert_drained(rabbit, consumer)


# -- size, content type, message id, attempt header -----------------------------------------
def test_bodies_over_the_size_cap_are_dead_lettered_with_a_bounded_raw_body(
    consumer: type[EventConsumer], rabbit: Any, re_settings: Any
) -> None:
    limit = 64 * 1024
    re_settings(MAX_PAYLOAD_BYTES=limit)

    def sized(size: int) -> bytes:  # compact JSON: the payload's size as publish_event counts
        body = json.dumps({"pad": "x" * size}, separators=(",", ":")).encode()
        return json.dumps(
            {"pad": "x" * (size - (len(body) - size))}, separators=(",", ":")
        ).encode()

    at_limit, over, huge = sized(limit), sized(limit + 1), b"[" + b"1," * 2_000_000 + b"1]"
    assert (len(at_limit), len(over)) == (limit, limit + 1)
    send_raw(rabbit, consumer.name, at_limit, **good("at-limit"))
    send_raw(rabbit, consumer.name, over, **good("over"))
    send_raw(rabbit, consumer.name, huge, **good("huge"))
    send_raw(rabbit, consumer.name, b"{}", **good("after"))

    stats = run(consumer)

    letters = letters_by_id(consumer)
    assert set(letters) == {"over", "huge"}
    for message_id, body in (("over", over), ("huge", huge)):
        letter = letters[message_id]
        assert letter.reason == TOO_LARGE
        assert str(len(body)) in letter.error_message
        assert letter.payload is None
        assert 0 < len(letter.raw_body) <= RAW_BODY_LIMIT
    assert applied(consumer, "at-limit") == applied(consumer, "after") == 1
    assert stats.poison == 2
    assert_drained(rabbit, consumer)


WRONG_TYPES: list[dict[str, str]] = [
    {"content_type": "application/x-python-serialize"},
    {"content_type": "text/plain"},
    {"content_type": "application/x-yaml"},
    {"content_type": "application/msgpack"},
    {"content_type": "application/json-patch+json"},
    {"content_type": "application/jsonx"},
    {"content_encoding": "gzip"},
    {"content_encoding": "binary"},
    {"content_encoding": "latin-1"},
]
ACCEPTED_TYPES: list[dict[str, str | None]] = [
    {"content_type": "APPLICATION/JSON; charset=utf-8"},
    {"content_encoding": "UTF8"},
    {"content_type": None, "content_encoding": None},
]


def test_wrong_content_types_and_encodings_are_dead_lettered(
    consumer: type[EventConsumer], rabbit: Any
) -> None:
    for n, wrong in enumerate(WRONG_TYPES):
        send_raw(rabbit, consumer.name, b'{"n": 1}', **{**good(f"wrong-{n}"), **wrong})
    for n, accepted in enumerate(ACCEPTED_TYPES):
        extra = {k: v for k, v in {**good(f"ok-{n}"), **accepted}.items() if v is not None}
        send_raw(rabbit, consumer.name, b'{"n": 1}', **extra)

    stats = run(consumer)

    letters = letters_by_id(consumer)
    assert set(letters) == {f"wrong-{n}" for n in range(len(WRONG_TYPES))}
    for n, props in enumerate(WRONG_TYPES):
        letter = letters[f"wrong-{n}"]
        assert letter.reason == WRONG_CONTENT_TYPE
        assert next(iter(props.values())) in letter.error_message
    for n in range(len(ACCEPTED_TYPES)):
        assert applied(consumer, f"ok-{n}") == 1
    assert stats.poison == len(WRONG_TYPES)
    assert_drained(rabbit, consumer)


def test_missing_or_garbage_message_ids_are_dead_lettered(
    consumer: type[EventConsumer], rabbit: Any
) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({}, NO_MESSAGE_ID),
        ({"message_id": ""}, NO_MESSAGE_ID),
        ({"message_id": "   "}, NO_MESSAGE_ID),
        ({"message_id": "nul\x00inside"}, BAD_MESSAGE_ID),
        ({"message_id": "é" * 60}, "applied"),  # multi-byte UTF-8 is fine
    ]
    for n, (props, _) in enumerate(cases):
        base = {k: v for k, v in good("x").items() if k != "message_id"}
        send_raw(rabbit, consumer.name, json.dumps({"case": n}).encode(), **base, **props)
    send_raw(rabbit, consumer.name, b'{"case": "bare"}')  # no properties, no headers at all
    send_raw(rabbit, consumer.name, b"{}", **good("after"))

    stats = run(consumer)

    letters = list(DeadLetter.objects.filter(consumer=consumer.name))
    reasons = sorted(letter.reason for letter in letters)
    assert reasons == sorted([NO_MESSAGE_ID, *(r for _, r in cases if r != "applied")])
    by_case = {(letter.payload or {})["case"]: letter for letter in letters}
    for n, (_, reason) in enumerate(cases):
        if reason != "applied":
            assert by_case[n].reason == reason
            assert "\x00" not in by_case[n].message_id  # storable, escaped
    assert applied(consumer, "é" * 60) == 1
    assert applied(consumer, "after") == 1
    assert by_case["bare"].reason == NO_MESSAGE_ID
    assert stats.poison == 5
    assert_drained(rabbit, consumer)


ATTEMPTS: list[tuple[Any, str]] = [
    ("later", BAD_ATTEMPT_HEADER),
    ("", BAD_ATTEMPT_HEADER),
    ("\u00b2", BAD_ATTEMPT_HEADER),  # a digit to str.isdigit, not to int()
    (" 3x", BAD_ATTEMPT_HEADER),
    (b"\xff\xfe", BAD_ATTEMPT_HEADER),
    (0, BAD_ATTEMPT_HEADER),
    (-1, BAD_ATTEMPT_HEADER),
    (-(2**63), BAD_ATTEMPT_HEADER),
    (2**40, BAD_ATTEMPT_HEADER),
    (2**63 - 1, BAD_ATTEMPT_HEADER),
    ("99999999999999999999999", BAD_ATTEMPT_HEADER),
    (1.5, BAD_ATTEMPT_HEADER),
    (2.0, BAD_ATTEMPT_HEADER),
    (Decimal("2"), BAD_ATTEMPT_HEADER),
    (True, BAD_ATTEMPT_HEADER),
    (dt.datetime(2024, 1, 1), BAD_ATTEMPT_HEADER),
    ([1], BAD_ATTEMPT_HEADER),
    ({"n": 1}, BAD_ATTEMPT_HEADER),
    (None, "applied"),  # AMQP void: as if absent
    ("2", "applied"),
    (b"2", "applied"),
    (2, "applied"),
]


def test_garbage_attempt_headers_are_dead_lettered(
    consumer: type[EventConsumer], rabbit: Any
) -> None:
    for n, (value, _) in enumerate(ATTEMPTS):
        send_raw(
            rabbit,
            consumer.name,
            json.dumps({"case": n}).encode(),
            **good(f"attempt-{n}", application_headers={ATTEMPT_HEADER: value}),
        )
    send_raw(rabbit, consumer.name, b"{}", **good("after"))

    stats = run(consumer)

    letters = letters_by_id(consumer)
    for n, (value, outcome) in enumerate(ATTEMPTS):
        message_id = f"attempt-{n}"
        if outcome == "applied":
            assert applied(consumer, message_id) == 1, value
            assert message_id not in letters
        else:
            assert applied(consumer, message_id) == 0, value
            assert letters[message_id].reason == outcome, value
            assert letters[message_id].payload == {"case": n}
    assert applied(consumer, "after") == 1
    assert stats.poison == sum(1 for _, outcome in ATTEMPTS if outcome != "applied")
    assert_drained(rabbit, consumer)


ODD_VALUES: dict[str, Any] = {
    "decimal": Decimal("-1234.5678"),
    "datetime": dt.datetime(2024, 2, 29, 12, 0, 0),
    "bytes": b"\x00\xff\xfe binary",
    "nul-text": "a\x00b",
    "nested": {"a": {"b": [1, "two", None, {"c": b"\x01"}]}},
    "array": [1, 2.5, True, None, "x"],
    "float": 1e308,
    "void": None,
    "bool": False,
    "long": -(2**63),
    "unicode": "\u2603 \U0001f600",
}
GARBAGE_OWN_HEADERS: dict[str, Any] = {
    HISTORY_HEADER: "[[[not json",
    FIRST_FAILED_HEADER: "not a date",
    TOPIC_HEADER: 12345,
    "x-event-key": {"not": "a string"},
    "x-death": "garbage",
}


@pytest.mark.parametrize("fail", [False, True], ids=["handled", "dead-lettered"])
def test_headers_of_every_amqp_type_do_not_break_the_loop(
    consumer: type[RecordingConsumer], rabbit: Any, fail: bool
) -> None:
    """Odd headers are the message's business: it is processed (or, when its handler
    fails, dead-lettered with every header stored as JSON), never poison."""
    headers = {**ODD_VALUES, **GARBAGE_OWN_HEADERS}
    body = json.dumps({"fail": fail}).encode()
    send_raw(rabbit, consumer.name, body, **good("odd", application_headers=headers))
    send_raw(rabbit, consumer.name, b"{}", **good("after"))

    stats = run(consumer)

    assert applied(consumer, "after") == 1
    assert stats.poison == 0
    if not fail:
        assert applied(consumer, "odd") == 1
        [event] = [e for e in consumer.calls if e.id == "odd"]
        assert event.key is None  # a non-string key header is ignored
        assert event.attempt == 1
        assert event.headers["decimal"] == ODD_VALUES["decimal"]
        assert not DeadLetter.objects.exists()
    else:
        assert applied(consumer, "odd") == 0
        letter = DeadLetter.objects.get(message_id="odd")
        assert letter.reason == PERMANENT_ERROR
        stored = letter.headers
        assert stored["decimal"] == "-1234.5678"
        assert stored["datetime"].startswith("2024-02-29T12:00:00")
        assert stored["nul-text"] == "a\\x00b"
        assert stored["nested"]["a"]["b"][1] == "two"
        assert stored[HISTORY_HEADER] == "[[[not json"
        assert [h["attempt"] for h in letter.history] == [1]
    assert_drained(rabbit, consumer)
