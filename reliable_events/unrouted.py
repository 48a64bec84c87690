"""Events no queue was bound for: counted, named by topic, re-published.

The events exchange has ``<EXCHANGE>.unrouted`` as its alternate exchange: an event
whose topic matches no binding (no consumer subscribes to it, or a binding was lost
when the exchange was deleted and re-created) is confirmed into the durable queue
``<EXCHANGE>.unrouted`` instead of being dropped.  The outbox row is then ``sent``: from
the database nothing looks wrong, so this module looks at the broker:

* :func:`count_unrouted` - the queue's depth (a passive ``queue.declare``, one round
  trip; works on the embedded ``filesystem://`` transport too, whose queues are
  folders; on ``memory://`` only in the process that published);
  :func:`cached_unrouted_count` for pages (``UNROUTED_CACHE_SECONDS``);
* :func:`sample_topics` - which topics are in there (used by the consumers' periodic
  topology check to log a warning naming them);
* :func:`republish_unrouted` - the ``republish_unrouted`` command: each message goes
  back to the events exchange with a publisher confirm, and its unrouted copy is acked
  only after the broker confirmed the new publish.  A message that is still unroutable
  lands in the unrouted queue again (the alternate exchange): the loop stops after the
  number of messages the queue held at the start, so it cannot spin.

``republish_unrouted`` moves messages, never re-queues them: a requeue counts as a
delivery on quorum queues, whose default delivery limit would end by dropping the
message.  The sample re-queues on classic queues only (it keeps their order there).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from reliable_events.broker_nodes import BrokerNodes
from reliable_events.broker_url import is_amqp_url, is_database_url, safe_url
from reliable_events.conf import app_settings
from reliable_events.db import queue_alias
from reliable_events.exceptions import BrokerError
from reliable_events.models import QueuedMessage
from reliable_events.sanitize import describe_error
from reliable_events.topology import unrouted_name

logger = logging.getLogger(__name__)

#: Messages moved to learn which topics are in the unrouted queue.
SAMPLE_SIZE = 20
#: Messages moved per confirm wait (and per ``multiple`` ack).
MOVE_WINDOW = 200
#: The topics a log line or a page names at most.
TOPICS_SHOWN = 10
#: A message moved within the unrouted queue (to sample it) is re-published straight to
#: the queue, so its routing key becomes the queue's name: its topic travels in here.
TOPIC_HEADER = "x-event-unrouted-topic"


@dataclass(frozen=True)
class UnroutedCount:
    """The depth of the unrouted queue, or why it is unknown (``count is None``)."""

    queue: str
    count: int | None
    error: str = ""

    @property
    def known(self) -> bool:
        return self.count is not None


@dataclass
class RepublishReport:
    """What :func:`republish_unrouted` did."""

    queue: str
    #: Messages in the unrouted queue when it started (the loop's bound).
    at_start: int = 0
    republished: int = 0
    topics: Counter[str] = field(default_factory=Counter)
    #: Depth of the unrouted queue when it ended: still unroutable ones, and new arrivals.
    at_end: int | None = None
    dry_run: bool = False


def topic_matches(pattern: str, topic: str) -> bool:
    """AMQP topic matching: ``*`` is one word, ``#`` zero or more words."""
    return _match(pattern.split("."), topic.split("."))


def _match(pattern: list[str], words: list[str]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_match(rest, words[index:]) for index in range(len(words) + 1))
    if not words:
        return False
    return (head in ("*", words[0])) and _match(rest, words[1:])


def describe_topics(topics: Counter[str]) -> str:
    """``"a.b x3, c x1"``: the most frequent topics first, at most ``TOPICS_SHOWN``."""
    shown = ", ".join(f"{topic} x{count}" for topic, count in topics.most_common(TOPICS_SHOWN))
    more = len(topics) - TOPICS_SHOWN
    return shown + (f" and {more} more topic(s)" if more > 0 else "")


# -- counting ----------------------------------------------------------------------------
def queue_depth(channel: Any, queue: str | None = None) -> int:
    """Messages ready in the unrouted queue (passive declare; raises if it is missing)."""
    return int(channel.queue_declare(queue or unrouted_name(), passive=True).message_count)


@contextmanager
def _broker_channel(url: str, timeout: float) -> Iterator[Any]:
    """A short-lived channel on ``url`` (py-amqp for AMQP, a kombu virtual channel else)."""
    from kombu import Connection

    options: dict[str, Any] = {}
    if not is_amqp_url(url):
        options["deadletter_queue"] = unrouted_name()
    options.update(app_settings.BROKER_TRANSPORT_OPTIONS)

    def open_node(node: str) -> Any:
        conn = Connection(node, connect_timeout=timeout, heartbeat=0, transport_options=options)
        try:
            conn.ensure_connection(max_retries=0, reraise_as_library_errors=False)
        except Exception:
            conn.release()
            raise
        return conn

    conn = BrokerNodes(url).connect(open_node, role="unrouted queue")
    try:
        if is_amqp_url(url):
            import amqp

            raw = conn.connection
            raw.transport.sock.settimeout(timeout)
            channel = amqp.Channel(raw, None, auto_decode=False)  # bodies stay bytes
            channel.open()
            yield channel
        else:
            yield conn.default_channel
    finally:
        try:
            conn.release()
        except Exception:  # closing a broken connection may fail in many ways
            logger.debug("reliable_events: error closing the unrouted connection", exc_info=True)


