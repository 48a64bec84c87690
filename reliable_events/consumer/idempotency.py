"""Has this consumer already applied this message? The ``ProcessedMessage`` insert.

One ``INSERT ... ON CONFLICT DO NOTHING`` in the handler's transaction; on psycopg 3 it
is sent together with ``BEGIN`` (one round trip), fenced by the checks in
:func:`_begin_and_insert`.
"""

from __future__ import annotations

import logging
from typing import Any

from django.db import (
    connections,
    transaction,
)

logger = logging.getLogger(__name__)


# -- the idempotency record -----------------------------------------------------------------
def record_processed(alias: str, consumer: str, message_id: str, topic: str) -> bool:
    """Insert the ``ProcessedMessage`` row; ``False`` if this consumer already has it.

    Runs inside the caller's transaction.  On PostgreSQL and SQLite this is one
    ``INSERT ... ON CONFLICT DO NOTHING``: a concurrent duplicate waits on the unique index
    until the first transaction ends, then inserts nothing.
    """
    return insert_record(connections[alias], consumer, message_id, topic)


_INSERT_SQL: dict[str, str] = {}


def _insert_sql(connection: Any) -> str:
    sql = _INSERT_SQL.get(connection.vendor)
    if sql is None:
        # Lazy (both here and below): this module is imported with EventConsumer, before
        # Django's apps are loaded; the models need the app registry.
        from reliable_events.models import ProcessedMessage

        quote = connection.ops.quote_name
        # Identifiers come from the model and are quoted; the values are parameters.
        table = quote(ProcessedMessage._meta.db_table)
        consumer_col, id_col, topic_col = quote("consumer"), quote("message_id"), quote("topic")
        sql = _INSERT_SQL[connection.vendor] = (
            f"INSERT INTO {table} ({consumer_col}, {id_col}, {topic_col}) "  # noqa: S608
            f"VALUES (%s, %s, %s) ON CONFLICT ({consumer_col}, {id_col}) DO NOTHING"
        )
    return sql


def insert_record(connection: Any, consumer: str, message_id: str, topic: str) -> bool:
    params = [consumer, message_id, topic[:255]]
    if connection.vendor == "postgresql":
        inserted = _begin_and_insert(connection, params)
        if inserted is not None:
            return inserted
        fast = _server_side_cursor(connection.connection)
        if fast is not None:
            # psycopg 3 with server-side binding: the statement is prepared once per
            # connection (this runs for every message, in the handler's transaction).
            with fast(connection.connection) as cursor:
                cursor.execute(_insert_sql(connection), params)
                return bool(cursor.rowcount == 1)
    if connection.vendor in ("postgresql", "sqlite"):
        with connection.cursor() as cursor:
            cursor.execute(_insert_sql(connection), params)
            return bool(cursor.rowcount == 1)
    from django.db import IntegrityError

    from reliable_events.models import ProcessedMessage

    try:
        with transaction.atomic(using=connection.alias):
            ProcessedMessage.objects.using(connection.alias).create(
                consumer=consumer, message_id=message_id, topic=topic[:255]
            )
    except IntegrityError:
        return False
    return True


def _idle_libpq(connection: Any) -> tuple[Any, Any] | None:
    """psycopg 3's libpq connection of ``connection`` and its ``pq`` module, when it is
    not in autocommit and no transaction is open; ``None`` otherwise (psycopg2 too)."""
    raw = connection.connection
    try:
        import psycopg
        from psycopg import pq
    except ImportError:  # psycopg2, or no PostgreSQL driver
        return None
    if not isinstance(raw, psycopg.Connection) or raw.autocommit:
        return None
    if raw.pgconn.transaction_status != pq.TransactionStatus.IDLE:
        return None
    return raw.pgconn, pq


def _run(pgconn: Any, sql: bytes, expected: Any) -> Any:
    """Run ``sql`` on libpq; psycopg's own errors when its status is not ``expected``
    (``OperationalError`` when the connection is gone)."""
    import psycopg  # there: _idle_libpq found a psycopg 3 connection

    result = pgconn.exec_(sql)
    if result.status != expected:
        message = (result.error_message or b"").decode("utf-8", "replace")
        if pgconn.status != psycopg.pq.ConnStatus.OK:
            raise psycopg.OperationalError(f"connection lost: {message}")
        raise psycopg.DatabaseError(message)
    return result


def _begin_and_insert(connection: Any, params: list[str]) -> bool | None:
    """psycopg 3, at the start of a transaction: ``BEGIN`` and the insert in one round
    trip (one simple-protocol query, values escaped by libpq) instead of two.

    ``None`` when this does not apply (another driver, or a transaction already open).
    psycopg reads the transaction status from libpq, so it then sees the transaction
    open and sends no ``BEGIN`` of its own; Django commits or rolls it back as usual.
    """
    idle = _idle_libpq(connection)
    if idle is None:
        return None
    pgconn, pq = idle
    escape = pq.Escaping(pgconn).escape_literal
    values = b", ".join(escape(value.encode()) for value in params)
    sql = _insert_sql(connection).replace("%s, %s, %s", "{}").encode()
    result = _run(pgconn, b"BEGIN; " + sql.replace(b"{}", values), pq.ExecStatus.COMMAND_OK)
    return bool(result.command_tuples == 1)


