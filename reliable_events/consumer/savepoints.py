"""How does each handler of a batch get its own savepoint, cheaply?

``SAVEPOINT`` once per message is the price of rolling one handler back alone; sent on
its own it costs a database round trip per message, as much as the handler's own
insert.  So on psycopg 3 (Django's default client-side-binding cursor, which speaks the
simple query protocol) the ``SAVEPOINT`` is not sent by itself: it travels in front of
the handler's first statement, in the same round trip (``SAVEPOINT ...; INSERT ...``),
and the cursor is moved on to that statement's result.  A handler that runs no statement
needs no savepoint at all.  Anything else (another driver, server-side binding,
``executemany``) sends it alone first.  Django's bookkeeping is kept: the savepoint's id
is on ``connection.savepoint_ids`` while the handler runs, so that its on-commit
callbacks are dropped with it.

Every handler's savepoint has the same SQL name, so that ``SAVEPOINT ...; INSERT ...`` is
the same text for every event: psycopg parses a query once per distinct text (a cache of
128), and a name per event made every one of them a new text, parsed again and pushing
the handlers' other statements out of that cache.  ``ROLLBACK TO SAVEPOINT`` goes back to
the most recent savepoint of a name (PostgreSQL, SQLite and MySQL alike): the running
handler's, the older ones being its predecessors'.  The unique id (Django's bookkeeping)
stays per handler.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: The SQL name of every handler's savepoint.
SQL_NAME = "re_handler"
#: ``SAVEPOINT`` and ``ROLLBACK TO SAVEPOINT`` of :data:`SQL_NAME`, by database vendor.
_STATEMENTS: dict[str, tuple[str, str]] = {}


class HandlerSavepoint:
    """The savepoint of one handler call; a Django execute wrapper while it runs."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        connection.savepoint_state += 1
        self.sid = f"re_batch_{connection.savepoint_state}"
        statements = _STATEMENTS.get(connection.vendor)
        if statements is None:
            ops = connection.ops
            statements = _STATEMENTS[connection.vendor] = (
                ops.savepoint_create_sql(SQL_NAME),
                ops.savepoint_rollback_sql(SQL_NAME),
            )
        self.sql = statements[0]
        self.rollback_sql = statements[1]
        #: The ``SAVEPOINT`` was sent (a statement ran since the savepoint began).
        self.created = False

    def __enter__(self) -> HandlerSavepoint:
        self.connection.validate_thread_sharing()
        self.connection.savepoint_ids.append(self.sid)
        self.connection.execute_wrappers.append(self)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.connection.execute_wrappers.remove(self)
        self.connection.savepoint_ids.pop()

    def __call__(
        self, execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any
    ) -> Any:
        if self.created:
            return execute(sql, params, many, context)
        self.created = True
        cursor = context["cursor"].cursor
        if many or not _speaks_simple_protocol(cursor):
            cursor.execute(self.sql)
            return execute(sql, params, many, context)
        result = execute(f"{self.sql}; {sql}", params, many, context)
        cursor.nextset()  # on to the handler's statement's own result
        return result

    def rollback(self) -> None:
        """Undo everything the handler did; its on-commit callbacks are dropped."""
        connection = self.connection
        # Set when the handler swallowed a database error; Django refuses any statement
        # until it is cleared (as its own atomic() does before rolling back).
        connection.needs_rollback = False
        if self.created:  # else no statement ran: nothing to undo in the database
            with connection.cursor() as cursor:
                cursor.execute(self.rollback_sql)
        connection.run_on_commit = [
            entry for entry in connection.run_on_commit if self.sid not in entry[0]
        ]


def _client_cursor_class() -> type | None:
    try:
        import psycopg
    except ImportError:  # psycopg2, or no PostgreSQL driver
        return None
    return psycopg.ClientCursor


#: psycopg 3's client-side-binding cursor class, looked up once (``None``: no psycopg 3).
_CLIENT_CURSOR: list[type | None] = []


def _speaks_simple_protocol(cursor: Any) -> bool:
    """psycopg 3's client-side-binding cursor (several statements in one query)."""
    if not _CLIENT_CURSOR:
        _CLIENT_CURSOR.append(_client_cursor_class())
    client = _CLIENT_CURSOR[0]
    return client is not None and isinstance(cursor, client)
