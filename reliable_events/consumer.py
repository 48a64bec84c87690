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
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from reliable_events.conf import app_settings
from reliable_events.exceptions import ConfigurationError, UnknownConsumer
from reliable_events.topology import QueueSpec, queue_arguments

_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]+$")
_BINDING_RE = re.compile(r"^([A-Za-z0-9_-]+|\*|#)(\.([A-Za-z0-9_-]+|\*|#))*$")
#: Quorum queues: deliveries allowed before the broker gives up on a message.  Far above
#: anything our own retry policy produces (each retry is a new publish), so the broker
#: never drops a message before our policy dead-letters it.
QUORUM_DELIVERY_LIMIT = 1000


@dataclass(frozen=True)
class Event:
    """What a consumer's ``handle`` receives."""

    id: str
    topic: str
    key: str | None
    payload: Any
    headers: dict[str, Any] = field(default_factory=dict)
    attempt: int = 1


class EventConsumer:
    """Base class of consumers: subclasses set ``name`` and ``topics`` and write ``handle``.

    The base class owns the transaction, the idempotency record, timing, error
    classification, logging and retries (see :mod:`reliable_events.consuming`).
    """

    name: ClassVar[str] = ""
    topics: ClassVar[Sequence[str]] = ()
    #: Retries before dead-lettering (``None``: the ``MAX_RETRIES`` setting).
    max_retries: ClassVar[int | None] = None
    #: Seconds before each retry (``None``: the ``RETRY_DELAYS`` setting); the last
    #: value repeats when there are more retries than delays.
    retry_delays: ClassVar[Sequence[float] | None] = None
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
    def retry_queue_name(cls, retry: int) -> str:
        return f"{cls.name}.retry.{retry}"

    @classmethod
    def retry_queue_count(cls) -> int:
        """Distinct delay queues: one per distinct retry number up to the delays given."""
        return max(1, min(cls.get_max_retries(), len(cls.get_retry_delays())))

    @classmethod
    def queue_specs(cls) -> list[QueueSpec]:
        """The consumer's queue (bound to its topics) and its delay queues."""
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
            specs.append(
                QueueSpec(
                    cls.retry_queue_name(retry),
                    (),
                    queue_arguments(
                        **{
                            "x-message-ttl": int(cls.delay_for(retry) * 1000),
                            "x-dead-letter-exchange": "",
                            "x-dead-letter-routing-key": cls.queue_name(),
                        }
                    ),
                )
            )
        return specs

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
            if existing is not None and existing.__qualname__ != consumer.__qualname__:
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


registry = ConsumerRegistry()
