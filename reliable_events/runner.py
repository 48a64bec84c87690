"""Long-running loops: stop cleanly on SIGTERM/SIGINT, survive database outages."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

from django.db import DatabaseError, InterfaceError, close_old_connections

from reliable_events.sanitize import redact

logger = logging.getLogger(__name__)


class StopFlag:
    """Set by SIGTERM/SIGINT (or by code); loops check it between units of work."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name = ""

    def set(self, signal_name: str = "") -> None:
        self.signal_name = signal_name
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, seconds: float) -> bool:
        return self._event.wait(max(0.0, seconds))


@contextmanager
def stop_on_signals(flag: StopFlag) -> Iterator[StopFlag]:
    """Make SIGTERM and SIGINT set ``flag`` instead of killing the process."""
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        flag.set(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_loop(
    step: Callable[[], bool],
    *,
    stop: StopFlag,
    idle_seconds: float,
    max_error_sleep: float = 30.0,
    recycle_connections: bool = True,
) -> None:
    """Call ``step`` until ``stop`` is set.

    ``step`` returns ``True`` when it did work (call again at once) and ``False`` when
    idle (sleep ``idle_seconds``).  Stale database connections are closed before each
    step (unless ``recycle_connections`` is false: the step keeps its connection, e.g.
    the relay's, which holds its lanes); a ``DatabaseError`` is logged, every connection
    closed, and the step retried with a growing pause.
    """
    failures = 0
    while not stop.is_set():
        if recycle_connections:
            close_old_connections()
        try:
            busy = step()
        except (DatabaseError, InterfaceError) as exc:
            failures += 1
            pause = min(max_error_sleep, 0.5 * 2 ** min(failures, 6))
            logger.warning(
                "reliable_events: database error (%s); retrying in %.1fs",
                redact(f"{type(exc).__name__}: {exc}"),
                pause,
            )
            _close_all_connections()
            stop.wait(pause)
            continue
        failures = 0
        if not busy:
            stop.wait(idle_seconds)


def _close_all_connections() -> None:
    from django.db import connections

    for conn in connections.all(initialized_only=True):
        try:
            conn.close()
        except Exception:  # a broken connection may fail to close; it is gone anyway
            logger.debug("reliable_events: closing a broken connection failed", exc_info=True)
