"""Which span does a publish of the relay or the on-commit hook make? A ``send`` span per
batch (:func:`reliable_events.tracing.send_span`), around the wrapped publisher's."""

from __future__ import annotations

from collections.abc import Sequence

from reliable_events import tracing
from reliable_events.broker.base import OutgoingMessage, Publisher, PublisherWrapper, PublishResult


class TracedPublisher(PublisherWrapper):
    """A publisher whose every :meth:`publish` is a ``send`` span linked to the creation
    context of each message (everything else is the wrapped publisher's)."""

    def __init__(self, inner: Publisher, role: str) -> None:
        super().__init__(inner)
        self.role = role
        self.system = tracing.messaging_system(inner.url)

    def publish(
        self, messages: Sequence[OutgoingMessage], *, timeout: float, wait: bool = True
    ) -> PublishResult:
        with tracing.send_span(messages, self.role, self.system) as span:
            result = self.inner.publish(messages, timeout=timeout, wait=wait)
            tracing.sent(span, result)
        return result


def traced(publisher: Publisher, role: str) -> Publisher:
    """``publisher`` itself when tracing is off, else wrapped in :class:`TracedPublisher`."""
    if not tracing.enabled() or isinstance(publisher, TracedPublisher):
        return publisher
    return TracedPublisher(publisher, role)
