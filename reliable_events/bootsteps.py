"""Run the consumers inside a Celery worker instead of a separate ``consume_events``.

Add the bootstep to your Celery app::

    # proj/celery.py
    from celery import Celery
    from reliable_events.bootsteps import ConsumerStep

    app = Celery("proj")
    app.config_from_object("django.conf:settings", namespace="CELERY")
    app.steps["worker"].add(ConsumerStep)

``celery -A proj worker`` then also runs the consumers named by
``RELIABLE_EVENTS["CELERY_CONSUMERS"]`` (default: every registered consumer) in one
thread of the worker's main process, with the same loop as ``consume_events``
(:class:`reliable_events.consumer.worker.Worker`): its own broker connection to
``BROKER_URL``, manual acks after commit, retries, dead letters, reconnects.  On warm
shutdown the current message finishes and is acked before the worker exits.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from celery import bootsteps

from reliable_events.conf import app_settings
from reliable_events.runner import StopFlag

logger = logging.getLogger(__name__)

#: Seconds ``stop()`` waits for the current message to finish.
STOP_TIMEOUT = 60.0


class ConsumerService:
    """The consume loop in a background thread: ``start()``, then ``stop()``.

    Usable on its own in any long-running process; the Celery step wraps it.
    """

    def __init__(self, names: Sequence[str] | None = None) -> None:
        self.names = list(names) if names is not None else None
        self.stop_flag = StopFlag()
        self.thread: threading.Thread | None = None
        self.worker: Any = None
        self.error: BaseException | None = None

    def start(self) -> None:
        if self.thread is not None:
            return
        # Lazy: this module is imported by the Celery app module before Django's apps are
        # loaded, and the worker needs the models.
        from reliable_events.consumer.worker import Worker

        self.stop_flag = StopFlag()
        self.worker = Worker(self.names, stop=self.stop_flag)
        self.thread = threading.Thread(
            target=self._run, name="reliable-events-consumers", daemon=True
        )
        self.thread.start()
        logger.info("reliable_events: consumers started: %s", ", ".join(self.worker.consumers))

    def _run(self) -> None:
        from django.db import connections

        try:
            self.worker.run()
        except BaseException as exc:  # logged and kept; the worker thread must not vanish silently
            self.error = exc
            logger.exception("reliable_events: the consumer thread stopped on an error")
        finally:
            connections.close_all()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Let the current message finish (and be acked), then stop."""
        thread, self.thread = self.thread, None
        if thread is None:
            return
        self.stop_flag.set("stop")
        thread.join(timeout)
        if thread.is_alive():
            logger.warning("reliable_events: consumer thread still busy after %.0fs", timeout)

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


class ConsumerStep(bootsteps.StartStopStep):
    """Celery worker bootstep that hosts the event consumers (see the module docs)."""

    label = "reliable-events consumers"
    requires = ("celery.worker.components:Pool",)

    def create(self, parent: Any) -> Any:
        """The service the step starts and stops (``self.obj``)."""
        return ConsumerService(app_settings.CELERY_CONSUMERS)

    def include_if(self, parent: Any) -> bool:
        names = app_settings.CELERY_CONSUMERS
        return names is None or bool(names)
