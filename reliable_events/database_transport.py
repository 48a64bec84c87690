"""Deprecated: the database transport moved to :mod:`reliable_events.broker.database`.

This module only re-exports its names so that existing imports keep working.
"""

from __future__ import annotations

from reliable_events.broker.database import (
    CHANNEL,
    DIALECTS,
    FIRST_PAUSE,
    SCHEME,
    DatabasePublisher,
    DatabaseRetryScheduler,
    DatabaseTransport,
    Dialect,
    alias_for,
    dialect_for,
    insert_rows,
    queue_row,
)

__all__ = [
    "CHANNEL",
    "DIALECTS",
    "FIRST_PAUSE",
    "SCHEME",
    "DatabasePublisher",
    "DatabaseRetryScheduler",
    "DatabaseTransport",
    "Dialect",
    "alias_for",
    "dialect_for",
    "insert_rows",
    "queue_row",
]
