"""OpenTelemetry in the tests: the SDK's in-memory exporter in this process, a span file
per child process (read back by the ledger tests), and the trace checks.

In this process a switchable provider is installed once: it hands out the SDK's tracer
only while a test records (:func:`recording`), the no-op tracer otherwise, so other
tests' events carry no trace context.  Child processes started with
``RE_TEST_OTEL_SPANS=<dir>`` export every span as it ends, one JSON line each, to
``<dir>/spans-<pid>.jsonl`` (the SDK's ``ConsoleSpanExporter`` writing to a file through
``SimpleSpanProcessor``: a span is in the file, flushed, before the code after it runs,
so a SIGKILL loses no ended span).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Sampler

SPANS_ENV = "RE_TEST_OTEL_SPANS"


class SwitchableTracerProvider(trace.TracerProvider):
    """The SDK provider while a test records, the no-op tracer otherwise (decided at
    each span: the library keeps its tracer)."""

    def __init__(self) -> None:
        self.active: TracerProvider | None = None

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return _SwitchTracer(self, args, kwargs)


class _SwitchTracer(trace.Tracer):
    def __init__(self, switch: SwitchableTracerProvider, args: Any, kwargs: Any) -> None:
        self.switch, self.args, self.kwargs = switch, args, kwargs

    def _target(self) -> trace.Tracer:
        if self.switch.active is None:
            return trace.NoOpTracer()
        return self.switch.active.get_tracer(*self.args, **self.kwargs)

    def start_span(self, *args: Any, **kwargs: Any) -> trace.Span:
        return self._target().start_span(*args, **kwargs)

    def start_as_current_span(self, *args: Any, **kwargs: Any) -> Any:
        return self._target().start_as_current_span(*args, **kwargs)


_switch = SwitchableTracerProvider()


@contextmanager
def recording(sampler: Sampler | None = None) -> Iterator[InMemorySpanExporter]:
    """Spans made meanwhile in this process, in the SDK's in-memory exporter (``sampler``:
    the provider's, else the SDK's default)."""
    if trace.get_tracer_provider() is not _switch:
        trace.set_tracer_provider(_switch)
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _switch.active = provider
    try:
        yield exporter
    finally:
        _switch.active = None
        provider.shutdown()


def _line(span: ReadableSpan) -> str:
    return json.dumps(json.loads(span.to_json(indent=None)), separators=(",", ":")) + "\n"


def install_span_file(directory: str) -> None:
    """Export every span of this process to ``<directory>/spans-<pid>.jsonl`` (children)."""
    # Open for the life of the process (its provider writes to it until exit or SIGKILL).
    out = Path(directory, f"spans-{os.getpid()}.jsonl").open("a", encoding="utf-8")  # noqa: SIM115
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=out, formatter=_line)))
    trace.set_tracer_provider(provider)


# -- reading and checking ------------------------------------------------------------------
@dataclass
class Span:
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_id: str | None
    attributes: dict[str, Any]
    links: list[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Span:
        return cls(
            name=data["name"],
            kind=data["kind"].rsplit(".", 1)[-1],
            trace_id=data["context"]["trace_id"],
            span_id=data["context"]["span_id"],
            parent_id=data.get("parent_id"),
            attributes=data.get("attributes") or {},
            links=[link["context"]["span_id"] for link in data.get("links") or []],
        )

    @classmethod
    def from_sdk(cls, span: ReadableSpan) -> Span:
        return cls.from_json(json.loads(span.to_json(indent=None)))


def read_span_files(directory: Path) -> list[Span]:
    """Every complete span line of the children's files (a killed child may have left
    half a line)."""
    spans: list[Span] = []
    for path in sorted(directory.glob("spans-*.jsonl")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                spans.append(Span.from_json(json.loads(line)))
            except (ValueError, KeyError):
                continue
    return spans


@dataclass
class TraceIndex:
    """The spans of a run, by id and by message id."""

    spans: list[Span]
    by_id: dict[str, Span] = field(default_factory=dict)
    by_message: dict[tuple[str, str], list[Span]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_id = {span.span_id: span for span in self.spans}
        for span in self.spans:
            operation = str(span.attributes.get("messaging.operation.type", ""))
            message_id = str(span.attributes.get("messaging.message.id", ""))
            self.by_message.setdefault((operation, message_id), []).append(span)

    def of(self, operation: str, message_id: str | None = None) -> list[Span]:
        if message_id is not None:
            return self.by_message.get((operation, message_id), [])
        return [s for s in self.spans if s.attributes.get("messaging.operation.type") == operation]

    def ancestors(self, span: Span) -> list[Span]:
        chain: list[Span] = []
        parent = span.parent_id
        while parent is not None and parent in self.by_id and len(chain) < 50:
            chain.append(self.by_id[parent])
            parent = chain[-1].parent_id
        return chain

    def leads_back(self, span: Span, origin: Span) -> bool:
        """``span`` is in ``origin``'s trace, with ``origin`` among its ancestors."""
        return span.trace_id == origin.trace_id and any(
            a.span_id == origin.span_id for a in self.ancestors(span)
        )


