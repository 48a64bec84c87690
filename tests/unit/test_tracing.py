"""OpenTelemetry spans along an event's path, on ``memory://`` and ``db://`` (the SDK's
in-memory exporter in this process; RabbitMQ: ``tests/integration/test_observability_rabbitmq.py``).

Every ``process`` span must lead back (parent chain, same trace) to the span that was
current when ``publish_event`` ran: on the on-commit path, through the relay, through
retries and through dead-letter re-drives (retry and edit-and-retry).
"""

from __future__ import annotations

from typing import Any

import pytest
from django.db import transaction
from opentelemetry import baggage, context, trace
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, Sampler

from reliable_events import deadletters, publish_event, tracing
from reliable_events.broker.base import Delivery
from reliable_events.consumer import Event, EventConsumer
from reliable_events.consumer.base import HandlerResult, Outcome
from reliable_events.consuming import Worker
from reliable_events.exceptions import PermanentError
from reliable_events.models import DeadLetter, OutboxMessage
from reliable_events.relay import relay_once
from reliable_events.relay.traced import traced
from tests.support.consumer_support import make_consumer
from tests.support.otel_support import Span, TraceIndex, recording

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(params=["memory://", "db://"])
def url(request: Any, re_settings: Any) -> str:
    re_settings(BROKER_URL=request.param)
    return str(request.param)


def run_worker(consumer: type[EventConsumer], url: str, idle: float = 0.6) -> None:
    Worker([consumer], url=url).run(until_idle=idle)


def started(consumer: type[EventConsumer], url: str) -> None:
    worker = Worker([consumer], url=url)
    worker.transport.connect()  # declares its queues (memory://)
    worker.close()


def publish_in_request(name: str, **kwargs: Any) -> Span:
    """``publish_event`` inside a request span (and a committed transaction)."""
    tracer = trace.get_tracer("tests")
    with tracer.start_as_current_span(name) as span, transaction.atomic():
        publish_event("orders.created", {"n": 1}, **kwargs)
    return Span(
        name=name,
        kind="INTERNAL",
        trace_id=f"0x{span.get_span_context().trace_id:032x}",
        span_id=f"0x{span.get_span_context().span_id:016x}",
        parent_id=None,
        attributes={},
    )


def index(exporter: Any) -> TraceIndex:
    return TraceIndex([Span.from_sdk(s) for s in exporter.get_finished_spans()])


def test_publish_stores_the_callers_context_and_every_span_leads_back(clean_registry, url):
    consumer = make_consumer(clean_registry)
    started(consumer, url)
    with recording() as exporter:
        token = context.attach(baggage.set_baggage("tenant", "acme"))
        try:
            origin = publish_in_request("request", message_id="m-1", key="k1")
        finally:
            context.detach(token)
        row = OutboxMessage.objects.get(message_id="m-1")
        run_worker(consumer, url)
        spans = index(exporter)
    assert row.headers["traceparent"].split("-")[1] == origin.trace_id[2:]
    assert row.headers["baggage"] == "tenant=acme"
    [create] = spans.of("create", "m-1")
    assert create.parent_id == origin.span_id
    assert create.kind == "PRODUCER"
    [send] = spans.of("send", "m-1")
    assert send.attributes["reliable_events.publisher"] == "on-commit"
    assert create.span_id in send.links
    assert send.parent_id == origin.span_id  # the hook runs in the committing request
    [process] = spans.of("process", "m-1")
    assert process.kind == "CONSUMER"
    assert process.parent_id == create.span_id
    assert spans.leads_back(process, origin)
    assert process.attributes["reliable_events.outcome"] == "processed"
    assert consumer.calls[0].headers["baggage"] == "tenant=acme"


def test_the_relay_sends_a_batch_linked_to_each_creation_context(clean_registry, url, re_settings):
    re_settings(PUBLISH_ON_COMMIT=False)  # everything left to the relay (its sweep)
    consumer = make_consumer(clean_registry)
    started(consumer, url)
    with recording() as exporter:
        origins = [publish_in_request(f"request-{i}", message_id=f"m-{i}") for i in range(3)]
        assert relay_once().sent == 3
        run_worker(consumer, url)
        spans = index(exporter)
    [send] = spans.of("send")
    assert send.attributes["reliable_events.publisher"] == "relay"
    assert send.attributes["messaging.batch.message_count"] == 3
    assert send.parent_id is None
    creates = [spans.of("create", f"m-{i}")[0] for i in range(3)]
    assert sorted(send.links) == sorted(c.span_id for c in creates)
    for i, origin in enumerate(origins):
        [process] = spans.of("process", f"m-{i}")
        assert spans.leads_back(process, origin)


