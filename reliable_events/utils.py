"""Parsing a duration ("15m", "7d") for the ``purge_outbox`` command."""

from __future__ import annotations

import re
from datetime import timedelta

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
#: The longest duration accepted (a cutoff further back than this is no date).
MAX_DURATION = timedelta(days=100 * 365)


def parse_duration(text: str) -> timedelta:
    """``"90"``, ``"90s"``, ``"15m"``, ``"12h"``, ``"7d"`` or ``"2w"`` as a timedelta."""
    match = _DURATION_RE.match(text or "")
    if match is None:
        raise ValueError(
            f"{text!r} is not a duration: use a number with an optional unit s, m, h, d or w"
        )
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds > MAX_DURATION.total_seconds():
        raise ValueError(f"{text!r} is longer than {MAX_DURATION.days // 365} years")
    return timedelta(seconds=seconds)
