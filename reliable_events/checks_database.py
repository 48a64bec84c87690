"""Is the database set up for the app's processes?  System checks of ``DATABASES``:
a pooled PostgreSQL without session state (``W004``), SQLite's UTC clock under
``USE_TZ = False`` (``E013``), and SQLite options for several writing processes
(``W006``)."""

from __future__ import annotations

from contextlib import suppress
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from django.apps import apps
from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning
from django.db import connections

from reliable_events.broker_url import own_transport
from reliable_events.conf import app_settings
from reliable_events.db import queue_alias, write_alias
from reliable_events.exceptions import ConfigurationError

DOCS = "See docs/settings.md."


def check_pooled_databases() -> list[CheckMessage]:
    """A PostgreSQL ``DATABASES`` entry that declares a transaction-pooling pooler
    (``DISABLE_SERVER_SIDE_CURSORS``, as Django's docs ask for PgBouncer) must not use
    session features: psycopg's prepared statements, startup ``options``, or a relay that
    is told to ``LISTEN`` there."""
    messages: list[CheckMessage] = []
    databases: dict[str, dict[str, Any]] = settings.DATABASES
    for alias, database in databases.items():
        if "postgresql" not in str(database.get("ENGINE", "")):
            continue
        if not database.get("DISABLE_SERVER_SIDE_CURSORS"):
            continue
        options = database.get("OPTIONS") or {}
        problems = []
        if options.get("prepare_threshold", 5) is not None:
            problems.append('psycopg prepares statements: set OPTIONS["prepare_threshold"] = None')
        if "-c" in str(options.get("options", "")):
            problems.append('OPTIONS["options"] sets session parameters the pooler drops')
        if app_settings.RELAY_LISTEN is True:
            problems.append("RELIABLE_EVENTS['RELAY_LISTEN'] is True: relays would miss wake-ups")
        if problems:
            messages.append(
                Warning(
                    f"DATABASES[{alias!r}] looks pooled (DISABLE_SERVER_SIDE_CURSORS) but uses "
                    "session state: " + "; ".join(problems) + ".",
                    hint="See docs/relay.md, 'PostgreSQL behind PgBouncer'.",
                    id="reliable_events.W004",
                )
            )
    return messages


def _keeps_utc(name: str | None) -> bool:
    """Whether the time zone ``name`` (``None``: the process's) is UTC all year."""
    zone = ZoneInfo(name) if name else None
    year = datetime.now(UTC).year
    return not any(
        datetime(year, month, 1, tzinfo=UTC).astimezone(zone).utcoffset() for month in (1, 7)
    )


def check_sqlite_clock() -> list[CheckMessage]:
    """SQLite's clock (``CURRENT_TIMESTAMP``, the ``now()`` the relay and the consumers
    compare due times with) counts in UTC, while under ``USE_TZ = False`` Django stores
    naive datetimes in ``TIME_ZONE``: every due time would be off by the zone's offset
    (east of UTC, rows wait that many hours; west, back-off is skipped)."""
    if settings.USE_TZ or _keeps_utc(settings.TIME_ZONE):
        return []
    aliases = {write_alias(model) for model in apps.get_app_config("reliable_events").get_models()}
    found = sorted(alias for alias in aliases if connections[alias].vendor == "sqlite")
    if not found:
        return []
    return [
        Error(
            f"USE_TZ = False with TIME_ZONE = {settings.TIME_ZONE!r} on SQLite "
            f"(DATABASES {', '.join(map(repr, found))}): SQLite's clock is UTC, so every "
            "due time of an outbox or queue row would be off by the time zone's offset.",
            hint="Set USE_TZ = True (Django's default) or TIME_ZONE = 'UTC'. " + DOCS,
            id="reliable_events.E013",
        )
    ]


#: A SQLite lock wait (seconds) below which concurrent writers fail (Python's default: 5).
SQLITE_MIN_TIMEOUT = 20.0
SQLITE_OPTIONS = (
    '"OPTIONS": {"timeout": 30, "transaction_mode": "IMMEDIATE", '
    '"init_command": "PRAGMA journal_mode=WAL;"}'
)


def sqlite_option_problems(database: dict[str, Any]) -> list[str]:
    """What a SQLite ``DATABASES`` entry lacks for several writing processes."""
    options = database.get("OPTIONS") or {}
    problems = []
    if str(options.get("transaction_mode", "")).upper() not in ("IMMEDIATE", "EXCLUSIVE"):
        problems.append('no OPTIONS["transaction_mode"] = "IMMEDIATE"')
    timeout = options.get("timeout", 5)
    try:
        too_short = float(timeout) < SQLITE_MIN_TIMEOUT
    except (TypeError, ValueError):
        too_short = True
    if too_short:
        problems.append(f'OPTIONS["timeout"] is {timeout!r} s')
    return problems


def check_sqlite_writers() -> list[CheckMessage]:
    """A SQLite file the app writes to is shared by the web, relay and consumer processes:
    without ``transaction_mode = "IMMEDIATE"`` a transaction that reads first and then
    writes fails at once with "database is locked" when another holds the lock, and
    with Python's 5 s timeout a writer gives up early (a trial with ``startproject``'s
    settings: 851 of 1,200 concurrent publishes failed)."""
    aliases = {write_alias(model) for model in apps.get_app_config("reliable_events").get_models()}
    url = str(app_settings.BROKER_URL)
    with suppress(ConfigurationError, ValueError):  # a bad URL: E002 says what is wrong
        if own_transport(url) is not None:
            aliases.add(queue_alias(url))
    messages: list[CheckMessage] = []
    for alias in sorted(aliases):
        database = settings.DATABASES.get(alias) or {}
        if "sqlite3" not in str(database.get("ENGINE", "")):
            continue
        if getattr(connections[alias], "is_in_memory_db", bool)():
            continue  # one process: nobody to wait for
        problems = sqlite_option_problems(database)
        if problems:
            messages.append(
                Warning(
                    f"DATABASES[{alias!r}] is a SQLite file that the web, relay and consumer "
                    "processes all write to (" + "; ".join(problems) + "): concurrent "
                    'transactions fail with "database is locked".',
                    hint=f"Set {SQLITE_OPTIONS} (docs/relay.md, 'SQLite').",
                    id="reliable_events.W006",
                )
            )
    return messages
