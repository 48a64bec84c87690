"""Request parsers of the API: DRF's, with a nesting limit on JSON bodies.

Python's ``json`` module raises ``RecursionError`` (not ``ValueError``) on a body
nested a few thousand levels deep, and DRF's parser lets it through as a 500.  No
request of this API needs more than a few levels, so anything deeper than
``MAX_JSON_DEPTH`` is refused with a 400 before it can reach a serializer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rest_framework.exceptions import ParseError
from rest_framework.parsers import BaseParser, FormParser, JSONParser, MultiPartParser

MAX_JSON_DEPTH = 32


def depth_of(value: Any) -> int:
    """How deeply ``value`` nests lists and objects (iteratively: no recursion limit)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, Mapping):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_JSON_DEPTH:
            return deepest
        stack.extend((child, level + 1) for child in children)
    return deepest


class BoundedJSONParser(JSONParser):
    """DRF's JSON parser, refusing bodies nested deeper than ``MAX_JSON_DEPTH``."""

    def parse(
        self,
        stream: Any,
        media_type: str | None = None,
        parser_context: Mapping[str, Any] | None = None,
    ) -> Any:
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError as exc:
            raise ParseError(
                f"JSON parse error - nested too deeply (at most {MAX_JSON_DEPTH} levels)."
            ) from exc
        if depth_of(data) > MAX_JSON_DEPTH:
            raise ParseError(f"JSON parse error - nested deeper than {MAX_JSON_DEPTH} levels.")
        return data


PARSERS: tuple[type[BaseParser], ...] = (BoundedJSONParser, FormParser, MultiPartParser)
