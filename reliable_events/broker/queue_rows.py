"""How are the database transport's queue rows written and claimed? Its SQL, on both
supported databases (PostgreSQL and SQLite).

:class:`Dialect` holds what differs between the two; :func:`insert_rows` stores rows
(the publish and the retries), :func:`claim_rows` deletes (claims) the oldest due rows of
a queue, :func:`due_in` says when each queue's next row is due, :func:`depths` how many
rows each queue holds now and later, and :func:`delete_queues` empties the queues of a
consumer removed from the code.  The transport that drives them is
:mod:`reliable_events.broker.database`.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.db import connections

from reliable_events.broker.base import KEY_HEADER, OutgoingMessage
from reliable_events.consumer.wire import ATTEMPT_HEADER, Poison, parse_attempt
from reliable_events.exceptions import ConfigurationError
from reliable_events.models import QueuedMessage
from reliable_events.sanitize import json_safe
from reliable_events.times import as_project

#: PostgreSQL ``NOTIFY`` channel a publish signals on.
CHANNEL = "reliable_events_queue"


@dataclass(frozen=True)
class Dialect:
    """The statements that differ between PostgreSQL and SQLite."""

    #: The current time, comparable with ``available_at``.
    now: str
    #: The current time plus ``%s`` (PostgreSQL: seconds; SQLite: a ``"+N seconds"`` modifier).
    later: str
    headers_in: str
    headers_out: str
    #: Seconds from now until ``{due}`` (negative: due).
    due_in: str
    lock: str
    listens: bool

    def later_param(self, seconds: float) -> Any:
        return float(seconds) if self.listens else f"+{float(seconds):.6f} seconds"


_SQLITE_NOW = "STRFTIME('%%Y-%%m-%%d %%H:%%M:%%f', 'NOW')"
DIALECTS = {
    "postgresql": Dialect(
        now="statement_timestamp()",
        later="statement_timestamp() + make_interval(secs => %s)",
        headers_in="%s::jsonb",
        headers_out="headers::text",
        due_in="EXTRACT(EPOCH FROM {due} - statement_timestamp())",
        lock="FOR UPDATE SKIP LOCKED",
        listens=True,
    ),
    "sqlite": Dialect(
        now=_SQLITE_NOW,
        later="STRFTIME('%%Y-%%m-%%d %%H:%%M:%%f', 'NOW', %s)",
        headers_in="%s",
        headers_out="headers",
        due_in="(julianday({due}) - julianday('now')) * 86400.0",
        lock="",
        listens=False,
    ),
}


def dialect_for(alias: str) -> Dialect:
    vendor = connections[alias].vendor
    try:
        return DIALECTS[vendor]
    except KeyError:
        raise ConfigurationError(
            f"the database transport (db://) needs PostgreSQL or SQLite; database "
            f"{alias!r} is {vendor}"
        ) from None


def table_name(alias: str) -> str:
    return str(connections[alias].ops.quote_name(QueuedMessage._meta.db_table))


_COLUMNS = "id, queue, message_id, topic, key, {headers}, body, published_at"


def insert_rows(
    alias: str,
    rows: Sequence[tuple[Any, ...]],
    *,
    delay: float = 0.0,
    notify: bool = True,
    ids: Sequence[int] = (),
) -> None:
    """Insert queue rows ``(queue, message_id, topic, key, headers_json, body, attempt,
    published_at)`` in the caller's transaction, due after ``delay`` seconds; ``ids``:
    under these ids (rows claimed in this transaction, put back at their place)."""
    dialect = dialect_for(alias)
    due = dialect.later if delay > 0 else dialect.now
    sql = (
        f"INSERT INTO {table_name(alias)} "  # noqa: S608 - identifiers from the model, values are parameters
        f"({'id, ' if ids else ''}queue, message_id, topic, key, headers, body, attempt, "
        "published_at, available_at) "
        f"VALUES ({'%s, ' if ids else ''}%s, %s, %s, %s, {dialect.headers_in}, %s, %s, %s, {due})"
    )
    adapt = connections[alias].ops.adapt_datetimefield_value
    params = [(*row[:7], adapt(row[7])) for row in rows]
    if ids:
        params = [(pk, *row) for pk, row in zip(ids, params, strict=True)]
    if delay > 0:
        params = [(*row, dialect.later_param(delay)) for row in params]
    with connections[alias].cursor() as cursor:
        cursor.executemany(sql, params)
        if notify and dialect.listens:
            cursor.execute("SELECT pg_notify(%s, '')", [CHANNEL])


def queue_row(queue: str, message: OutgoingMessage | None = None, **values: Any) -> tuple[Any, ...]:
    """One row for :func:`insert_rows` (from ``message``, or from ``values``)."""
    if message is not None:
        values = {
            "message_id": message.message_id,
            "topic": message.topic,
            "headers": message.headers,
            "body": message.body,
            "published_at": message.timestamp,
        }
    headers = json_safe(dict(values["headers"] or {}))
    key = headers.get(KEY_HEADER)
    try:
        attempt = parse_attempt(headers.get(ATTEMPT_HEADER))
    except Poison:
        attempt = 1  # the consumer dead-letters it; the column is informative only
    stamp = values["published_at"]
    if isinstance(stamp, int | float) and not isinstance(stamp, bool):
        stamp = as_project(datetime.fromtimestamp(stamp, tz=UTC))
    return (
        queue,
        values["message_id"],
        values["topic"] or "",
        key if isinstance(key, str) and key else None,
        json.dumps(headers, separators=(",", ":")),
        bytes(values["body"]),
        attempt,
        stamp if isinstance(stamp, datetime) else None,
    )


def claim_rows(
    alias: str, dialect: Dialect, queue: str, limit: int, *, head_only: bool = False
) -> list[tuple[Any, ...]]:
    """Delete (claim) up to ``limit`` due rows of ``queue``, oldest first, in the caller's
    transaction; the rows as ``(id, queue, message_id, topic, key, headers, body,
    published_at)``.  ``head_only`` (an ordered consumer's queue): only the first row,
    and only once it is due (a retry put back in place holds the rows behind it).

    The ``(queue, id)`` index is walked, so other queues' rows (an unrouted backlog, a
    stopped consumer's queue) are never scanned.  The queue is written as a range:
    with ``queue = %s`` PostgreSQL's planner may walk the primary key instead,
    expecting this queue's rows to be spread evenly among the others.
    """
    table = table_name(alias)
    due = f"available_at <= {dialect.now}"
    sql = (
        f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} "  # noqa: S608
        f"WHERE queue >= %s AND queue <= %s {'' if head_only else 'AND ' + due} "
        f"ORDER BY queue, id LIMIT %s {dialect.lock}) {'AND ' + due if head_only else ''} "
        f"RETURNING {_COLUMNS.format(headers=dialect.headers_out)}"
    )
    with connections[alias].cursor() as cursor:
        cursor.execute(sql, [queue, queue, limit])
        return sorted(cursor.fetchall())


def due_in(
    alias: str, dialect: Dialect, queues: Sequence[str], heads: Collection[str] = ()
) -> dict[str, float]:
    """Seconds until the next row of each non-empty queue of ``queues`` is due (one query;
    each ``MIN`` is read from the ``(queue, available_at)`` index); for the queues in
    ``heads`` (ordered consumers'), until their first row is."""
    table = table_name(alias)
    first = dialect.due_in.format(due="available_at")
    soonest = dialect.due_in.format(due="MIN(available_at)")
    sql = " UNION ALL ".join(
        f"SELECT {index}, {first} FROM (SELECT available_at FROM {table} "  # noqa: S608
        "WHERE queue = %s ORDER BY id LIMIT 1) AS head"
        if queue in heads
        else f"SELECT {index}, {soonest} FROM {table} WHERE queue = %s"  # noqa: S608
        for index, queue in enumerate(queues)
    )
    with connections[alias].cursor() as cursor:
        cursor.execute(sql, list(queues))
        rows = cursor.fetchall()
    return {queues[index]: float(seconds) for index, seconds in rows if seconds is not None}


def delete_queues(alias: str, queues: Sequence[str]) -> int:
    """Delete every row of ``queues`` (a consumer removed from the code); how many."""
    deleted, _ = QueuedMessage.objects.using(alias).filter(queue__in=list(queues)).delete()
    return int(deleted)


def load_headers(text: Any) -> dict[str, Any]:
    """The headers of a claimed row (JSON text, or a dict), ``{}`` when unreadable."""
    if isinstance(text, dict):
        return text
    try:
        value = json.loads(text) if text else {}
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def depths(alias: str, dialect: Dialect, queues: Sequence[str]) -> dict[str, tuple[int, int]]:
    """The rows of each queue of ``queues``, as (due now, due later: retries waiting for
    their delay), in one query over the ``(queue, available_at)`` index; a queue without
    rows is left out."""
    if not queues:
        return {}
    table = table_name(alias)
    marks = ", ".join(["%s"] * len(queues))
    sql = (
        f"SELECT queue, COUNT(*), SUM(CASE WHEN available_at > {dialect.now} THEN 1 ELSE 0 END) "  # noqa: S608
        f"FROM {table} WHERE queue IN ({marks}) GROUP BY queue"
    )
    with connections[alias].cursor() as cursor:
        cursor.execute(sql, list(queues))
        rows = cursor.fetchall()
    return {queue: (int(total) - int(later or 0), int(later or 0)) for queue, total, later in rows}
