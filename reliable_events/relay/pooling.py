"""Is this PostgreSQL connection behind a transaction-pooling pooler (PgBouncer)?

Everything the relay, the on-commit hook and the consumers do on PostgreSQL lives in one
transaction (lane leases, ``SET LOCAL``-style ``set_config(..., true)``, transaction-level
advisory locks), so it works through PgBouncer in ``pool_mode = transaction``.  The one
session feature left is the relay daemon's ``LISTEN`` (woken by the on-commit hook's
``NOTIFY``): behind such a pooler the ``LISTEN`` stays on whichever server connection ran
it and the daemon would never hear a wake-up.  ``RELAY_LISTEN`` says what to do: ``True``
listen, ``False`` poll (every ``RELAY_IDLE_SECONDS``), ``None`` (default) detect.
"""

from __future__ import annotations

import weakref
from typing import Any

from django.db.backends.base.base import BaseDatabaseWrapper

from reliable_events.conf import app_settings

_detected: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def behind_pooler(connection: BaseDatabaseWrapper) -> bool:
    """Whether ``connection`` (PostgreSQL, connected) goes through a pooler.

    A server reports its process id when a client connects (psycopg's
    ``info.backend_pid``); a pooler answers the connect itself with an id of its own, so
    it differs from ``pg_backend_pid()`` of the server process that runs the statements.
    Detected once per database connection.
    """
    connection.ensure_connection()
    raw = connection.connection
    if raw in _detected:
        return _detected[raw]
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        server_pid = int(cursor.fetchone()[0])
    reported = getattr(getattr(raw, "info", None), "backend_pid", server_pid)
    _detected[raw] = int(reported) != server_pid
    return _detected[raw]


def listen_works(connection: BaseDatabaseWrapper) -> bool:
    """Whether the relay daemon may ``LISTEN`` on ``connection`` (``RELAY_LISTEN``)."""
    setting = app_settings.RELAY_LISTEN
    if setting is not None:
        return bool(setting)
    return not behind_pooler(connection)
