"""Is the database there? Connection checks and the outage guard of the consume loop."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import Any

from django.db import (
    DEFAULT_DB_ALIAS,
    DatabaseError,
    InterfaceError,
    OperationalError,
    connections,
)

from reliable_events.exceptions import (
    DatabaseUnavailable,
)

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def database_guard(alias: str, doing: str) -> Iterator[None]:
    """Run bookkeeping writes; a broken connection becomes :class:`DatabaseUnavailable`."""
    try:
        before = raw_connection(alias)
    except (DatabaseError, InterfaceError) as exc:
        raise DatabaseUnavailable(f"database {alias!r} unavailable while {doing}") from exc
    try:
        yield
    except (DatabaseError, InterfaceError) as exc:
        # OperationalError is the database's "not now" (lost connection, SQLite's
        # "database is locked", a statement or lock timeout): wait and try again.
        if isinstance(exc, OperationalError) or database_lost(alias, before):
            raise DatabaseUnavailable(
                f"database {alias!r} failed while {doing}: {type(exc).__name__}"
            ) from exc
        raise


def raw_connection(alias: str) -> Any:
    """The driver connection behind ``alias``, connecting first if needed."""
    connection = connections[alias]
    connection.ensure_connection()
    return connection.connection


def database_lost(alias: str, before: Any = None) -> bool:
    """Whether the connection ``alias`` broke (as opposed to a statement failing).

    ``before`` is the driver connection from before the failed work: when Django had to
    drop it (a rollback on a dead connection fails) it may already have opened a new one
    when the transaction ended, so a different connection object also means "lost".
    """
    connection = connections[alias]
    current = connection.connection
    if current is None or (before is not None and current is not before):
        return True
    try:
        return not connection.is_usable()
    except (DatabaseError, InterfaceError):  # pragma: no cover - is_usable catches these
        return True


def close_stale_connections() -> None:
    """Django's ``close_old_connections`` for connections not inside a transaction."""
    for conn in connections.all(initialized_only=True):
        if not conn.in_atomic_block:
            conn.close_if_unusable_or_obsolete()


def close_all_connections(aliases: Iterable[str]) -> None:
    for alias in aliases:
        conn = connections[alias]
        if conn.in_atomic_block:
            continue
        try:
            conn.close()
        except Exception:  # a broken connection may fail to close; it is gone anyway
            logger.debug("reliable_events: closing a broken connection failed", exc_info=True)


def database_answers(alias: str = DEFAULT_DB_ALIAS) -> bool:
    try:
        with connections[alias].cursor() as cursor:
            cursor.execute("SELECT 1")
    except (DatabaseError, InterfaceError):
        return False
    return True
