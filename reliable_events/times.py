"""Which datetimes does the project's ORM take?  Aware ones under ``USE_TZ`` (Django's
default), naive ones in the current time zone (``TIME_ZONE``) without it.

Instants read off the wire (an AMQP timestamp, a header) or out of raw SQL are handed to
models, queries and handlers in that convention (:func:`as_project`,
:func:`from_column`), as ``timezone.now()`` is; they go back on the wire as aware
instants (:func:`as_instant`).  Under ``USE_TZ = False`` SQLite refuses an aware datetime
outright (``ValueError``), and comparing naive with aware ones raises ``TypeError``.
"""

from __future__ import annotations

from datetime import UTC, datetime

from django.conf import settings
from django.utils import timezone


def as_project(value: datetime) -> datetime:
    """An instant (aware, or naive meaning UTC, as py-amqp decodes a timestamp) as the
    project's ORM takes datetimes."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value if settings.USE_TZ else timezone.make_naive(value)


def from_column(value: datetime) -> datetime:
    """A ``DateTimeField`` value read by raw SQL: naive means UTC under ``USE_TZ`` (how
    SQLite keeps it then), the current time zone otherwise."""
    if value.tzinfo is not None:
        return as_project(value)
    return value.replace(tzinfo=UTC) if settings.USE_TZ else value


def as_instant(value: datetime) -> datetime:
    """A project datetime as an aware instant (naive means the current time zone)."""
    return value if value.tzinfo is not None else timezone.make_aware(value)
