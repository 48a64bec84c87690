"""Helpers of the consumer tests: consumers built per test, raw publishing, effect counts.

Every consumer made here records its effect as an ``Order`` row with
``reference = "<consumer name>|<message id>"``; ``Order`` has no unique constraint, so
counting those rows counts how many times an event was *applied* (committed), which
is what exactly-once-in-effect is about.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

from django.db import connections

from reliable_events.consumer import ConsumerRegistry, Event, EventConsumer
from reliable_events.consuming import Worker, WorkerStats
from tests.testapp.models import Order

Behaviour = Callable[[EventConsumer, Event], None]


class RecordingConsumer(EventConsumer):
    """Base of the consumers made by :func:`make_consumer` (never registered itself)."""

    abstract = True
    #: The events ``handle`` saw, and when (``time.monotonic()``).
    calls: ClassVar[list[Event]] = []
    times: ClassVar[list[float]] = []


def unique_name(prefix: str = "test.consumer") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def make_consumer(
    registry: ConsumerRegistry,
    *,
    name: str | None = None,
    topics: Sequence[str] = ("orders.*",),
    max_retries: int = 2,
    retry_delays: Sequence[float] = (0,),
    behaviour: Behaviour | None = None,
) -> type[RecordingConsumer]:
    """A registered consumer that applies each event as one ``Order`` row, then runs
    ``behaviour(consumer, event)`` (which may raise).  ``cls.calls`` lists the events
    ``handle`` saw, ``cls.times`` when (``time.monotonic()``)."""
    import time

    attrs: dict[str, Any] = {
        "name": name or unique_name(),
        "topics": list(topics),
        "max_retries": max_retries,
        "retry_delays": list(retry_delays),
        "calls": [],
        "times": [],
        "__module__": __name__,
    }

    def handle(self: RecordingConsumer, event: Event) -> None:
        type(self).calls.append(event)
        type(self).times.append(time.monotonic())
        Order.objects.create(reference=f"{self.name}|{event.id}")
        if behaviour is not None:
            behaviour(self, event)

    attrs["handle"] = handle
    # Built with abstract=True so __init_subclass__ skips it; then registered explicitly.
    cls: type[RecordingConsumer] = type(
        "TestConsumer", (RecordingConsumer,), {**attrs, "abstract": True}
    )
    cls.abstract = False
    registry.register(cls)
    return cls


def applied(consumer: type[EventConsumer] | str, message_id: str | None = None) -> int:
    """How many times events were applied (committed) by ``consumer``."""
    name = consumer if isinstance(consumer, str) else consumer.name
    if message_id is not None:
        return Order.objects.filter(reference=f"{name}|{message_id}").count()
    return Order.objects.filter(reference__startswith=f"{name}|").count()


def queue_names(consumer: type[EventConsumer]) -> list[str]:
    return [spec.name for spec in consumer.queue_specs()]


@contextmanager
def running(worker: Worker, **run_kwargs: Any) -> Iterator[dict[str, Any]]:
    """Run ``worker`` in a thread for the block; stop it and join on exit.

    The thread's database connections are closed when it ends (the test database must
    be droppable at the end of the session).
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["stats"] = worker.run(**run_kwargs)
        except BaseException as exc:  # reported by the test
            box["error"] = exc
        finally:
            connections.close_all()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        yield box
    finally:
        worker.stop.set("test")
        thread.join(30)
        assert not thread.is_alive(), "worker did not stop"


def run_worker_thread(worker: Worker, timeout: float = 120, **run_kwargs: Any) -> WorkerStats:
    """``worker.run(**run_kwargs)`` in another thread (its own DB connection), joined."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["stats"] = worker.run(**run_kwargs)
        except BaseException as exc:  # re-raised below
            box["error"] = exc
        finally:
            connections.close_all()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        worker.stop.set("test")
        thread.join(30)
        raise AssertionError(f"worker still running after {timeout}s")
    if "error" in box:
        raise box["error"]
    stats: WorkerStats = box["stats"]
    return stats
