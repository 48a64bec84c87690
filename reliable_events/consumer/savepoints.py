"""How does each handler of a batch get its own savepoint, cheaply?

``SAVEPOINT`` once per message is the price of rolling one handler back alone; on
psycopg 3 it is sent straight through libpq (a fraction of the cost of a Django cursor
round trip), with Django's own bookkeeping (the savepoint name sequence) kept, so that
``savepoint_rollback`` and nested ``transaction.atomic()`` blocks work as usual.
"""

from __future__ import annotations

from typing import Any


def create_savepoint(connection: Any) -> str | None:
    """Create a savepoint in the open transaction of ``connection`` (a Django connection);
    its id for ``connection.savepoint_rollback``, ``None`` without savepoint support."""
    raw = connection.connection
    try:
        import psycopg
        from psycopg import pq
    except ImportError:  # psycopg2, or no PostgreSQL driver
        return connection.savepoint()  # type: ignore[no-any-return]
    if connection.vendor != "postgresql" or not isinstance(raw, psycopg.Connection):
        return connection.savepoint()  # type: ignore[no-any-return]
    connection.validate_thread_sharing()
    connection.savepoint_state += 1
    sid = f"re_batch_{connection.savepoint_state}"
    pgconn = raw.pgconn
    result = pgconn.exec_(connection.ops.savepoint_create_sql(sid).encode())
    if result.status != pq.ExecStatus.COMMAND_OK:
        message = (result.error_message or b"").decode("utf-8", "replace")
        if pgconn.status != pq.ConnStatus.OK:
            raise psycopg.OperationalError(f"connection lost: {message}")
        raise psycopg.DatabaseError(message)
    return sid
