"""Which database, and how? Alias resolution (routers, ``using=``, ``db://`` URLs), vendor
checks and the app's own transactions (:func:`own_transaction`).

The one place an alias is looked up: a model's rows are read or written where ``using``
says, else where Django's routers send them, else in the default database.  It imports
no model (consumer classes, and so this module, load before the app registry), so the
callers pass the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from django.apps import apps
from django.db import DEFAULT_DB_ALIAS, connections, router, transaction
from django.db.models import Model

from reliable_events.exceptions import ConfigurationError


def write_alias(model: type[Model], using: str | None = None) -> str:
    """``using``, else the database the routers write ``model`` to, else the default."""
    return using or router.db_for_write(model) or DEFAULT_DB_ALIAS


def read_alias(model: type[Model], using: str | None = None) -> str:
    """``using``, else the database the routers read ``model`` from, else the default."""
    return using or router.db_for_read(model) or DEFAULT_DB_ALIAS


def queue_alias(url: str) -> str:
    """The database of a ``db://`` broker URL: ``db://<alias>``, or (``db://``) where the
    routers write the database transport's queue rows."""
    alias = urlsplit(url).netloc
    if not alias:
        return write_alias(apps.get_model("reliable_events", "QueuedMessage"))
    if alias not in connections:
        raise ConfigurationError(f"{url!r}: there is no database alias {alias!r} in DATABASES")
    return alias


def is_postgres(alias: str) -> bool:
    return connections[alias].vendor == "postgresql"


#: Isolation levels stricter than READ COMMITTED: as Django names them (``OPTIONS``) and
#: as PostgreSQL's ``SHOW`` spells them (a database's or role's default).
_STRICTER = {"REPEATABLE_READ", "SERIALIZABLE", "repeatable read", "serializable"}


def _stricter_isolation(alias: str) -> bool:
    """Whether transactions on ``alias`` start above READ COMMITTED (PostgreSQL): the
    project's ``OPTIONS["isolation_level"]``, else the server's default for this session
    (asked once per connection, in autocommit)."""
    wrapper: Any = connections[alias]
    wrapper.ensure_connection()
    raw = wrapper.connection
    cached = getattr(wrapper, "_reliable_events_stricter", None)
    if cached is not None and cached[0] is raw:
        return bool(cached[1])
    if "isolation_level" in wrapper.settings_dict.get("OPTIONS", {}):
        stricter = wrapper.isolation_level.name in _STRICTER
    else:
        with wrapper.cursor() as cursor:
            cursor.execute("SHOW default_transaction_isolation")
            stricter = cursor.fetchone()[0] in _STRICTER
    wrapper._reliable_events_stricter = (raw, stricter)
    return stricter


@contextmanager
def own_transaction(alias: str) -> Iterator[None]:
    """``transaction.atomic(using=alias)`` for the app's own bookkeeping (claims, locks,
    dead letters, holds), at READ COMMITTED whatever the project's default.

    These transactions serialise on a lock (advisory or row) and then read what the
    holder committed; above READ COMMITTED their snapshot would predate the lock (stale
    reads, serialization failures).  Inside a caller's transaction the caller's level
    stays (it cannot change once a query ran); on PostgreSQL an outermost one starts
    with ``SET TRANSACTION ISOLATION LEVEL READ COMMITTED`` when the session would start
    it higher (no extra statement at the default).
    """
    outermost = not connections[alias].in_atomic_block
    stricter = outermost and is_postgres(alias) and _stricter_isolation(alias)
    with transaction.atomic(using=alias):
        if stricter:
            with connections[alias].cursor() as cursor:
                cursor.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
        yield
