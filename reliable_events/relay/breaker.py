"""The relay's view of broker health: one circuit breaker for broker-wide failures."""

from __future__ import annotations

import logging
import random
import time

from reliable_events.conf import app_settings

logger = logging.getLogger(__name__)


class BrokerBreaker:
    """The relay's one circuit breaker for broker-wide failures.

    Broker health is not message health: a refused or lost connection, a blocked one or
    a confirm timeout pauses the whole relay instead of charging its rows.  The pause
    doubles per consecutive failure from an eighth of ``RELAY_BROKER_RETRY_MAX`` up to
    it (equal jitter, ``TIME_SCALE`` applies), so a relay resumes within about that long
    after the broker answers again.  An outage is logged when it starts, every
    ``LOG_EVERY`` seconds while it lasts, and when it ends.
    """

    LOG_EVERY = 30.0

    def __init__(self) -> None:
        self.failures = 0
        self.open_until = 0.0
        self.down_since: float | None = None
        self.error = ""
        self._logged = 0.0

    def remaining(self) -> float:
        return max(0.0, self.open_until - time.monotonic())

    def trip(self, error: str, *, waiting: int = 0) -> float:
        """Record a broker failure; return the pause before the next try."""
        now = time.monotonic()
        self.failures += 1
        self.error = error
        cap = app_settings.seconds("RELAY_BROKER_RETRY_MAX")
        ceiling = min(cap, cap / 8 * 2.0 ** min(self.failures - 1, 16))
        pause = ceiling * (0.5 + random.random() / 2)
        self.open_until = now + pause
        if self.down_since is None:
            self.down_since = self._logged = now
            logger.warning(
                "reliable_events: broker unavailable (%s); the relay pauses and retries "
                "every %.2gs at most, no attempt is counted against the events",
                error,
                cap,
            )
        elif now - self._logged >= self.LOG_EVERY:
            self._logged = now
            logger.warning(
                "reliable_events: broker still unavailable after %.0fs (%s)",
                now - self.down_since,
                error,
            )
        return pause

    def reset(self) -> None:
        if self.down_since is not None:
            logger.warning(
                "reliable_events: broker available again after %.1fs; the relay resumes",
                time.monotonic() - self.down_since,
            )
        self.failures = 0
        self.open_until = 0.0
        self.down_since = None
        self.error = ""
