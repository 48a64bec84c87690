"""How does a PostgreSQL connection ``LISTEN`` and wait for a ``NOTIFY``, on either driver?

Django runs PostgreSQL on psycopg 3 or on psycopg2, and their notification APIs differ:
psycopg 3 has ``Connection.notifies(timeout=..., stop_after=...)``, a generator; psycopg2
has ``poll()``, which moves what arrived into the ``notifies`` list, and waits with
``select`` on the connection.  The relay daemon (woken by the on-commit hook) and the
``db://`` transport's consumers (woken by a publish) use these functions on a raw driver
connection in autocommit.  Driver errors propagate as the driver's own (callers wrap them
with Django's ``wrap_database_errors`` or treat any error as a lost connection).
"""

from __future__ import annotations

import select
from typing import Any, cast

from django.db import connections


def _is_psycopg2(raw: Any) -> bool:
    return isinstance(getattr(raw, "notifies", None), list)


def connect(alias: str) -> Any:
    """A new driver connection to the database of ``alias``, in autocommit, for listening
    (Django's connection parameters, without its pool or wrapper)."""
    wrapper = connections[alias]
    driver = cast(Any, wrapper).Database  # the PostgreSQL backend's driver module
    raw = driver.connect(**wrapper.get_connection_params())
    raw.autocommit = True
    return raw


def listen(raw: Any, channel: str) -> None:
    """``LISTEN channel`` on ``raw`` (in autocommit: it takes effect at once)."""
    with raw.cursor() as cursor:
        cursor.execute(f"LISTEN {channel}")


def wait(raw: Any, seconds: float) -> bool:
    """Whether a notification came on ``raw`` within ``seconds``; every notification that
    came by then is consumed."""
    if not _is_psycopg2(raw):
        woken = any(True for _ in raw.notifies(timeout=seconds, stop_after=1))
        drain(raw)
        return woken
    raw.poll()
    if not raw.notifies and seconds > 0:
        ready, _, _ = select.select([raw], [], [], seconds)
        if ready:
            raw.poll()
    woken = bool(raw.notifies)
    del raw.notifies[:]
    return woken


def drain(raw: Any) -> None:
    """Consume the notifications that already came on ``raw``, without waiting."""
    if _is_psycopg2(raw):
        raw.poll()
        del raw.notifies[:]
        return
    for _ in raw.notifies(timeout=0):
        pass