def _server_side_cursor(raw: Any) -> Any:
    """psycopg 3's server-side-binding cursor class for ``raw``, else ``None``."""
    try:
        import psycopg
    except ImportError:  # psycopg2, or no PostgreSQL driver
        return None
    return psycopg.Cursor if isinstance(raw, psycopg.Connection) else None


# -- a batch's idempotency records ------------------------------------------------------------
#: Rows per multi-row insert (SQLite allows 32,766 parameters; three per row).
_ROWS_PER_STATEMENT = 500


def insert_records(connection: Any, consumer: str, records: list[tuple[str, str]]) -> set[str]:
    """Insert the ``ProcessedMessage`` rows of a batch, ``(message_id, topic)`` each, in
    one statement; the message ids this consumer did not have yet.

    Runs inside the caller's transaction.  The rows go in sorted by message id, so that two
    consumers inserting overlapping batches (duplicate deliveries) wait on each other's
    unique index entries in the same order instead of deadlocking.  An id given twice is
    inserted once.
    """
    unique = sorted({message_id: topic[:255] for message_id, topic in records}.items())
    if connection.vendor == "postgresql":
        inserted = _begin_and_insert_many(connection, consumer, unique)
        if inserted is not None:
            return inserted
        with connection.cursor() as cursor:
            cursor.execute(
                _unnest_sql(connection),
                [consumer, [m for m, _ in unique], [t for _, t in unique]],
            )
            return {row[0] for row in cursor.fetchall()}
    if connection.vendor == "sqlite":
        fresh: set[str] = set()
        for start in range(0, len(unique), _ROWS_PER_STATEMENT):
            chunk = unique[start : start + _ROWS_PER_STATEMENT]
            values = ", ".join(["(%s, %s, %s)"] * len(chunk))
            params = [value for row in chunk for value in (consumer, *row)]
            sql = _insert_sql(connection).replace("VALUES (%s, %s, %s)", f"VALUES {values}")
            with connection.cursor() as cursor:
                cursor.execute(f"{sql} RETURNING {connection.ops.quote_name('message_id')}", params)
                fresh.update(row[0] for row in cursor.fetchall())
        return fresh
    return {
        message_id
        for message_id, topic in unique
        if insert_record(connection, consumer, message_id, topic)
    }


def delete_records(connection: Any, consumer: str, message_ids: set[str]) -> None:
    """Delete this consumer's records of ``message_ids`` (their handlers were rolled back
    to their savepoints: a later delivery must run them again).  In the caller's
    transaction."""
    if not message_ids:
        return
    # Lazy, as in _insert_sql: the models need the app registry.
    from reliable_events.models import ProcessedMessage

    ProcessedMessage.objects.using(connection.alias).filter(
        consumer=consumer, message_id__in=sorted(message_ids)
    ).delete()


_UNNEST_SQL: dict[str, str] = {}


def _unnest_sql(connection: Any) -> str:
    sql = _UNNEST_SQL.get(connection.vendor)
    if sql is None:
        head = _insert_sql(connection).split(" VALUES ", 1)[0]
        conflict = _insert_sql(connection).split(" ON CONFLICT ", 1)[1]
        sql = _UNNEST_SQL[connection.vendor] = (
            f"{head} SELECT %s, unnest(%s::text[]), unnest(%s::text[]) "
            f"ON CONFLICT {conflict} RETURNING {connection.ops.quote_name('message_id')}"
        )
    return sql


def _begin_and_insert_many(
    connection: Any, consumer: str, rows: list[tuple[str, str]]
) -> set[str] | None:
    """psycopg 3, at the start of a transaction: ``BEGIN`` and the batch's insert in one
    round trip (see :func:`_begin_and_insert`); ``None`` when this does not apply."""
    idle = _idle_libpq(connection)
    if idle is None:
        return None
    pgconn, pq = idle
    escape = pq.Escaping(pgconn).escape_literal
    name = escape(consumer.encode())
    values = b", ".join(
        b"(" + name + b", " + escape(message_id.encode()) + b", " + escape(topic.encode()) + b")"
        for message_id, topic in rows
    )
    sql = _insert_sql(connection).replace("%s, %s, %s", "{}").encode()
    sql = sql.replace(b"({})", values)
    returning = f" RETURNING {connection.ops.quote_name('message_id')}".encode()
    result = _run(pgconn, b"BEGIN; " + sql + returning, pq.ExecStatus.TUPLES_OK)
    return {(result.get_value(row, 0) or b"").decode("utf-8") for row in range(result.ntuples)}
