"""A running consumer verifies its broker topology: on every (re)connect and every
``TOPOLOGY_CHECK_SECONDS``.

Why periodically: deleting the events exchange (management UI, ``exchange_delete``)
closes nothing for a consumer.  Its queue survives, unbound; the relay's next publish
fails (``NOT_FOUND``), its reconnect re-declares the exchange, and from then on every
event is confirmed into ``<EXCHANGE>.unrouted``.  Only a check that keeps running heals
that without a restart.

One check, on a side channel of the consumer's own connection (the consuming channel
is never touched, so a ``NOT_FOUND`` cannot close it):

1. passive declares of the exchange, its alternate exchange, the unrouted queue and
   this worker's queues and delay queues: what is missing is named in a warning;
2. idempotent declares and binds of all of it (a lost *binding* cannot be seen over
   AMQP 0-9-1, so every binding is simply bound again);
3. the queues of registered consumers this worker does not run are bound again when
   they exist (so that a consumer that is down does not miss events), but never
   created here (``declare_topology`` creates them);
4. the unrouted queue is counted; when it holds messages, their topics are sampled
   (:func:`reliable_events.unrouted.sample_topics`) and a warning names them, saying
   which of them this worker's consumers subscribe to (their binding was missing:
   ``republish_unrouted`` delivers them now).

A check costs a few round trips per queue; nothing is logged while all is well.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from reliable_events.conf import app_settings
from reliable_events.consumer import EventConsumer, registry
from reliable_events.exceptions import BrokerError
from reliable_events.topology import declare_on_amqp_channel, full_topology, unrouted_name
from reliable_events.unrouted import describe_topics, queue_depth, sample_topics, topic_matches

logger = logging.getLogger(__name__)


@dataclass
class CheckResult:
    """What one check found (all empty: nothing was wrong)."""

    missing: list[str] = field(default_factory=list)
    rebound: list[str] = field(default_factory=list)
    unrouted: int = 0
    topics: Counter[str] = field(default_factory=Counter)
    #: Sampled unrouted topics one of this worker's consumers subscribes to.
    ours: dict[str, list[str]] = field(default_factory=dict)


class TopologyCheck:
    """Verifies the topology of ``consumers`` on a py-amqp connection when due."""

    def __init__(self, consumers: Sequence[type[EventConsumer]]) -> None:
        self.consumers = list(consumers)
        self._next = 0.0
        self._checks = 0
        #: The unrouted depth when its topics were last sampled (sample again on change).
        self._sampled_at: int | None = None
        self._topics: Counter[str] = Counter()
        self._refusals: set[str] = set()
        #: Queues found missing and declared again: name -> (when, on the first check).
        #: On a later check a missing queue was deleted while this worker ran; on the
        #: first it may be a first deployment (the worker asks its heartbeats).
        self.recreated: dict[str, tuple[datetime, bool]] = {}

    def due(self) -> bool:
        return time.monotonic() >= self._next

    def run(self, connection: Any) -> CheckResult:
        """Check, repair and report; raises the broker's errors (a ``PRECONDITION_FAILED``
        for a queue declared with other arguments, a lost connection)."""
        import amqp

        self._next = time.monotonic() + max(0.0, float(app_settings.TOPOLOGY_CHECK_SECONDS))
        first = self._checks == 0
        self._checks += 1
        result = CheckResult()
        side = _Side(connection)
        try:
            topology = full_topology(
                [spec for cls in self.consumers for spec in cls.queue_specs()],
                [spec for cls in self.consumers for spec in cls.exchange_specs()],
            )
            for exchange in topology.exchanges:
                if not side.exists("exchange", exchange.name):
                    result.missing.append(f"exchange {exchange.name!r}")
            for queue in topology.queues:
                if not side.exists("queue", queue.name):
                    result.missing.append(f"queue {queue.name!r}")
                    self.recreated[queue.name] = (datetime.now(UTC), first)
            declare_on_amqp_channel(side.channel, topology)
            # The rest is extra: a user allowed only its own queues still consumes.
            optional = (amqp.exceptions.NotFound, amqp.exceptions.AccessRefused)
            try:
                result.rebound = self._rebind_others(side)
            except optional as exc:
                self._refused("bind the queues of the consumers it does not run", exc)
                side.reopen()
            try:
                result.unrouted = queue_depth(side.channel)
                if result.unrouted:
                    result.topics = self._sample(side, result.unrouted)
                    result.ours = self._subscribed(result.topics)
            except optional as exc:
                self._refused(f"read {unrouted_name()!r}", exc)
            except BrokerError as exc:  # a sample not confirmed: the originals stay
                logger.warning("reliable_events: sampling %r failed: %s", unrouted_name(), exc)
        except amqp.exceptions.NotFound:  # deleted under us between two calls: next time
            logger.debug("reliable_events: topology changed during the check", exc_info=True)
        finally:
            side.close()
        self._log(result, first=first)
        return result

    def _refused(self, what: str, exc: BaseException) -> None:
        if what not in self._refusals:  # once per worker: it will not change by itself
            self._refusals.add(what)
            logger.warning("reliable_events: topology check could not %s: %s", what, exc)

    def _rebind_others(self, side: _Side) -> list[str]:
        """Bind the existing queues of registered consumers this worker does not run."""
        running = {cls.name for cls in self.consumers}
        exchange = str(app_settings.EXCHANGE)
        rebound = []
        for cls in registry.all():
            if cls.name in running:
                continue
            for spec in cls.exchange_specs():  # an ordered consumer's hash exchange
                if side.exists("exchange", spec.name):
                    for source, routing_key in spec.bindings:
                        side.channel.exchange_bind(spec.name, source, routing_key)
                    rebound.append(spec.name)
            if cls.ordered or not side.exists("queue", cls.queue_name()):
                continue
            for topic in cls.topics:
                side.channel.queue_bind(cls.queue_name(), exchange, topic)
            rebound.append(cls.queue_name())
        return rebound

    def _sample(self, side: _Side, depth: int) -> Counter[str]:
        if depth != self._sampled_at:
            side.reopen(fresh=True)  # confirm mode stays on a channel: not for the checks
            self._topics = sample_topics(side.channel)
            self._sampled_at = depth
        return self._topics

    def _subscribed(self, topics: Counter[str]) -> dict[str, list[str]]:
        ours: dict[str, list[str]] = {}
        for topic in topics:
            names = [
                cls.name
                for cls in self.consumers
                if any(topic_matches(pattern, topic) for pattern in cls.topics)
            ]
            if names:
                ours[topic] = names
        return ours

    def _log(self, result: CheckResult, *, first: bool) -> None:
        if result.missing:
            # On a worker's first connect, a missing queue is usually a first deployment.
            level = logging.INFO if first else logging.WARNING
            lost = any(item.startswith("queue ") for item in result.missing) and not first
            logger.log(
                level,
                "reliable_events: topology check: %s %s missing (an exchange takes its "
                "bindings with it); declared and bound again%s",
                ", ".join(result.missing),
                "was" if len(result.missing) == 1 else "were",
                ". A deleted queue lost the messages it held and the retries that came "
                "back to it meanwhile: `manage.py replay_events <consumer> --since <when it "
                "was deleted>` re-delivers them (what was applied is skipped)"
                if lost
                else "",
            )
        if not result.unrouted:
            return
        queue = unrouted_name()
        if result.ours:
            subscribed = "; ".join(
                f"{topic} -> {', '.join(names)}" for topic, names in sorted(result.ours.items())
            )
            logger.warning(
                "reliable_events: %d event(s) are in %r instead of a consumer's queue "
                "(sampled topics: %s). Consumers of this worker subscribe to some of them "
                "(%s): their binding was missing (exchange deleted and re-created?) and is "
                "restored now. Run `manage.py republish_unrouted` to deliver them.",
                result.unrouted,
                queue,
                describe_topics(result.topics),
                subscribed,
            )
        else:
            logger.warning(
                "reliable_events: %d event(s) are in %r: no queue was bound for their topic "
                "(sampled topics: %s). Bind a consumer, or run `manage.py republish_unrouted` "
                "once its binding is back.",
                result.unrouted,
                queue,
                describe_topics(result.topics),
            )


class _Side:
    """A side channel that survives the ``NOT_FOUND`` of a passive declare (the broker
    closes the channel: a new one is opened)."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.channel = self._open()

    def reopen(self, *, fresh: bool = False) -> None:
        if fresh and self.channel.is_open:
            self.channel.close()
        if fresh or not self.channel.is_open:
            self.channel = self._open()

    def _open(self) -> Any:
        import amqp

        channel = amqp.Channel(self.connection, None, auto_decode=False)
        channel.open()
        return channel

    def exists(self, kind: str, name: str) -> bool:
        import amqp

        try:
            if kind == "exchange":
                self.channel.exchange_declare(name, "topic", passive=True)
            else:
                self.channel.queue_declare(name, passive=True)
        except amqp.exceptions.NotFound:
            self.channel = self._open()
            return False
        return True

    def close(self) -> None:
        try:
            if self.channel.is_open:
                self.channel.close()
        except Exception:  # the connection is gone: the consumer reconnects anyway
            logger.debug("reliable_events: closing the topology channel failed", exc_info=True)
