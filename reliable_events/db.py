"""Which database? Alias resolution (routers, ``using=``, ``db://`` URLs) and vendor checks.

The one place an alias is looked up: a model's rows are read or written where ``using``
says, else where Django's routers send them, else in the default database.  It imports
no model (consumer classes, and so this module, load before the app registry), so the
callers pass the model.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from django.apps import apps
from django.db import DEFAULT_DB_ALIAS, connections, router
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
