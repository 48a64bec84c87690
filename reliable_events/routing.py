"""Routing without a broker: which consumer queues an event's topic is bound to.

The database transport (:mod:`reliable_events.broker.database`) routes events itself,
with the semantics of a RabbitMQ topic exchange: each registered consumer's queue is
bound to its ``topics``; ``*`` matches exactly one dot-separated word, ``#`` zero or more.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

from reliable_events.broker import OutgoingMessage
from reliable_events.conf import app_settings
from reliable_events.consumer import EventConsumer, registry
from reliable_events.topology import UNROUTED_SUFFIX


@lru_cache(maxsize=4096)
def binding_matches(binding: str, routing_key: str) -> bool:
    """AMQP topic-exchange matching: ``*`` is one word, ``#`` zero or more words."""
    return _match(tuple(binding.split(".")), tuple(routing_key.split(".")))


def _match(pattern: tuple[str, ...], words: tuple[str, ...]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_match(rest, words[i:]) for i in range(len(words) + 1))
    return bool(words) and head in ("*", words[0]) and _match(rest, words[1:])


class Routes:
    """The bindings of the registered consumers' queues on the events exchange."""

    def __init__(self, consumers: Iterable[type[EventConsumer]], exchange: str) -> None:
        self.exchange = exchange
        self.bindings = [(cls.queue_name(), tuple(cls.topics)) for cls in consumers]
        self.queues = frozenset(name for name, _ in self.bindings)
        self._memo: dict[str, list[str]] = {}

    @classmethod
    def current(cls) -> Routes:
        return cls(registry.all(), str(app_settings.EXCHANGE))

    def for_topic(self, topic: str) -> list[str]:
        """Every queue bound to ``topic`` (each once)."""
        queues = self._memo.get(topic)
        if queues is None:
            queues = self._memo[topic] = [
                name
                for name, topics in self.bindings
                if any(binding_matches(binding, topic) for binding in topics)
            ]
        return queues

    def targets(self, message: OutgoingMessage) -> tuple[list[str], bool]:
        """(queues, unrouted) of ``message``; ``([], False)``: addressed to an unknown queue."""
        if not message.exchange:  # addressed to one queue (a dead-letter retry)
            known = message.routing_key in self.queues
            return ([message.routing_key] if known else []), False
        if message.exchange == self.exchange:
            queues = self.for_topic(message.routing_key)
            if queues:
                return queues, False
        return [f"{message.exchange}{UNROUTED_SUFFIX}"], True
