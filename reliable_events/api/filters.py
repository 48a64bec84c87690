"""Query-string filters of the dead-letter list, validated strictly.

An unknown parameter or a bad value is a 400 that says what is wrong and what is
allowed, rather than a silently unfiltered list.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime, time
from typing import Any

from django.db.models import Q, QuerySet
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime
from rest_framework.exceptions import ValidationError

from reliable_events import payload_search
from reliable_events.models import DeadLetter
from reliable_events.times import as_project

#: Exact-match filters: query parameter -> model field.
EXACT = {
    "consumer": "consumer",
    "topic": "topic",
    "error_type": "error_type",
    "reason": "reason",
    "fingerprint": "fingerprint",
    "key": "key",
    "message_id": "message_id",
}
ORDERINGS = ("id", "-id", "last_failed_at", "-last_failed_at", "attempts", "-attempts")
#: Parameters the pagination and DRF themselves read.
PASS_THROUGH = frozenset({"page", "page_size", "format"})
ALLOWED = frozenset(
    {*EXACT, "status", "q", "payload", "failed_after", "failed_before", "ordering", *PASS_THROUGH}
)
STATUSES = tuple(value for value, _ in DeadLetter.Status.choices)
MAX_PAGE_SIZE = 500
#: The largest id a 64-bit primary key holds; a larger one would overflow SQLite's driver.
MAX_ID = 2**63 - 1
#: ASCII digits only: ``str.isdigit()`` also accepts "²" and "٣", which ``int()`` refuses.
_DIGITS = re.compile(r"[0-9]{1,19}")


def _datetime(name: str, value: str, *, end_of_day: bool = False) -> datetime:
    try:
        parsed = parse_datetime(value)
        if parsed is None:
            day = parse_date(value)
            if day is not None:
                parsed = datetime.combine(day, time.max if end_of_day else time.min)
    except ValueError:  # well-formed but impossible, e.g. month 13
        parsed = None
    if parsed is None:
        raise ValidationError(
            {name: [f"{value[:40]!r} is not a date or datetime (use ISO 8601: 2024-05-01T12:00Z)."]}
        )
    if timezone.is_naive(parsed):
        parsed = timezone.make_aware(parsed, timezone.get_current_timezone())
    return as_project(parsed)


def as_id(value: str) -> int | None:
    """``value`` as a positive 64-bit integer, or ``None`` when it is not one."""
    if not _DIGITS.fullmatch(value):
        return None
    number = int(value)
    return number if 1 <= number <= MAX_ID else None


def _positive_int(name: str, value: str) -> int:
    number = as_id(value)
    if number is None:
        raise ValidationError({name: [f"{value[:40]!r} is not a positive integer."]})
    return number


def reject_nul(params: Mapping[str, Any]) -> None:
    """A NUL character in a parameter is a 400 (PostgreSQL cannot compare text with one)."""
    for name in params:
        values = params.getlist(name) if hasattr(params, "getlist") else [params[name]]
        if "\x00" in name or any("\x00" in str(value) for value in values):
            raise ValidationError({"detail": ["a parameter contains a NUL character."]})


def filter_dead_letters(
    query: QuerySet[DeadLetter], params: Mapping[str, Any]
) -> QuerySet[DeadLetter]:
    """Apply the documented filters in ``params`` to ``query``; ValidationError on bad input."""
    reject_nul(params)
    unknown = sorted(set(params) - ALLOWED)
    if unknown:
        raise ValidationError(
            {
                "detail": [
                    f"unknown filter(s): {', '.join(unknown)}; "
                    f"allowed: {', '.join(sorted(ALLOWED))}."
                ]
            }
        )
    if "page" in params:
        _positive_int("page", params["page"])
    if "page_size" in params and _positive_int("page_size", params["page_size"]) > MAX_PAGE_SIZE:
        raise ValidationError({"page_size": [f"at most {MAX_PAGE_SIZE}."]})

    status = params.get("status")
    if status is not None and status != "all":
        if status not in STATUSES:
            raise ValidationError(
                {
                    "status": [
                        f"{status[:40]!r} is not a status; use one of {', '.join(STATUSES)} or all."
                    ]
                }
            )
        query = query.filter(status=status)
    for name, field in EXACT.items():
        if name in params:
            query = query.filter(**{field: params[name]})
    text = (params.get("q") or "").strip()
    if text:
        query = query.filter(Q(message_id=text) | Q(key=text) | Q(error_message__icontains=text))
    if "payload" in params:
        try:
            query = payload_search.search(query, payload_search.parse(params["payload"]))
        except payload_search.PayloadQueryError as exc:
            raise ValidationError({"payload": [str(exc)]}) from None
    if "failed_after" in params:
        query = query.filter(last_failed_at__gte=_datetime("failed_after", params["failed_after"]))
    if "failed_before" in params:
        query = query.filter(
            last_failed_at__lte=_datetime("failed_before", params["failed_before"], end_of_day=True)
        )
    ordering = params.get("ordering", "-id")
    if ordering not in ORDERINGS:
        raise ValidationError(
            {
                "ordering": [
                    f"{ordering[:40]!r} is not an ordering; use one of {', '.join(ORDERINGS)}."
                ]
            }
        )
    tie_breaker = () if ordering in ("id", "-id") else ("-id",)
    return query.order_by(ordering, *tie_breaker)
