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


def _begin_and_insert(connection: Any, params: list[str]) -> bool | None:
    """psycopg 3, at the start of a transaction: ``BEGIN`` and the insert in one round
    trip (one simple-protocol query, values escaped by libpq) instead of two.

    ``None`` when this does not apply (another driver, or a transaction already open).
    psycopg reads the transaction status from libpq, so it then sees the transaction
    open and sends no ``BEGIN`` of its own; Django commits or rolls it back as usual.
    """
    raw = connection.connection
    try:
        import psycopg
        from psycopg import pq
    except ImportError:  # psycopg2, or no PostgreSQL driver
        return None
    if not isinstance(raw, psycopg.Connection) or raw.autocommit:
        return None
    pgconn = raw.pgconn
    if pgconn.transaction_status != pq.TransactionStatus.IDLE:
        return None
    escape = pq.Escaping(pgconn).escape_literal
    values = b", ".join(escape(value.encode()) for value in params)
    sql = _insert_sql(connection).replace("%s, %s, %s", "{}").encode()
    result = pgconn.exec_(b"BEGIN; " + sql.replace(b"{}", values))
    if result.status != pq.ExecStatus.COMMAND_OK:
        message = (result.error_message or b"").decode("utf-8", "replace")
        if pgconn.status != pq.ConnStatus.OK:
            raise psycopg.OperationalError(f"connection lost: {message}")
        raise psycopg.DatabaseError(message)
    return bool(result.command_tuples == 1)


def _server_side_cursor(raw: Any) -> Any:
    """psycopg 3's server-side-binding cursor class for ``raw``, else ``None``."""
    try:
        import psycopg
    except ImportError:  # psycopg2, or no PostgreSQL driver
        return None
    return psycopg.Cursor if isinstance(raw, psycopg.Connection) else None
