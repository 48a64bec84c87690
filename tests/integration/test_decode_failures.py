"""No transport stops the consume loop on a message it cannot decode.

For every transport the consumer runs on, a zero-length and a truncated body (and, for
the kombu virtual transports, a broken *stored message*: the envelope kombu itself
decodes while fetching, the failure that stopped the demo's consumer) are put on the
consumer's queue ahead of a good message.  One ``Worker.run`` must dead-letter the bad
one with its reason, process the good one, and leave the queue empty.

Adding a transport: write a :class:`TransportCase` subclass (``configure`` points
``RELIABLE_EVENTS`` at it, ``put_body`` puts a raw message, ``left`` counts what is
still queued), register it in ``CASES``, and add its rows to ``MATRIX`` (at least
``empty-body`` and ``truncated-body``, expecting ``not-json``).
"""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path
from typing import Any, ClassVar

import amqp
import pytest
from kombu import Connection

from reliable_events.consumer import EventConsumer
from reliable_events.consuming import NOT_JSON, UNDECODABLE, Worker
from reliable_events.deadletters import retry_block_reason
from reliable_events.models import DeadLetter, QueuedMessage
from reliable_events.topology import declare_on_amqp_channel, full_topology
from tests.support.consumer_support import applied, make_consumer, queue_names

pytestmark = pytest.mark.django_db(transaction=True)

GOOD = b'{"order": 1, "sku": "BOOK-1"}'
#: Bodies every transport must turn into a ``not-json`` dead letter.
BODIES = {
    "empty-body": b"",
    "truncated-body": GOOD[:13],
    # Small enough, but deeper than the JSON parser recurses (RecursionError).
    "deeply-nested-body": b"[" * 100_000,
}


def envelope(body: bytes, message_id: str) -> dict[str, Any]:
    """A stored message as kombu's virtual transports keep it (what ``basic_publish``
    writes), carrying ``body`` untouched."""
    return {
        "body": base64.b64encode(body).decode(),
        "content-type": "application/json",
        "content-encoding": "utf-8",
        "headers": {},
        "properties": {
            "message_id": message_id,
            "type": "orders.created",
            "delivery_mode": 2,
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
            "delivery_info": {"exchange": "events", "routing_key": "orders.created"},
        },
    }


