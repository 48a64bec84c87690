"""What does RabbitMQ's management API say about a queue?

A passive ``queue.declare`` (what :mod:`reliable_events.queue_depths` asks over AMQP)
counts the *ready* messages only: messages delivered to a consumer process and not yet
acked (a batch in flight, a process whose database is down, a frozen one) are not in it.
RabbitMQ's management API counts them (``messages_unacknowledged``).  Optional: only when
``BROKER_MANAGEMENT_URL`` names the API (``http://user:password@host:15672/``; a user with
the ``monitoring`` tag is enough: every request here is a read).

One ``GET /api/queues/<vhost>/<queue>`` per queue, with a short timeout; never raises.
The broker refreshes these figures every ``collect_statistics_interval`` (5 s by default).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.error import HTTPError
from urllib.parse import quote, unquote, urlsplit
from urllib.request import Request, urlopen

from reliable_events.broker_url import node_urls
from reliable_events.sanitize import redact

#: The most of a response read (a queue's object is a few KiB).
MAX_RESPONSE = 1 << 20


@dataclass(frozen=True)
class QueueStats:
    """What the management API counts on one queue (``None``: not known)."""

    unacked: int | None = None
    #: Why it is not known (redacted); empty when it is.
    error: str = ""


def vhost_of(broker_url: str) -> str:
    """The virtual host of an AMQP URL (its first node), as kombu reads it: the path
    without its leading ``/``, percent-decoded; ``/`` when empty."""
    nodes = node_urls(broker_url)
    path = urlsplit(nodes[0] if nodes else broker_url).path
    return unquote(path[1:]) if path not in ("", "/") else "/"


def url_problems(url: str) -> list[str]:
    """What is wrong with ``BROKER_MANAGEMENT_URL`` (empty when it is usable)."""
    try:
        split = urlsplit(url)
        split.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as exc:
        return [f"it does not parse ({redact(str(exc), url)})"]
    problems = []
    if split.scheme not in ("http", "https"):
        problems.append(f"its scheme must be http or https, not {split.scheme or 'none'!r}")
    if not split.hostname:
        problems.append("it names no host")
    if split.query or split.fragment:
        problems.append("it must not have a query or a fragment")
    return problems


def queue_stats(
    url: str, vhost: str, queues: Sequence[str], *, timeout: float
) -> dict[str, QueueStats]:
    """The management API's figures of each of ``queues`` in ``vhost``; a queue it could
    not read has ``unacked=None`` and the reason (the password of ``url`` masked)."""
    problems = url_problems(url)
    if problems:  # E015; http(s) only from here on
        refused = QueueStats(error=f"BROKER_MANAGEMENT_URL: {problems[0]}")
        return dict.fromkeys(queues, refused)
    split = urlsplit(url)
    base = f"{split.scheme}://{split.hostname}"
    if split.port is not None:
        base += f":{split.port}"
    base += split.path.rstrip("/")
    headers = {"Accept": "application/json"}
    if split.username is not None:
        pair = f"{unquote(split.username)}:{unquote(split.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    found: dict[str, QueueStats] = {}
    failed = ""
    for queue in queues:
        if failed:  # the API is down or refuses us: not once per queue
            found[queue] = QueueStats(error=failed)
            continue
        address = f"{base}/api/queues/{quote(vhost, safe='')}/{quote(queue, safe='')}"
        try:
            request = Request(address, headers=headers)  # noqa: S310 - http(s), checked
            with urlopen(request, timeout=timeout) as response:  # noqa: S310
                data = json.loads(response.read(MAX_RESPONSE))
        except HTTPError as exc:
            if exc.code == 404:
                found[queue] = QueueStats(error="no such queue")
                continue
            failed = f"management API: HTTP {exc.code} {exc.reason}"
        except (OSError, ValueError) as exc:  # refused, timed out, not JSON
            failed = f"management API: {type(exc).__name__}: {exc}"
        else:
            value = data.get("messages_unacknowledged") if isinstance(data, dict) else None
            if isinstance(value, int) and not isinstance(value, bool):
                found[queue] = QueueStats(unacked=value)
            else:  # a queue declared since the broker's last statistics round
                found[queue] = QueueStats(error="not counted by the broker yet")
            continue
        failed = redact(failed, url)[:300]
        found[queue] = QueueStats(error=failed)
    return found