# -- the ledger's trace check ----------------------------------------------------------------
PRODUCE_SPAN = "ledger.produce"
PRODUCE_ID = "ledger.message_id"


def check_ledger_traces(
    spans: list[Span],
    effects: dict[str, dict[str, Any]],
    *,
    copies: dict[str, str],
    swept: set[str],
    exported_before_commit: bool,
) -> tuple[dict[str, int], list[str]]:
    """Every applied event (``effects``: message id -> the span its handler recorded)
    has a ``process`` span that leads back (parent chain, same trace) to the
    ``ledger.produce`` span current when ``publish_event`` ran; ``copies`` maps edited
    re-drives to the original id, ``swept`` lists ids only the relay could send.

    ``exported_before_commit`` (``db://``: the delivery commits after its span ended):
    the very span the effect recorded is exported with outcome ``processed``.  Elsewhere
    the handler commits before its span ends: a kill in between leaves the effect without
    that span, and the redelivery's ``duplicate`` span (same trace) must then be there.
    Returns figures and the failures (empty: proven)."""
    index = TraceIndex(spans)
    origins: dict[str, list[Span]] = {}
    for span in spans:
        if span.name == PRODUCE_SPAN:
            origins.setdefault(str(span.attributes.get(PRODUCE_ID)), []).append(span)
    failures: list[str] = []
    figures = {"applied": len(effects), "spans": len(spans), "by_duplicate_only": 0}
    for message_id, recorded in effects.items():
        produced = origins.get(copies.get(message_id, message_id), [])
        if not produced:
            failures.append(f"{message_id}: no {PRODUCE_SPAN} span")
            continue
        if recorded.get("trace_id") not in {o.trace_id for o in produced}:
            failures.append(f"{message_id}: its handler ran outside the producer's trace")
        leading = [
            p
            for p in index.of("process", message_id)
            if any(index.leads_back(p, origin) for origin in produced)
        ]
        outcomes = {p.span_id: p.attributes.get(OUTCOME_ATTRIBUTE) for p in leading}
        if outcomes.get(recorded.get("span_id", "")) == "processed":
            continue
        if not exported_before_commit and "duplicate" in outcomes.values():
            figures["by_duplicate_only"] += 1
            continue
        failures.append(
            f"{message_id}: no process span leading back ({sorted(map(str, outcomes.values()))})"
        )
    relay_links = {
        link
        for send in index.of("send")
        if send.attributes.get("reliable_events.publisher") == "relay"
        for link in send.links
    }
    figures["swept"] = 0
    for message_id in swept:
        creates = {c.span_id for c in index.of("create", message_id)}
        if creates & relay_links:
            figures["swept"] += 1
        else:
            failures.append(f"{message_id}: no relay send span linked to its creation")
    figures["redriven"] = sum(1 for m in copies if m in effects)
    return figures, failures


OUTCOME_ATTRIBUTE = "reliable_events.outcome"
