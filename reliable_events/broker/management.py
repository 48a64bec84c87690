"""What does RabbitMQ's management API say about a queue?

A passive ``queue.declare`` (what :mod:`reliable_events.queue_depths` asks over AMQP)
counts the *ready* messages only: messages delivered to a consumer process and not yet
acked (a batch in flight, a process whose database is down, a frozen one) are not in it.
RabbitMQ's management API counts them (``messages_unacknowledged``).  Optional: only when
``BROKER_MANAGEMENT_URL`` names the API (``http://user:password@host:15672/``; a user with
the ``monitoring`` tag is enough: every request here is a read).

One ``GET /api/queues/<vhost>`` for all the queues asked about (their names as an
anchored ``name`` regex, the ``columns`` needed only; a longer list is cut into several
requests), with a short timeout; never raises.  The broker refreshes these figures every
``collect_statistics_interval`` (5 s by default).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from urllib.error import HTTPError
from urllib.parse import quote, unquote, urlencode, urlsplit
from urllib.request import Request, urlopen

from reliable_events.broker_url import node_urls
from reliable_events.sanitize import redact

#: The most of a response read (a page of at most ``PAGE_SIZE`` short objects).
MAX_RESPONSE = 1 << 20
#: The longest ``name`` filter of one request, percent-encoded: well under the 8,000
#: bytes of request line the management API's HTTP server (Cowboy) accepts.
MAX_FILTER = 3000
#: Queues per page (the API's largest page is 500), and the most pages read of one group.
PAGE_SIZE = 500
MAX_PAGES = 4


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
    address = f"{base}/api/queues/{quote(vhost, safe='')}"
    for group in _groups(queues):
        failed = _read_group(address, headers, group, found, timeout)
        if failed:  # the API is down or refuses us: not once per group
            refused = QueueStats(error=redact(failed, url)[:300])
            return {queue: found.get(queue, refused) for queue in queues}
    return found


def _groups(queues: Sequence[str]) -> Iterator[list[str]]:
    """``queues`` in groups whose ``name`` filter fits in ``MAX_FILTER`` and whose
    queues fit in a page."""
    group: list[str] = []
    length = 0
    for queue in dict.fromkeys(queues):
        part = len(quote(re.escape(queue), safe="")) + 3  # and its "|"
        if group and (length + part > MAX_FILTER or len(group) == PAGE_SIZE):
            yield group
            group, length = [], 0
        group.append(queue)
        length += part
    if group:
        yield group


def _read_group(
    address: str,
    headers: dict[str, str],
    group: list[str],
    found: dict[str, QueueStats],
    timeout: float,
) -> str:
    """Fill ``found`` with the figures of ``group``'s queues (every page of the answer);
    the error that stopped it, else an empty string."""
    query = urlencode(
        {
            "page_size": PAGE_SIZE,
            "name": "^(" + "|".join(re.escape(queue) for queue in group) + ")$",
            "use_regex": "true",
            "columns": "name,messages_unacknowledged",
        }
    )
    wanted = set(group)
    page = pages = 1
    while page <= pages:
        try:
            request = Request(f"{address}?page={page}&{query}", headers=headers)  # noqa: S310
            with urlopen(request, timeout=timeout) as response:  # noqa: S310 - http(s) only
                data = json.loads(response.read(MAX_RESPONSE))
        except HTTPError as exc:
            hint = " (is the virtual host, or the URL's path, right?)" if exc.code == 404 else ""
            return f"management API: HTTP {exc.code} {exc.reason}{hint}"
        except (OSError, ValueError) as exc:  # refused, timed out, not JSON
            return f"management API: {type(exc).__name__}: {exc}"
        items = data.get("items") if isinstance(data, dict) else None
        if not isinstance(items, list):
            return "management API: an answer without the list of queues"
        for item in items:
            name = item.get("name") if isinstance(item, dict) else None
            if name in wanted:
                found[name] = _stats(item.get("messages_unacknowledged"))
        if isinstance(data.get("page_count"), int):  # more than a page: names differing
            pages = min(data["page_count"], MAX_PAGES)  # in case only, matched caselessly
        page += 1
    for queue in group:
        found.setdefault(queue, QueueStats(error="no such queue"))
    return ""


def _stats(value: object) -> QueueStats:
    if isinstance(value, int) and not isinstance(value, bool):
        return QueueStats(unacked=value)
    return QueueStats(error="not counted by the broker yet")  # declared since its last round
