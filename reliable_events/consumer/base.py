"""Consumers: ``EventConsumer`` subclasses, their registry and their broker topology.

Subclass :class:`EventConsumer` in ``<app>/consumers.py`` of any installed app; the
registry imports those modules the first time it is used::

    class ReserveStock(EventConsumer):
        name = "inventory.reserve-stock"      # unique; names its queue
        topics = ["orders.created"]            # binding keys, AMQP wildcards allowed
        max_retries = 5
        retry_delays = [1, 5, 15, 30, 60]      # seconds, one per retry

        def handle(self, event):               # runs inside transaction.atomic()
            ...

The base class owns everything around ``handle``: :meth:`EventConsumer.process` opens
the transaction, records the message id in ``ProcessedMessage`` (first, so duplicate
deliveries serialise on its unique index), runs ``handle``, times it and classifies a
failure; the consume loop (:mod:`reliable_events.consumer.worker`) turns the outcome into an
ack, a delayed retry or a dead letter.  See ``docs/consumers.md``.
"""

from __future__ import annotations

import enum
import logging
import re
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

from django.db import connections, transaction

from reliable_events import tracing
from reliable_events.broker_url import is_amqp_url
from reliable_events.conf import app_settings
from reliable_events.consumer import partitions
from reliable_events.consumer.db import database_lost
from reliable_events.consumer.idempotency import delete_records, insert_record, insert_records
from reliable_events.consumer.savepoints import HandlerSavepoint
from reliable_events.db import write_alias
from reliable_events.exceptions import (
    ConfigurationError,
    DatabaseUnavailable,
    PermanentError,
    UnknownConsumer,
)
from reliable_events.topology import ExchangeSpec, QueueSpec, queue_arguments

logger = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]+$")
_BINDING_RE = re.compile(r"^([A-Za-z0-9_-]+|\*|#)(\.([A-Za-z0-9_-]+|\*|#))*$")
#: Quorum queues: deliveries allowed before the broker gives up on a message.  Far above
#: anything our own retry policy produces (each retry is a new publish), so the broker
#: never drops a message before our policy dead-letters it.
QUORUM_DELIVERY_LIMIT = 1000
#: Room for ``.retry.<n>`` in a queue name (AMQP names are at most 255 bytes; the
#: ProcessedMessage column holds 200 characters).
_MAX_NAME_LENGTH = 180


@dataclass(frozen=True)
class Event:
    """What a consumer's ``handle`` receives."""

    id: str
    topic: str
    key: str | None
    payload: Any
    headers: dict[str, Any] = field(default_factory=dict)
    attempt: int = 1
    #: The broker delivered it before (a consumer died or lost its connection before the
    #: ack); the idempotency record makes that harmless.
    redelivered: bool = False
    #: When it was first published (the AMQP ``timestamp`` property), if known.
    published_at: datetime | None = None


class Outcome(enum.Enum):
    """What became of one delivery."""

    PROCESSED = "processed"
    DUPLICATE = "duplicate"
    FAILED = "failed"
    RETRIED = "retried"
    DEAD_LETTERED = "dead-lettered"
    POISON = "poison"
    #: Kept behind its key's dead-lettered head (``hold_key_on_dead_letter``).
    PARKED = "parked"


@dataclass
class HandlerResult:
    """The outcome of one :meth:`EventConsumer.process` call."""

    outcome: Outcome
    seconds: float = 0.0
    error: BaseException | None = None
    traceback: str = ""
    #: A batch handler's ``process`` span, still open (``tracing.HandlerSpans``), or ``None``.
    span: Any = None

    @property
    def permanent(self) -> bool:
        return isinstance(self.error, PermanentError)


def _refuse_a_swallowed_error(connection: Any) -> None:
    """Raise when ``handle`` caught a database error and went on: Django would roll the
    transaction back at its end, silently, and the event would be acked unapplied."""
    if connection.needs_rollback:
        raise transaction.TransactionManagementError(
            "handle() caught a database error and went on; use a nested "
            "transaction.atomic() around what may fail"
        )