class TransportCase:
    """How a test puts raw messages on one transport."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self.request = request
        self.settings: Any = request.getfixturevalue("settings")

    def configure(self) -> None:
        raise NotImplementedError

    def prepare(self, consumer: type[EventConsumer]) -> None:
        """Make the consumer's queues exist before anything is put on them."""
        Worker([consumer]).transport.connect()

    def put_body(self, consumer: type[EventConsumer], body: bytes, message_id: str) -> None:
        raise NotImplementedError

    def put_stored(self, consumer: type[EventConsumer], kind: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no stored form {kind!r}")

    def left(self, consumer: type[EventConsumer]) -> int:
        raise NotImplementedError

    def _set(self, **values: Any) -> None:
        self.settings.RELIABLE_EVENTS = {**self.settings.RELIABLE_EVENTS, **values}


class KombuCase(TransportCase):
    url: ClassVar[str]

    def options(self) -> dict[str, Any]:
        return {}

    def configure(self) -> None:
        self._set(BROKER_URL=self.url, BROKER_TRANSPORT_OPTIONS=self.options())

    def _put(self, consumer: type[EventConsumer], stored: Any) -> None:
        with Connection(self.url, transport_options=self.options()) as conn:
            channel: Any = conn.default_channel
            channel._put(consumer.queue_name(), stored)

    def put_body(self, consumer: type[EventConsumer], body: bytes, message_id: str) -> None:
        self._put(consumer, envelope(body, message_id))

    def left(self, consumer: type[EventConsumer]) -> int:
        with Connection(self.url, transport_options=self.options()) as conn:
            channel: Any = conn.default_channel
            return int(channel._size(consumer.queue_name()))


class MemoryCase(KombuCase):
    url = "memory://"

    def put_stored(self, consumer: type[EventConsumer], kind: str) -> None:
        stored = envelope(GOOD, "bad-1")
        if kind == "broken-envelope":
            del stored["properties"]  # kombu's Message() raises KeyError on it
        else:
            assert kind == "unknown-compression"  # kombu fails to decompress it
            stored["headers"]["compression"] = "application/x-unknown"
        self._put(consumer, stored)


class FilesystemCase(KombuCase):
    url = "filesystem://"

    def options(self) -> dict[str, Any]:
        tmp: Path = self.request.getfixturevalue("tmp_path")
        folder = tmp / "broker"
        folder.mkdir(exist_ok=True)
        return {
            "data_folder_in": str(folder),
            "data_folder_out": str(folder),
            "control_folder": str(tmp / "control"),
        }

    def put_stored(self, consumer: type[EventConsumer], kind: str) -> None:
        """A message file as the writer race of kombu's ``_put`` leaves it: created, then
        read before (or while) its content was written.  Named to sort first."""
        content = json.dumps(envelope(GOOD, "bad-1")).encode()
        raw = {"empty-file": b"", "truncated-file": content[: len(content) // 2]}[kind]
        folder = Path(self.options()["data_folder_in"])
        (folder / f"0_{uuid.uuid4()}.{consumer.queue_name()}.msg").write_bytes(raw)


class AmqpCase(TransportCase):
    """py-amqp straight to the consumer's queue through the test's own exchange on the
    shared RabbitMQ (deleted after the test by the ``rabbit`` fixture)."""

    def configure(self) -> None:
        self.request.getfixturevalue("broker")
        self.rabbit = self.request.getfixturevalue("rabbit")
        self.exchange = self.request.getfixturevalue("exchange_name")

    def prepare(self, consumer: type[EventConsumer]) -> None:
        self.rabbit.queues.extend(queue_names(consumer))
        declare_on_amqp_channel(self.rabbit.channel, full_topology(consumer.queue_specs()))

    def put_body(self, consumer: type[EventConsumer], body: bytes, message_id: str) -> None:
        message = amqp.Message(
            body, message_id=message_id, content_type="application/json", delivery_mode=2
        )
        self.rabbit.channel.basic_publish(
            message, exchange=self.exchange, routing_key="orders.created"
        )

    def left(self, consumer: type[EventConsumer]) -> int:
        return int(self.rabbit.count(consumer.queue_name()))


class DatabaseCase(TransportCase):
    """Rows straight into the database transport's queue table."""

    def configure(self) -> None:
        self._set(BROKER_URL="db://")

    def put_body(self, consumer: type[EventConsumer], body: bytes, message_id: str) -> None:
        QueuedMessage.objects.create(
            queue=consumer.queue_name(), message_id=message_id, topic="orders.created", body=body
        )

    def left(self, consumer: type[EventConsumer]) -> int:
        return QueuedMessage.objects.filter(queue=consumer.queue_name()).count()


CASES: dict[str, type[TransportCase]] = {
    "memory": MemoryCase,
    "filesystem": FilesystemCase,
    "amqp": AmqpCase,
    "db": DatabaseCase,
}
_AMQP = [pytest.mark.rabbitmq, pytest.mark.postgres]
MATRIX = [
    pytest.param("memory", "empty-body", NOT_JSON),
    pytest.param("memory", "truncated-body", NOT_JSON),
    pytest.param("memory", "deeply-nested-body", NOT_JSON),
    pytest.param("memory", "broken-envelope", UNDECODABLE),
    pytest.param("memory", "unknown-compression", UNDECODABLE),
    pytest.param("filesystem", "empty-body", NOT_JSON),
    pytest.param("filesystem", "truncated-body", NOT_JSON),
    pytest.param("filesystem", "empty-file", UNDECODABLE),
    pytest.param("filesystem", "truncated-file", UNDECODABLE),
    pytest.param("amqp", "empty-body", NOT_JSON, marks=_AMQP),
    pytest.param("amqp", "truncated-body", NOT_JSON, marks=_AMQP),
    pytest.param("amqp", "deeply-nested-body", NOT_JSON, marks=_AMQP),
    pytest.param("db", "empty-body", NOT_JSON),
    pytest.param("db", "truncated-body", NOT_JSON),
    pytest.param("db", "deeply-nested-body", NOT_JSON),
]


@pytest.mark.parametrize(("transport", "kind", "reason"), MATRIX)
def test_an_undecodable_message_is_dead_lettered_and_the_loop_goes_on(
    request, clean_registry, transport, kind, reason, caplog
):
    case = CASES[transport](request)
    case.configure()
    consumer = make_consumer(clean_registry)
    case.prepare(consumer)
    if kind in BODIES:
        case.put_body(consumer, BODIES[kind], "bad-1")
    else:
        case.put_stored(consumer, kind)
    case.put_body(consumer, GOOD, "good-1")

    stats = Worker([consumer]).run(until_idle=1.0)  # raises if the loop stopped

    assert [e.id for e in consumer.calls] == ["good-1"]
    assert applied(consumer, "good-1") == 1
    assert (stats.poison, stats.processed) == (1, 1)
    letter = DeadLetter.objects.get()
    assert (letter.consumer, letter.reason) == (consumer.name, reason)
    assert letter.error_message
    assert letter.payload is None
    if kind == "empty-body":
        assert letter.raw_body == ""
        assert letter.message_id == "bad-1"
    elif kind == "truncated-body":
        assert letter.raw_body == GOOD[:13].decode()
        assert letter.message_id == "bad-1"
    elif kind == "truncated-file":  # the bytes kombu read are kept for the operator
        assert letter.raw_body.startswith('{"body": ')
    elif kind == "unknown-compression":
        assert letter.message_id == "bad-1"
        assert "application/x-unknown" in letter.error_message
    # Nothing in it can be delivered again (an empty body is not a JSON null).
    assert retry_block_reason(letter) is not None
    assert case.left(consumer) == 0
    if reason == UNDECODABLE:  # a line an operator can find
        assert "could not decode" in caplog.text
