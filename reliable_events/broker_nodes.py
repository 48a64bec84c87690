"""Which node of a RabbitMQ cluster does the next connection go to?

``BROKER_URL`` may list several nodes (``"amqp://h1//;amqp://h2//"`` or a list, see
:mod:`reliable_events.broker_url`).  Every AMQP connection the app opens goes through a
:class:`BrokerNodes`: it tries the nodes in turn, each once per attempt, and returns the
first connection that opens.  A process's first connection starts at a random node, so
the processes (relays, consumers, web workers) spread over the cluster and one failing
node stalls only the connections it had.  Each new connection starts with the node
*after* the one the previous connection used, so a connection lost with its node
(killed, frozen, partitioned) goes to another node first instead of waiting on the
dead one.

The pause between two attempts that found no node (exponential, with jitter) belongs
to the caller, who has one already: the relay's broker breaker, the on-commit breaker,
the consumer's reconnect back-off.  A frozen node is left after ``CONNECT_TIMEOUT`` (it
accepts TCP but never answers AMQP), a publisher on it after its confirm timeout, a
consumer on it after two missed heartbeats (``CONSUMER_HEARTBEAT``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from typing import TypeVar

from reliable_events.broker_url import node_urls, safe_url
from reliable_events.exceptions import ConfigurationError
from reliable_events.sanitize import describe_error

logger = logging.getLogger(__name__)

T = TypeVar("T")


class BrokerNodes:
    """The nodes of one broker URL and where the next connection starts."""

    def __init__(self, url: str | Sequence[str], *, start: int | None = None) -> None:
        self.urls = node_urls(url) or [str(url)]
        self._next = random.randrange(len(self.urls)) if start is None else start
        #: The node of the last connection that opened (``None`` before the first).
        self.current: str | None = None

    def __len__(self) -> int:
        return len(self.urls)

    def order(self) -> list[str]:
        """The node URLs in the order the next connection tries them."""
        start = self._next % len(self.urls)
        return self.urls[start:] + self.urls[:start]

    def connect(self, open_node: Callable[[str], T], *, role: str) -> T:
        """``open_node(url)`` on each node in turn; the first result, else the last error.

        A :class:`ConfigurationError` (the broker refuses our topology) is raised at
        once: another node of the same cluster would refuse it too.
        """
        last: Exception | None = None
        start = self._next % len(self.urls)
        for offset, url in enumerate(self.order()):
            try:
                opened = open_node(url)
            except ConfigurationError:
                raise
            except Exception as exc:
                last = exc
                if len(self.urls) > 1:
                    logger.warning(
                        "reliable_events: %s cannot connect to broker node %s (%s)%s",
                        role,
                        safe_url(url),
                        describe_error(exc, url),
                        "; trying the next node" if offset + 1 < len(self.urls) else "",
                    )
                continue
            previous, self.current = self.current, url
            self._next = start + offset + 1
            if previous is not None and previous != url:
                logger.warning(
                    "reliable_events: %s connected to broker node %s (was %s)",
                    role,
                    safe_url(url),
                    safe_url(previous),
                )
            return opened
        assert last is not None
        raise last