class EventConsumer:
    """Base class of consumers: subclasses set ``name`` and ``topics`` and write ``handle``.

    The base class owns the transaction, the idempotency record, timing, error
    classification, logging and retries (see :mod:`reliable_events.consumer.worker`).
    """

    name: ClassVar[str] = ""
    topics: ClassVar[Sequence[str]] = ()
    #: Retries before dead-lettering (``None``: the ``MAX_RETRIES`` setting).
    max_retries: ClassVar[int | None] = None
    #: Seconds before each retry (``None``: the ``RETRY_DELAYS`` setting); the last
    #: value repeats when there are more retries than delays.
    retry_delays: ClassVar[Sequence[float] | None] = None
    #: Database alias of the idempotency record and the handler's transaction
    #: (``None``: the default database).
    database: ClassVar[str | None] = None
    #: Messages already received that may share one transaction, each handler in its own
    #: savepoint (``None``: the ``CONSUMER_BATCH_SIZE`` setting).  See
    #: :meth:`process_batch`.
    batch_size: ClassVar[int | None] = None
    #: Per-key order across processes: the consumer's events are spread over partition
    #: queues by key (a bucket header matched by a headers exchange, single active
    #: consumer each) and a failed event is retried in place, holding its partition.  See
    #: :mod:`reliable_events.consumer.partitions` and ``docs/consumers.md``.
    ordered: ClassVar[bool] = False
    #: Partition queues of an ordered consumer (``None``: ``ORDERED_PARTITIONS``).
    partitions: ClassVar[int | None] = None
    #: Ordered consumers only: when an event is dead-lettered, park the later events of
    #: its key until the dead letter is retried or discarded (then they follow in order).
    hold_key_on_dead_letter: ClassVar[bool] = False
    #: Set on an intermediate base class to keep it out of the registry.
    abstract: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("abstract", False) or not cls.__dict__.get("name"):
            return
        registry.register(cls)

    def handle(self, event: Event) -> None:
        """Apply ``event``; runs inside ``transaction.atomic()``.

        Raise :class:`~reliable_events.exceptions.PermanentError` to dead-letter it at
        once; any other exception is retried.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement handle(event)")

    # -- what the base class owns ----------------------------------------------------------
    def process(self, event: Event) -> HandlerResult:
        """Apply ``event`` at most once in effect: idempotency record and ``handle`` in one
        transaction.

        Returns ``DUPLICATE`` when this consumer already committed this message id (nothing
        runs), ``PROCESSED`` when ``handle`` committed, ``FAILED`` (with the exception and
        its traceback) when ``handle`` raised and everything was rolled back.  Raises
        :class:`~reliable_events.exceptions.DatabaseUnavailable` when the database itself
        failed (connection lost, or the idempotency record could not be written): the
        message must then be neither acked nor counted as an attempt.
        """
        alias = self._alias()
        started = time.perf_counter()
        stage = "record"
        raw = None
        try:
            connection = connections[alias]
            connection.ensure_connection()
            raw = connection.connection
            with transaction.atomic(using=alias):
                if not insert_record(connection, self.name, event.id, event.topic):
                    return HandlerResult(Outcome.DUPLICATE, time.perf_counter() - started)
                stage = "handle"
                self.handle(event)
                _refuse_a_swallowed_error(connection)
                stage = "commit"
        except Exception as exc:
            seconds = time.perf_counter() - started
            if stage == "record" or database_lost(alias, raw):
                raise DatabaseUnavailable(
                    f"database {alias!r} failed while {self.name!r} processed "
                    f"{event.id!r}: {type(exc).__name__}"
                ) from exc
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            return HandlerResult(Outcome.FAILED, seconds, exc, text)
        seconds = time.perf_counter() - started
        logger.debug(
            "reliable_events: %s processed %s (%s, attempt %d) in %.1fms",
            self.name,
            event.id,
            event.topic,
            event.attempt,
            seconds * 1000,
        )
        return HandlerResult(Outcome.PROCESSED, seconds)

    def process_batch(
        self,
        events: Sequence[Event],
        *,
        max_seconds: float | None = None,
        stop: Callable[[], bool] | None = None,
        spans: tracing.HandlerSpans | None = None,
    ) -> list[HandlerResult] | None:
        """Apply several events in one transaction, each ``handle`` in its own savepoint.

        The idempotency records of the whole batch go in first, in one statement; then
        each new event's ``handle`` runs inside a savepoint.  A handler that raises is
        rolled back to its savepoint alone (its record too): its result is ``FAILED`` and
        the caller retries or dead-letters it on its own, while the other events commit
        with the batch, their handlers having run once.  An event already processed, or
        given twice in the batch, is ``DUPLICATE`` (its handler does not run again).

        Returns one result per event applied, in order.  With ``max_seconds`` the
        transaction takes no further event once it has been open that long, so the
        results may cover only the first events: the caller handles the rest (so does
        ``stop`` returning true, e.g. on SIGTERM).  Raises
        :class:`~reliable_events.exceptions.DatabaseUnavailable` like :meth:`process`
        (then nothing of the batch was committed).  ``None``: the database refused the
        commit itself (e.g. a deferred constraint); nothing was applied and the caller
        must process the events one by one.  ``spans``: the handlers' ``process`` spans,
        made by the caller from its deliveries (``tracing.handler_spans``); by default
        from the events alone.
        """
        alias = self._alias()
        stage = "record"
        raw = None
        results: list[HandlerResult] = []
        begun = time.perf_counter()
        try:
            connection = connections[alias]
            connection.ensure_connection()
            raw = connection.connection
            if spans is None:
                spans = tracing.handler_spans(self.name)
            with transaction.atomic(using=alias):
                fresh = insert_records(
                    connection, self.name, [(event.id, event.topic) for event in events]
                )
                undo: set[str] = set()
                for event in events:
                    too_long = max_seconds is not None and (
                        time.perf_counter() - begun >= max_seconds
                    )
                    if results and too_long:
                        break  # keep transactions (and their locks) short
                    if results and stop is not None and stop():
                        break
                    started = time.perf_counter()
                    if event.id not in fresh:
                        results.append(
                            HandlerResult(Outcome.DUPLICATE, time.perf_counter() - started)
                        )
                        continue
                    fresh.discard(event.id)
                    stage = "handle"
                    if spans is None:
                        span = None
                        failure = self._handle_in_savepoint(connection, event)
                    else:
                        span, token = spans.enter(event)
                        escaped: Exception | None = None
                        try:
                            failure = self._handle_in_savepoint(connection, event)
                        except Exception as exc:
                            escaped = exc
                            raise
                        finally:
                            spans.leave(span, token, escaped)
                    stage = "record"
                    seconds = time.perf_counter() - started
                    if failure is None:
                        results.append(HandlerResult(Outcome.PROCESSED, seconds, span=span))
                    else:
                        undo.add(event.id)
                        results.append(HandlerResult(Outcome.FAILED, seconds, *failure, span=span))
                # Not run (rolled back, or past max_seconds): the next delivery runs them.
                delete_records(connection, self.name, undo | fresh)
                stage = "commit"
        except Exception as exc:
            if stage == "commit" and not database_lost(alias, raw):
                # The commit itself was refused (a deferred constraint): nothing of the
                # batch is applied; the caller processes the events one by one.
                logger.warning(
                    "reliable_events: %s: the commit of a batch of %d was refused (%s); "
                    "processing them one by one",
                    self.name,
                    len(events),
                    type(exc).__name__,
                )
                return None
            raise DatabaseUnavailable(
                f"database {alias!r} failed while {self.name!r} processed a batch of "
                f"{len(events)} ({stage}): {type(exc).__name__}"
            ) from exc
        return results

    def _handle_in_savepoint(
        self, connection: Any, event: Event
    ) -> tuple[BaseException, str] | None:
        """Run ``handle`` in a savepoint; the exception and its traceback when it raised
        (everything it did is then rolled back to the savepoint).

        The savepoint travels with the handler's first statement
        (:class:`~reliable_events.consumer.savepoints.HandlerSavepoint`) and is not
        released (that would cost a round trip per event): it ends with the batch's
        transaction.  Like a nested ``transaction.atomic()``, on-commit callbacks the
        handler registered are dropped with it.  A database that fails rolling back to
        the savepoint propagates (the transaction is lost).
        """
        with HandlerSavepoint(connection) as savepoint:
            try:
                self.handle(event)
                _refuse_a_swallowed_error(connection)
            except Exception as exc:
                savepoint.rollback()
                text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
                return exc, text
        return None

    @classmethod
    def get_batch_size(cls) -> int:
        size = app_settings.CONSUMER_BATCH_SIZE if cls.batch_size is None else cls.batch_size
        return max(1, int(size))

    def _alias(self) -> str:
        alias: str | None = self.__dict__.get("_database_alias")
        if alias is None:
            alias = self.__dict__["_database_alias"] = self.get_database()
        return alias

    @classmethod
    def get_database(cls) -> str:
        if cls.database:
            return cls.database
        # Lazy: consumer classes are defined (and this package imported, e.g. by the
        # broker) before Django's apps are loaded; the models need the app registry.
        from reliable_events.models import ProcessedMessage

        return write_alias(ProcessedMessage)

    # -- policy and topology -------------------------------------------------------------
    @classmethod
    def get_max_retries(cls) -> int:
        return int(app_settings.MAX_RETRIES if cls.max_retries is None else cls.max_retries)

    @classmethod
    def get_retry_delays(cls) -> list[float]:
        delays = app_settings.RETRY_DELAYS if cls.retry_delays is None else cls.retry_delays
        return [float(d) for d in delays] or [0.0]

    @classmethod
    def delay_for(cls, retry: int) -> float:
        """Seconds before retry number ``retry`` (1-based)."""
        delays = cls.get_retry_delays()
        return delays[min(retry, len(delays)) - 1]

    @classmethod
    def queue_name(cls) -> str:
        return cls.name

    @classmethod
    def queue_of(cls, headers: Mapping[str, Any]) -> str:
        """The queue an event with these headers was delivered from (what a dead letter
        records): the consumer's queue, or on RabbitMQ an ordered consumer's partition
        (``db://`` keeps one queue per consumer)."""
        if cls.ordered and is_amqp_url(str(app_settings.BROKER_URL)):
            return partitions.partition_of(cls, headers)
        return cls.queue_name()

    @classmethod
    def retry_queue_name(cls, retry: int) -> str:
        return f"{cls.name}.retry.{retry}"

    @classmethod
    def retry_queue_names(cls) -> list[str]:
        """Its delay queues, in retry order (none for an ordered consumer: it retries in
        place)."""
        if cls.ordered:
            return []
        return [cls.retry_queue_name(retry) for retry in range(1, cls.retry_queue_count() + 1)]

    @classmethod
    def retry_queue_count(cls) -> int:
        """Distinct delay queues: one per distinct retry number up to the delays given."""
        return max(1, min(cls.get_max_retries(), len(cls.get_retry_delays())))

    @classmethod
    def exchange_specs(cls) -> list[ExchangeSpec]:
        """The consumer's own exchanges: an ordered consumer's headers exchange."""
        return partitions.exchange_specs(cls) if cls.ordered else []

    @classmethod
    def queue_specs(cls) -> list[QueueSpec]:
        """The consumer's queue (bound to its topics) and its delay queues; an ordered
        consumer's partition queues (it retries in place: no delay queues)."""
        if cls.ordered:
            return partitions.queue_specs(cls)
        exchange = str(app_settings.EXCHANGE)
        main_args = queue_arguments()
        if app_settings.QUEUE_TYPE == "quorum":
            main_args["x-delivery-limit"] = QUORUM_DELIVERY_LIMIT
        specs = [
            QueueSpec(
                cls.queue_name(),
                tuple((exchange, topic) for topic in cls.topics),
                main_args,
            )
        ]
        for retry in range(1, cls.retry_queue_count() + 1):
            args: dict[str, Any] = {
                "x-message-ttl": int(cls.delay_for(retry) * 1000),
                # The default exchange, routed by queue name: back into this consumer's
                # own queue only, never to the topic's other subscribers.
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": cls.queue_name(),
            }
            if app_settings.QUEUE_TYPE == "quorum":
                # Quorum queues dead-letter at most once unless told otherwise; at least
                # once needs reject-publish overflow.
                args["x-dead-letter-strategy"] = "at-least-once"
                args["x-overflow"] = "reject-publish"
            specs.append(QueueSpec(cls.retry_queue_name(retry), (), queue_arguments(**args)))
        return specs

    @classmethod
    def retry_queue_for(cls, retry: int) -> str:
        """The delay queue retry number ``retry`` (1-based) goes through."""
        return cls.retry_queue_name(min(max(retry, 1), cls.retry_queue_count()))

    @classmethod
    def validate(cls) -> None:
        if not _NAME_RE.match(cls.name):
            raise ConfigurationError(
                f"consumer name {cls.name!r} must use letters, digits, '.', '_', ':' or '-'"
            )
        if isinstance(cls.topics, str) or not cls.topics:
            raise ConfigurationError(f"consumer {cls.name!r} needs a non-empty list of topics")
        for topic in cls.topics:
            if not isinstance(topic, str) or not _BINDING_RE.match(topic):
                raise ConfigurationError(
                    f"consumer {cls.name!r}: {topic!r} is not a valid binding key"
                )
        if cls.get_max_retries() < 0:
            raise ConfigurationError(f"consumer {cls.name!r}: max_retries must be >= 0")
        if any(d < 0 for d in cls.get_retry_delays()):
            raise ConfigurationError(f"consumer {cls.name!r}: retry_delays must be >= 0")
        if cls.batch_size is not None and (
            not isinstance(cls.batch_size, int) or cls.batch_size < 1
        ):
            raise ConfigurationError(f"consumer {cls.name!r}: batch_size must be an int >= 1")
        if cls.hold_key_on_dead_letter and not cls.ordered:
            raise ConfigurationError(
                f"consumer {cls.name!r}: hold_key_on_dead_letter needs ordered = True"
            )
        if cls.partitions is not None and (
            not isinstance(cls.partitions, int) or not 1 <= cls.partitions <= 64
        ):
            raise ConfigurationError(
                f"consumer {cls.name!r}: partitions must be an int from 1 to 64"
            )
        if len(cls.name) > _MAX_NAME_LENGTH:
            raise ConfigurationError(
                f"consumer name {cls.name[:40]!r}... is longer than {_MAX_NAME_LENGTH} characters"
            )


class ConsumerRegistry:
    """Every ``EventConsumer`` subclass, by name; discovers ``<app>.consumers`` lazily."""

    def __init__(self) -> None:
        self._consumers: dict[str, type[EventConsumer]] = {}
        self._discovered = False
        self._lock = threading.RLock()

    def register(self, consumer: type[EventConsumer]) -> type[EventConsumer]:
        consumer.validate()
        with self._lock:
            existing = self._consumers.get(consumer.name)
            # The same class imported again (a module reloaded) replaces itself quietly.
            same = existing is not None and (existing.__module__, existing.__qualname__) == (
                consumer.__module__,
                consumer.__qualname__,
            )
            if existing is not None and not same:
                raise ConfigurationError(
                    f"two consumers are named {consumer.name!r}: "
                    f"{existing.__module__}.{existing.__qualname__} and "
                    f"{consumer.__module__}.{consumer.__qualname__}"
                )
            self._consumers[consumer.name] = consumer
        return consumer

    def unregister(self, name: str) -> None:
        with self._lock:
            self._consumers.pop(name, None)

    def autodiscover(self) -> None:
        with self._lock:
            if self._discovered:
                return
            self._discovered = True
            from django.utils.module_loading import autodiscover_modules

            autodiscover_modules("consumers")

    def reset(self) -> None:
        """Forget every consumer (tests); discovery runs again on next use."""
        with self._lock:
            self._consumers.clear()
            self._discovered = False

    def all(self) -> list[type[EventConsumer]]:
        self.autodiscover()
        return [self._consumers[name] for name in sorted(self._consumers)]

    def names(self) -> list[str]:
        return [consumer.name for consumer in self.all()]

    def get(self, name: str) -> type[EventConsumer]:
        self.autodiscover()
        try:
            return self._consumers[name]
        except KeyError as exc:
            known = ", ".join(sorted(self._consumers)) or "none"
            raise UnknownConsumer(f"no consumer named {name!r} (registered: {known})") from exc

    def queue_specs(self) -> list[QueueSpec]:
        specs: list[QueueSpec] = []
        for consumer in self.all():
            specs.extend(consumer.queue_specs())
        return specs

    def exchange_specs(self) -> list[ExchangeSpec]:
        return [spec for consumer in self.all() for spec in consumer.exchange_specs()]


registry = ConsumerRegistry()