#: A short-lived channel on a broker URL (also used for the consumer queues' depths).
broker_channel = _broker_channel


def count_unrouted(url: str | None = None, *, timeout: float | None = None) -> UnroutedCount:
    """The unrouted queue's depth; never raises (an unreachable broker gives ``None``)."""
    url = str(url or app_settings.BROKER_URL)
    queue = unrouted_name()
    wait = float(app_settings.CONNECT_TIMEOUT) if timeout is None else timeout
    try:
        if is_database_url(url):  # the database transport: the queue is rows of a table
            rows = QueuedMessage.objects.using(queue_alias(url)).filter(queue=queue)
            return UnroutedCount(queue, rows.count())
        with _broker_channel(url, wait) as channel:
            return UnroutedCount(queue, queue_depth(channel, queue))
    except Exception as exc:  # the count is a report: any failure is shown, not raised
        if "NOT_FOUND" in str(exc):
            return UnroutedCount(queue, 0, "the unrouted queue does not exist (yet)")
        return UnroutedCount(queue, None, f"cannot count: {describe_error(exc, url)}")


_cache_lock = threading.Lock()
_cache: dict[tuple[str, str], tuple[float, UnroutedCount]] = {}


def cached_unrouted_count(url: str | None = None) -> UnroutedCount:
    """:func:`count_unrouted` at most once per ``UNROUTED_CACHE_SECONDS`` per process
    (pages call this; the connect is bounded by ``min(CONNECT_TIMEOUT, 2 s)``)."""
    url = str(url or app_settings.BROKER_URL)
    key = (url, unrouted_name())
    max_age = float(app_settings.UNROUTED_CACHE_SECONDS)
    now = time.monotonic()
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None and now - hit[0] < max_age:
            return hit[1]
    result = count_unrouted(url, timeout=min(float(app_settings.CONNECT_TIMEOUT), 2.0))
    with _cache_lock:
        _cache[key] = (time.monotonic(), result)
    return result


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()


# -- moving messages (py-amqp channels) ---------------------------------------------------
def _topic_of(message: Any) -> str:
    headers = message.properties.get("application_headers") or {}
    if TOPIC_HEADER in headers:
        return str(headers[TOPIC_HEADER])
    routing_key = str(message.delivery_info.get("routing_key") or "")
    return routing_key or str(message.properties.get("type") or "")