def test_retries_and_dead_letter_redrives_keep_the_original_trace(clean_registry, url):
    fixed: dict[str, bool] = {}

    def flaky(consumer: EventConsumer, event: Event) -> None:
        if event.attempt == 1 and event.id == "m-once":
            raise RuntimeError("transient")
        if not fixed.get("yes") and isinstance(event.payload, dict) and event.id != "m-once":
            raise PermanentError("bad payload")

    consumer = make_consumer(clean_registry, max_retries=2, retry_delays=[0], behaviour=flaky)
    started(consumer, url)
    with recording() as exporter:
        once = publish_in_request("request-once", message_id="m-once")
        retried = publish_in_request("request-retried", message_id="m-dead")
        edited = publish_in_request("request-edited", message_id="m-edit")
        run_worker(consumer, url, idle=1.5)
        letters = {letter.message_id: letter for letter in DeadLetter.objects.all()}
        assert set(letters) == {"m-dead", "m-edit"}
        fixed["yes"] = True
        deadletters.retry([letters["m-dead"]], user="t")
        result = deadletters.edit_and_retry(letters["m-edit"], {"n": 2}, user="t")
        run_worker(consumer, url, idle=1.0)
        spans = index(exporter)
    copy_id = result.copies[letters["m-edit"].pk]

    outcomes = [p.attributes["reliable_events.outcome"] for p in spans.of("process", "m-once")]
    assert outcomes == ["retried", "processed"]
    for p in spans.of("process", "m-once"):
        assert spans.leads_back(p, once)
    dead_outcomes = [p.attributes["reliable_events.outcome"] for p in spans.of("process", "m-dead")]
    assert dead_outcomes == ["dead-lettered", "processed"]
    for p in spans.of("process", "m-dead"):
        assert spans.leads_back(p, retried)
    [copy] = spans.of("process", copy_id)
    assert copy.attributes["reliable_events.outcome"] == "processed"
    assert spans.leads_back(copy, edited)


def test_an_idempotent_publish_under_another_trace_is_the_same_event(clean_registry, url):
    with recording():
        first = publish_in_request("a", message_id="m-1", headers={"tenant": "a"})
        publish_in_request("b", message_id="m-1", headers={"tenant": "a"})
    row = OutboxMessage.objects.get(message_id="m-1")
    assert row.headers["traceparent"].split("-")[1] == first.trace_id[2:]


def test_a_callers_own_traceparent_is_kept():
    given = {"traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"}
    with recording():
        assert tracing.stamp(given, topic="t", message_id="m") is given


def test_tracing_off_stores_no_context_and_makes_no_span(clean_registry, url, re_settings):
    re_settings(TRACING=False)
    consumer = make_consumer(clean_registry)
    started(consumer, url)
    with recording() as exporter:
        publish_in_request("request", message_id="m-1")
        run_worker(consumer, url)
        names = [s.name for s in exporter.get_finished_spans()]
    assert names == ["request"]
    assert "traceparent" not in OutboxMessage.objects.get(message_id="m-1").headers
    assert consumer.calls


def test_a_batch_transaction_makes_one_process_span_per_event(clean_registry, url, monkeypatch):
    consumer = make_consumer(clean_registry)
    consumer.batch_size = 10
    started(consumer, url)
    batches: list[int] = []
    through = tracing.batch_processed

    def counted(batch: Any, results: Any) -> None:
        batches.append(len(results))
        through(batch, results)

    monkeypatch.setattr(tracing, "batch_processed", counted)
    with recording() as exporter:
        origins = [publish_in_request(f"request-{i}", message_id=f"m-{i}") for i in range(4)]
        run_worker(consumer, url)
        spans = index(exporter)
    assert len(consumer.calls) == 4
    assert sum(batches) == 4  # all four settled in batch transactions
    for i, origin in enumerate(origins):
        [process] = spans.of("process", f"m-{i}")
        assert process.attributes["reliable_events.outcome"] == "processed"
        assert spans.leads_back(process, origin)


#: The messaging conventions' attributes "important for making sampling decisions", which
#: "SHOULD be provided at span creation time" (those this library knows of a delivery).
SAMPLING_ATTRIBUTES = {
    "messaging.system",
    "messaging.operation.type",
    "messaging.operation.name",
    "messaging.destination.name",
    "messaging.destination.subscription.name",
}


class SeenBySampler(Sampler):
    """The SDK's default sampler, noting the name and attributes of each span it decides."""

    def __init__(self) -> None:
        self.inner = ParentBased(ALWAYS_ON)
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def should_sample(
        self, parent_context: Any, trace_id: int, name: str, *args: Any, **kwargs: Any
    ) -> Any:
        attributes = kwargs.get("attributes", args[1] if len(args) > 1 else None)
        self.seen.append((name, dict(attributes or {})))
        return self.inner.should_sample(parent_context, trace_id, name, *args, **kwargs)

    def get_description(self) -> str:
        return "SeenBySampler"


