"""Which trace does an event belong to? OpenTelemetry spans along an event's path.

Optional: everything here is a no-op unless ``opentelemetry-api`` is importable (the
``otel`` extra; the SDK and its exporters are the application's choice) and the
``TRACING`` setting is on (the default).  The import is tried once; without it the hooks
return their input unchanged (``traced_process`` returns the method itself).

* ``publish_event`` (:func:`stamp`): a ``create`` span, child of the span current in the
  caller, whose W3C context (``traceparent``, ``tracestate`` and the caller's ``baggage``)
  is stored in the row's ``headers``: captured when the row is written, not when it is
  sent.  The headers travel with the event everywhere (AMQP headers, ``db://`` and
  ``memory://`` messages, delay-queue and outbox retries, dead letters and their retry or
  edited copy), so every later span finds the creation context there.
* The relay and the on-commit hook (:class:`reliable_events.relay.traced.TracedPublisher`):
  one ``send`` span per batch, *linked* to each message's creation context
  (:func:`creation_context`; not its child: a batch has many), up to :data:`MAX_LINKS`
  links.
* The consumer (:func:`traced_process`, :func:`batch_processed`): one ``process`` span per
  delivery, child of the carried creation context, with the outcome
  (``reliable_events.outcome``: processed, duplicate, retried, dead-lettered, poison).

Attribute names follow the OpenTelemetry messaging semantic conventions.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from reliable_events.conf import app_settings

try:  # the optional ``otel`` extra: tried once, at import
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.baggage.propagation import W3CBaggagePropagator
    from opentelemetry.context import Context
    from opentelemetry.propagators.composite import CompositePropagator
    from opentelemetry.trace import (
        Link,
        NonRecordingSpan,
        SpanContext,
        SpanKind,
        Status,
        StatusCode,
        TraceFlags,
    )
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    AVAILABLE = True
except ImportError:  # pragma: no cover - the dev requirements install it
    AVAILABLE = False

if TYPE_CHECKING:
    from reliable_events.broker.base import Delivery, OutgoingMessage, PublishResult
    from reliable_events.consumer.base import Event, HandlerResult, Outcome

#: The W3C headers (trace context and baggage) an event carries.
TRACE_HEADERS = ("traceparent", "tracestate", "baggage")
#: Longest trace header kept (W3C baggage is at most 8,192 bytes).
MAX_TRACE_HEADER = 8192
OUTCOME = "reliable_events.outcome"
#: Most links one ``send`` span carries: OpenTelemetry's default span link limit
#: (``OTEL_SPAN_LINK_COUNT_LIMIT``); the SDK would drop the rest anyway, after paying for
#: them (a relay batch has up to ``RELAY_BATCH_SIZE`` messages).
MAX_LINKS = 128
TRACER_NAME = "reliable_events"


def enabled() -> bool:
    """Whether spans are made: ``opentelemetry-api`` importable and ``TRACING`` on."""
    return AVAILABLE and bool(app_settings.TRACING)


_cached: list[Any] = [None, None]


def tracer() -> Any:
    """The library's tracer of the current global provider (``get_tracer`` builds a new
    tracer on each call in the SDK, about the cost of a span: kept per provider)."""
    provider = trace.get_tracer_provider()
    if _cached[0] is not provider:
        _cached[1] = provider.get_tracer(TRACER_NAME)
        _cached[0] = provider
    return _cached[1]


def messaging_system(url: str) -> str:
    """``messaging.system`` of a broker URL."""
    return "rabbitmq" if url.startswith("amqp") else "reliable_events"


# -- publish_event -------------------------------------------------------------------------
def stamp(headers: dict[str, str], *, topic: str, message_id: str) -> dict[str, str]:
    """The headers of a new outbox row with the creation context added (a ``create`` span,
    child of the caller's current span, started and ended here).  Headers that already
    carry a ``traceparent`` (the caller propagates explicitly) are kept as they are."""
    if not AVAILABLE or not app_settings.TRACING or "traceparent" in headers:
        return headers
    exchange = str(app_settings.EXCHANGE)
    span = tracer().start_span(
        f"create {exchange}",
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.system": messaging_system(str(app_settings.BROKER_URL)),
            "messaging.operation.type": "create",
            "messaging.operation.name": "create",
            "messaging.destination.name": exchange,
            "messaging.rabbitmq.destination.routing_key": topic,
            "messaging.message.id": message_id,
        },
    )
    carrier = dict(headers)
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    span.end()
    for name in TRACE_HEADERS:
        if len(carrier.get(name, "")) > MAX_TRACE_HEADER:
            del carrier[name]
    return carrier


def without_context(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """``headers`` minus the trace headers (two publishes of one idempotent event differ
    only there)."""
    return {k: v for k, v in (headers or {}).items() if k not in TRACE_HEADERS}


# -- the relay and the on-commit hook -----------------------------------------------------------
def creation_context(headers: Mapping[str, Any]) -> Any:
    """The span context in a ``traceparent`` header, or ``None`` (parsed directly: the
    relay links every message of a batch)."""
    value = headers.get("traceparent")
    if not isinstance(value, str) or len(value) < 55:
        return None
    parts = value.split("-")
    if len(parts) < 4 or parts[0] == "ff":
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3][:2], 16)
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags))


def send_span(messages: Sequence[OutgoingMessage], role: str, system: str) -> Any:
    """The ``send`` span of one publish of ``messages`` (a context manager: current while
    it is open), linked to the creation context of each message, up to :data:`MAX_LINKS`."""
    links = []
    for message in messages:
        context = creation_context(message.headers)
        if context is not None:
            links.append(Link(context))
            if len(links) >= MAX_LINKS:
                break
    first = messages[0] if messages else None
    destination = (first.exchange or first.routing_key) if first else ""
    attributes: dict[str, Any] = {
        "messaging.system": system,
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.destination.name": destination,
        "reliable_events.publisher": role,
    }
    if len(messages) == 1 and first is not None:
        attributes["messaging.message.id"] = first.message_id
    else:
        attributes["messaging.batch.message_count"] = len(messages)
    return tracer().start_as_current_span(
        f"send {destination}", kind=SpanKind.CLIENT, links=links, attributes=attributes
    )


def sent(span: Any, result: PublishResult) -> None:
    """What the broker confirmed of a ``send`` span's messages (an error status when not
    all of them)."""
    if result.failed or result.interrupted:
        span.set_status(Status(StatusCode.ERROR, result.broker_error or "not confirmed"))
    span.set_attribute("reliable_events.confirmed", len(result.confirmed))


# -- the consumer ---------------------------------------------------------------------------
#: W3C ``traceparent`` as OpenTelemetry's own ``TraceContextTextMapPropagator`` reads it.
_TRACEPARENT_RE = re.compile(
    r"^[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:(-.*)|[ \t]*)$"
)
_TRACEPARENT_MAX = 512
#: The global propagator last looked at, and whether it is OpenTelemetry's default.
_default_textmap: list[Any] = [None, False]


def _is_default_textmap(textmap: Any) -> bool:
    """Whether ``textmap`` is OpenTelemetry's default propagator (W3C trace context, then
    W3C baggage), decided once per propagator object."""
    if _default_textmap[0] is not textmap:
        parts = getattr(textmap, "_propagators", None)
        _default_textmap[1] = (
            type(textmap) is CompositePropagator
            and isinstance(parts, list | tuple)
            and [type(part) for part in parts]
            == [TraceContextTextMapPropagator, W3CBaggagePropagator]
        )
        _default_textmap[0] = textmap
    return bool(_default_textmap[1])


def carried_context(headers: Mapping[str, Any]) -> Any:
    """The context carried in ``headers``: what ``propagate.extract(headers)`` returns.

    With the default propagator and a message carrying a ``traceparent`` alone (what
    :func:`stamp` stores without baggage or trace state), the header is read here, the
    way the W3C propagator reads it, without the propagators' generic getter; anything
    else goes through ``propagate.extract``.
    """
    textmap = propagate.get_global_textmap()
    if "tracestate" in headers or "baggage" in headers or not _is_default_textmap(textmap):
        return textmap.extract(headers)
    value = headers.get("traceparent")
    if value is None:
        return Context()
    if not isinstance(value, str) or len(value) > _TRACEPARENT_MAX:
        return textmap.extract(headers)  # its own handling (and warning)
    match = _TRACEPARENT_RE.match(value)
    if match is None:
        return Context()
    version, trace_id, span_id, flags, rest = match.groups()
    if trace_id == "0" * 32 or span_id == "0" * 16 or version == "ff" or (version == "00" and rest):
        return Context()
    parent = SpanContext(
        int(trace_id, 16), int(span_id, 16), is_remote=True, trace_flags=TraceFlags(int(flags, 16))
    )
    return trace.set_span_in_context(NonRecordingSpan(parent), Context())


def _process_attributes(delivery: Delivery, system: str) -> dict[str, Any]:
    """The attributes of a delivery's ``process`` span.  All are known before it starts:
    they are given to ``start_span``, where a sampler sees them (the messaging
    conventions' "SHOULD be provided at span creation time"); only the outcome is set
    later."""
    attributes = _known_attributes(delivery.consumer, delivery.message_id, system)
    attributes["messaging.destination.name"] = delivery.exchange or delivery.routing_key
    attributes["messaging.rabbitmq.destination.routing_key"] = delivery.routing_key
    return attributes


def _known_attributes(consumer: str, message_id: str, system: str) -> dict[str, Any]:
    """What a ``process`` span's attributes are without the delivery: all an event tells
    (a batch given to ``process_batch`` by other code than the worker)."""
    return {
        "messaging.system": system,
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.subscription.name": consumer,
        "messaging.message.id": message_id,
    }


def _settle_span(span: Any, outcome: Outcome, result: HandlerResult | None) -> None:
    span.set_attribute(OUTCOME, outcome.value)
    if result is not None and result.error is not None:
        span.record_exception(result.error)
        span.set_status(Status(StatusCode.ERROR, type(result.error).__name__))


Method = Callable[[Any, "Delivery"], "tuple[Outcome, HandlerResult | None]"]


def traced_process(method: Method) -> Method:
    """Decorates ``Processor.process``: a ``process`` span per delivery, child of the
    carried creation context, current while the handler runs, with the outcome."""
    if not AVAILABLE:  # pragma: no cover - the dev requirements install it
        return method

    @functools.wraps(method)
    def process(self: Any, delivery: Delivery) -> tuple[Outcome, HandlerResult | None]:
        if not app_settings.TRACING:
            return method(self, delivery)
        with tracer().start_as_current_span(
            f"process {delivery.consumer}",
            context=carried_context(delivery.headers),
            kind=SpanKind.CONSUMER,
            attributes=_process_attributes(
                delivery, messaging_system(str(app_settings.BROKER_URL))
            ),
        ) as span:
            outcome, result = method(self, delivery)
            _settle_span(span, outcome, result)
            return outcome, result

    return process


class HandlerSpans:
    """The ``process`` spans of the handlers of one batch transaction: :meth:`enter`
    starts one, child of the event's carried context, with its attributes, and makes it
    current while ``handle`` runs; :meth:`leave` makes the previous context current
    again and leaves the span open: :func:`batch_processed` (or :func:`traced_failure`)
    ends it with the outcome once the batch committed."""

    __slots__ = ("consumer", "deliveries", "name", "system", "tracer")

    def __init__(self, consumer: str, deliveries: Mapping[str, Delivery]) -> None:
        self.tracer = tracer()
        self.consumer = consumer
        self.name = f"process {consumer}"
        #: The batch's deliveries by event id, whose attributes the spans start with.
        self.deliveries = deliveries
        self.system = messaging_system(str(app_settings.BROKER_URL))

    def enter(self, event: Event) -> tuple[Any, Any]:
        """The span and the token of the context it is current in."""
        delivery = self.deliveries.get(event.id)
        span = self.tracer.start_span(
            self.name,
            context=carried_context(event.headers),
            kind=SpanKind.CONSUMER,
            attributes=(
                _known_attributes(self.consumer, event.id, self.system)
                if delivery is None
                else _process_attributes(delivery, self.system)
            ),
        )
        return span, otel_context.attach(trace.set_span_in_context(span))

    @staticmethod
    def leave(span: Any, token: Any, error: Exception | None = None) -> None:
        """Leave the span's context; ``error``: what escaped the handler's savepoint (the
        batch is lost), recorded on the span as ``trace.use_span`` would."""
        otel_context.detach(token)
        if error is not None and span.is_recording():
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))


def handler_spans(
    consumer: str, batch: Sequence[tuple[Delivery, Event]] = ()
) -> HandlerSpans | None:
    """The handler spans of one batch of ``consumer`` (``batch``: its deliveries, whose
    attributes the spans start with), or ``None`` when tracing is off."""
    if not enabled():
        return None
    return HandlerSpans(consumer, {event.id: delivery for delivery, event in batch})


def batch_processed(
    batch: Sequence[tuple[Delivery, Event]], results: Sequence[HandlerResult]
) -> None:
    """The ``process`` spans of the handlers of a committed batch that did not fail: the
    span :meth:`HandlerSpans.enter` opened, or (a duplicate) one timed by its result; one
    that failed is ended by :func:`traced_failure`."""
    if not enabled() or not results:
        return
    spans = tracer()
    system = messaging_system(str(app_settings.BROKER_URL))
    now = time.time_ns()
    for (delivery, _event), result in zip(batch, results, strict=False):
        span = result.span
        if span is None:
            span = spans.start_span(
                f"process {delivery.consumer}",
                context=carried_context(delivery.headers),
                kind=SpanKind.CONSUMER,
                attributes=_process_attributes(delivery, system),
                start_time=now - int(result.seconds * 1e9),
            )
            end_time: int | None = now
        else:
            end_time = None
        if span.is_recording():
            span.set_attribute(OUTCOME, result.outcome.value)
            if result.error is not None:
                span.record_exception(result.error)
                span.set_status(Status(StatusCode.ERROR, type(result.error).__name__))
        span.end(end_time=end_time)


Work = Callable[[], "tuple[Outcome, HandlerResult | None]"]


def traced_failure(delivery: Delivery, work: Work, span: Any = None) -> Work:
    """``work`` (the retry or dead letter of a handler that failed in a batch) inside the
    delivery's ``process`` span (``span``, opened by :meth:`HandlerSpans.enter`, or a
    new one), which ends with the final outcome."""
    if not enabled():
        return work

    def settle() -> tuple[Outcome, HandlerResult | None]:
        current = span or tracer().start_span(
            f"process {delivery.consumer}",
            context=carried_context(delivery.headers),
            kind=SpanKind.CONSUMER,
            attributes=_process_attributes(
                delivery, messaging_system(str(app_settings.BROKER_URL))
            ),
        )
        with trace.use_span(current, end_on_exit=True):
            outcome, result = work()
            _settle_span(current, outcome, result)
            return outcome, result

    return settle
