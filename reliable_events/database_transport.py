"""Deprecated: the database transport moved to :mod:`reliable_events.broker.database`.

This module only re-exports its names so that existing imports keep working.
"""

from __future__ import annotations

from reliable_events.broker.database import *  # noqa: F403 - the old path re-exports every name
from reliable_events.broker.database import __all__ as __all__