def test_a_process_span_starts_with_the_attributes_a_sampler_decides_on(clean_registry, url):
    def fails_once(consumer: EventConsumer, event: Event) -> None:
        if event.id == "m-1" and event.attempt == 1:
            raise RuntimeError("transient")

    consumer = make_consumer(clean_registry, retry_delays=[0], behaviour=fails_once)
    consumer.batch_size = 10
    started(consumer, url)
    sampler = SeenBySampler()
    with recording(sampler) as exporter:
        for i in range(3):
            publish_in_request(f"request-{i}", message_id=f"m-{i}")
        run_worker(consumer, url, idle=1.0)
        finished = [s for s in exporter.get_finished_spans() if s.name.startswith("process ")]
    decided = [attributes for name, attributes in sampler.seen if name.startswith("process ")]
    outcomes = sorted(str((s.attributes or {})[tracing.OUTCOME]) for s in finished)
    assert outcomes == ["processed", "processed", "processed", "retried"]
    assert len(decided) == len(finished)
    for attributes in decided:
        assert set(attributes) >= SAMPLING_ATTRIBUTES, attributes
        assert attributes["messaging.destination.subscription.name"] == consumer.name
        assert attributes["messaging.operation.type"] == "process"


def test_a_duplicates_span_starts_with_the_attributes_a_sampler_decides_on():
    delivery = Delivery(
        consumer="c",
        body=b"{}",
        properties={"message_id": "m-1"},
        headers={},
        exchange="events",
        routing_key="orders.created",
    )
    event = Event(id="m-1", topic="orders.created", key=None, payload={})
    sampler = SeenBySampler()
    with recording(sampler) as exporter:
        tracing.batch_processed([(delivery, event)], [HandlerResult(Outcome.DUPLICATE, 0.001)])
        [span] = exporter.get_finished_spans()
    [(name, attributes)] = sampler.seen
    assert name == "process c"
    assert attributes["messaging.destination.name"] == "events"
    assert set(attributes) >= SAMPLING_ATTRIBUTES
    assert (span.attributes or {})[tracing.OUTCOME] == "duplicate"


def test_without_opentelemetry_the_hooks_hand_back_their_input(monkeypatch):
    monkeypatch.setattr(tracing, "AVAILABLE", False)
    headers = {"tenant": "a"}
    publisher: Any = object()
    with recording():
        assert tracing.stamp(headers, topic="t", message_id="m") is headers
        assert traced(publisher, "relay") is publisher
        assert not tracing.enabled()


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"},
        {"traceparent": " \t00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01 "},
        {"traceparent": "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-later"},
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra"},
        {"traceparent": "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        {"traceparent": "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01"},
        {"traceparent": "00-00000000000000000000000000000000-b7ad6b7169203331-01"},
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01"},
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331"},
        {"traceparent": ""},
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01" + "-" * 600},
        {
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "tracestate": "vendor=value",
        },
        {
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "baggage": "tenant=acme",
        },
        {"baggage": "tenant=acme", "x-event-key": "k1"},
    ],
)
def test_the_carried_context_is_what_the_global_propagator_extracts(headers):
    from opentelemetry import propagate

    ours, theirs = tracing.carried_context(headers), propagate.extract(headers)
    assert trace.get_current_span(ours).get_span_context() == (
        trace.get_current_span(theirs).get_span_context()
    )
    assert baggage.get_all(ours) == baggage.get_all(theirs)


def test_an_oversized_baggage_is_not_stored_but_the_trace_context_is(re_settings):
    re_settings(PUBLISH_ON_COMMIT=False)
    with recording():
        token = context.attach(baggage.set_baggage("blob", "x" * tracing.MAX_TRACE_HEADER))
        try:
            publish_in_request("request", message_id="m-big")
        finally:
            context.detach(token)
    headers = OutboxMessage.objects.get(message_id="m-big").headers
    assert "baggage" not in headers
    assert tracing.creation_context(headers) is not None


@pytest.mark.parametrize(
    "value",
    [
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # forbidden version
        "00-4bf92f3577b34da6a3ce929d0e0e473z-00f067aa0ba902b7-01",  # not hex
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # invalid trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # invalid span id
        "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",  # not dash-separated
    ],
)
def test_a_malformed_traceparent_gives_no_creation_context(value):
    assert tracing.creation_context({"traceparent": value}) is None


def test_a_wellformed_traceparent_gives_its_creation_context():
    found = tracing.creation_context(
        {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    )
    assert (found.trace_id, found.span_id, found.is_remote) == (
        0x4BF92F3577B34DA6A3CE929D0E0E4736,
        0x00F067AA0BA902B7,
        True,
    )
