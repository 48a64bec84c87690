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

SPANS_ENV = "RE_TEST_OTEL_SPANS"


class SwitchableTracerProvider(trace.TracerProvider):
    """The SDK provider while a test records, the no-op tracer otherwise."""

    def __init__(self) -> None:
        self.active: TracerProvider | None = None

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        if self.active is None:
            return trace.NoOpTracer()
        return self.active.get_tracer(*args, **kwargs)


_switch = SwitchableTracerProvider()


@contextmanager
def recording() -> Iterator[InMemorySpanExporter]:
    """Spans made meanwhile in this process, in the SDK's in-memory exporter."""
    if trace.get_tracer_provider() is not _switch:
        trace.set_tracer_provider(_switch)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
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
    out = Path(directory, f"spans-{os.getpid()}.jsonl").open("a", encoding="utf-8")
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

    def __post_init__(self) -> None:
        self.by_id = {span.span_id: span for span in self.spans}

    def of(self, operation: str, message_id: str | None = None) -> list[Span]:
        return [
            s
            for s in self.spans
            if s.attributes.get("messaging.operation.type") == operation
            and (message_id is None or s.attributes.get("messaging.message.id") == message_id)
        ]

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