class _Confirms:
    """Publisher confirms of one channel (put in confirm mode here), waited for in bulk."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.seq = 0
        self.pending: set[int] = set()
        self.failure = ""
        channel.confirm_select()
        channel.events["basic_ack"].add(self._ack)
        channel.events["basic_nack"].add(self._nack)
        channel.events["basic_return"].add(self._return)

    def sent(self) -> None:
        self.seq += 1
        self.pending.add(self.seq)

    def _settle(self, tag: int, multiple: bool) -> None:
        if multiple:
            self.pending = {seq for seq in self.pending if seq > tag}
        else:
            self.pending.discard(tag)

    def _ack(self, tag: int, multiple: bool) -> None:
        self._settle(tag, multiple)

    def _nack(self, tag: int, multiple: bool) -> None:
        self._settle(tag, multiple)
        self.failure = self.failure or "the broker nacked a re-published message"

    def _return(self, exc: Any, exchange: str, routing_key: str, message: Any) -> None:
        self.failure = self.failure or f"the broker returned a message: {exc}"

    def wait(self, timeout: float) -> None:
        """Until every message sent is confirmed; raises on a nack, return or timeout."""
        deadline = time.monotonic() + timeout
        connection = self.channel.connection
        while self.pending and not self.failure:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerError("the broker did not confirm the re-published messages in time")
            try:
                connection.drain_events(timeout=remaining)
            except TimeoutError:
                continue
        if self.failure:
            raise BrokerError(self.failure)


def _move(
    channel: Any,
    budget: int,
    exchange: str,
    routing_key: Callable[[Any], str],
    *,
    confirm_timeout: float,
    progress: Callable[[int, str], None] | None = None,
) -> Counter[str]:
    """Take up to ``budget`` messages from the unrouted queue; publish each to
    ``exchange``, and ack the originals once the broker confirmed their copies.

    ``channel`` is a fresh py-amqp channel (it is put in confirm mode here).  Messages go
    in windows of ``MOVE_WINDOW``: one confirm wait and one ``multiple`` ack per window.
    On a failure the window's originals stay unacked and return to the queue when the
    channel closes: at worst a message exists twice (consumers skip the duplicate by its
    message id), never not at all.  Returns the topics moved.
    """
    import amqp

    queue = unrouted_name()
    confirms = _Confirms(channel)
    topics: Counter[str] = Counter()
    done = 0
    while done < budget:
        window: list[Any] = []
        while len(window) < min(MOVE_WINDOW, budget - done):
            message = channel.basic_get(queue, no_ack=False)
            if message is None:
                break
            window.append(message)
        if not window:
            break
        moved = []
        for message in window:
            topic = _topic_of(message)
            headers = dict(message.properties.get("application_headers") or {})
            headers.pop(TOPIC_HEADER, None)
            if not exchange:  # back into the unrouted queue: keep the topic
                headers[TOPIC_HEADER] = topic
            properties = {k: v for k, v in message.properties.items() if k != "application_headers"}
            copy = amqp.Message(message.body, application_headers=headers or None, **properties)
            channel.basic_publish(
                copy, exchange=exchange, routing_key=routing_key(message), mandatory=not exchange
            )
            confirms.sent()
            moved.append(topic)
        confirms.wait(confirm_timeout)
        channel.basic_ack(window[-1].delivery_tag, multiple=True)
        for topic in moved:
            topics[topic] += 1
            done += 1
            if progress is not None:
                progress(done, topic)
    return topics


def sample_topics(channel: Any, limit: int = SAMPLE_SIZE) -> Counter[str]:
    """Topics of up to ``limit`` messages at the head of the unrouted queue; ``channel``
    must be a fresh one.

    On a classic queue they are read and put back (a requeue keeps their place, so
    ``republish_unrouted`` still sends them in the order they came).  A quorum queue
    counts a requeue as a delivery, and its delivery limit would end by dropping the
    message: there each is moved from the head to the tail instead (confirmed, then
    acked), which changes the order in the queue.
    """
    timeout, queue = float(app_settings.CONFIRM_TIMEOUT), unrouted_name()
    budget = min(limit, queue_depth(channel))  # past the depth: the moved ones again
    if app_settings.QUEUE_TYPE != "quorum":
        return _peek(channel, queue, budget)
    return _move(channel, budget, "", lambda _message: queue, confirm_timeout=timeout)


def _peek(channel: Any, queue: str, budget: int) -> Counter[str]:
    """Read up to ``budget`` messages of ``queue`` and requeue them all, in place."""
    topics: Counter[str] = Counter()
    tags = []
    try:
        for _ in range(budget):
            message = channel.basic_get(queue, no_ack=False)
            if message is None:
                break
            topics[_topic_of(message)] += 1
            tags.append(message.delivery_tag)
    finally:
        for tag in reversed(tags):  # py-amqp has no basic.nack: one reject each
            channel.basic_reject(tag, requeue=True)
    return topics


def republish_unrouted(
    url: str | None = None,
    *,
    dry_run: bool = False,
    limit: int | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> RepublishReport:
    """Re-publish the unrouted events to ``EXCHANGE`` (their original routing keys).

    Bounded by the queue's depth at the start (and ``limit``).  ``dry_run`` only counts.
    Raises :class:`~reliable_events.exceptions.BrokerError` when the broker cannot be
    used; messages already moved stay moved (each was confirmed before its ack).
    """
    url = str(url or app_settings.BROKER_URL)
    if not is_amqp_url(url):
        raise BrokerError(
            "republish_unrouted needs an AMQP broker (RabbitMQ) or db://; on the in-process "
            "and folder transports an unrouted event is a message in the folder/queue "
            f"{unrouted_name()!r} and can be re-published with publish_event"
        )
    queue = unrouted_name()
    report = RepublishReport(queue=queue, dry_run=dry_run)
    exchange = str(app_settings.EXCHANGE)
    timeout = float(app_settings.CONFIRM_TIMEOUT)
    try:
        with _broker_channel(url, float(app_settings.CONNECT_TIMEOUT)) as channel:
            report.at_start = queue_depth(channel, queue)
            budget = report.at_start if limit is None else min(limit, report.at_start)
            if not dry_run and budget:
                total = budget

                def step(done: int, topic: str) -> None:
                    report.republished = done
                    if progress is not None:
                        progress(done, total, topic)

                report.topics = _move(
                    channel, budget, exchange, _topic_of, confirm_timeout=timeout, progress=step
                )
            report.at_end = queue_depth(channel, queue)
    except BrokerError:
        raise
    except Exception as exc:
        raise BrokerError(
            f"republishing from {queue!r} on {safe_url(url)} stopped after "
            f"{report.republished} message(s): {describe_error(exc, url)}"
        ) from exc
    if report.topics:
        logger.warning(
            "reliable_events: re-published %d unrouted event(s) to %r (topics: %s); %s left",
            report.republished,
            exchange,
            describe_topics(report.topics),
            report.at_end,
        )
    return report
