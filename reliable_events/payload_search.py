"""Search dead letters by payload content, bounded and safe on SQLite and PostgreSQL.

A search is a small JSON object, ``{"order_id": 42}`` or ``{"customer": {"id": "c-7"}}``,
or the shorthand ``order_id=42`` / ``customer.id=c-7`` (the value is read as JSON when
it parses, else as a string).  A dead letter matches when its payload has every given
key path with exactly that value.

* PostgreSQL: one containment test (``payload @> '{...}'``), which the GIN index
  ``re_deadletter_payload_gin`` (``jsonb_path_ops``, migration ``0003_triage``)
  answers without reading the table.
* SQLite (no containment operator): one ``json_extract`` equality per key path, over
  the rows the other filters leave; the page size bounds what is returned.

Bounded on both: at most ``MAX_LEAVES`` key paths, ``MAX_DEPTH`` levels, keys of
letters, digits, ``_`` and ``-`` (never Django's ``__`` lookup separator, never a bare
number, which would index an array), scalar values only (no lists).
"""

from __future__ import annotations

import json
import re
from typing import Any

from django.db.models import Q, QuerySet

from reliable_events.db import is_postgres
from reliable_events.models import DeadLetter

MAX_TEXT = 1000
MAX_LEAVES = 8
MAX_DEPTH = 4
_KEY = re.compile(r"[A-Za-z_-][A-Za-z0-9_-]{0,63}")


class PayloadQueryError(ValueError):
    """A payload search that is malformed or too large; the message says why."""


def parse(text: str) -> dict[str, Any]:
    """The search ``text`` as a nested object of scalar values (``PayloadQueryError``)."""
    text = text.strip()
    if not text:
        raise PayloadQueryError("the payload search is empty.")
    if len(text) > MAX_TEXT or "\x00" in text:
        raise PayloadQueryError(f"the payload search is over {MAX_TEXT} characters or has NUL.")
    if text.startswith("{"):
        try:
            criteria = json.loads(text)
        except (ValueError, RecursionError):
            raise PayloadQueryError('not a JSON object: use {"key": value} or key=value.') from None
    else:
        path, sep, raw = text.partition("=")
        if not sep:
            raise PayloadQueryError('use key=value, a.b=value or {"key": value}.')
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        criteria = value
        for key in reversed(path.strip().split(".")):
            criteria = {key: criteria}
    if not isinstance(criteria, dict) or not criteria:
        raise PayloadQueryError("the payload search must be a non-empty object.")
    leaves(criteria)  # validates
    return criteria


def leaves(criteria: dict[str, Any]) -> list[tuple[list[str], Any]]:
    """``{"a": {"b": 1}}`` -> ``[(["a", "b"], 1)]``, validating keys, depth and values."""
    found: list[tuple[list[str], Any]] = []
    stack: list[tuple[list[str], Any]] = [([], criteria)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict) and (not path or value):
            if len(path) >= MAX_DEPTH:
                raise PayloadQueryError(f"at most {MAX_DEPTH} levels of keys.")
            for key, child in value.items():
                if not _KEY.fullmatch(key) or "__" in key:
                    raise PayloadQueryError(
                        f"{key[:40]!r} is not a searchable key: letters, digits, _ and - "
                        "(not starting with a digit, no '__')."
                    )
                stack.append(([*path, key], child))
        elif isinstance(value, list | dict):
            raise PayloadQueryError("search values must be strings, numbers, booleans or null.")
        else:
            found.append((path, value))
            if len(found) > MAX_LEAVES:
                raise PayloadQueryError(f"at most {MAX_LEAVES} keys per search.")
    return found


def search(query: QuerySet[DeadLetter], criteria: dict[str, Any]) -> QuerySet[DeadLetter]:
    """``query`` narrowed to dead letters whose payload matches ``criteria`` (see :func:`parse`)."""
    if is_postgres(query.db):
        return query.filter(payload__contains=criteria)
    condition = Q()
    for path, value in leaves(criteria):
        condition &= Q(**{"payload__" + "__".join(path): value})
    return query.filter(condition)
