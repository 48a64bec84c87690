"""How is untrusted text stored and logged? Passwords redacted; text NUL-free, bounded,
JSON-safe."""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any
from urllib.parse import unquote

from reliable_events.broker_url import node_urls, userinfo_password
from reliable_events.conf import app_settings

#: Characters of an undecodable body kept in ``DeadLetter.raw_body``.
RAW_BODY_LIMIT = 64 * 1024
_ERROR_SUMMARY_LIMIT = 300


def error_summary(exc: BaseException) -> str:
    return clean_text(redact(f"{type(exc).__name__}: {exc}"), _ERROR_SUMMARY_LIMIT)


def clean_text(value: Any, limit: int) -> str:
    """``value`` as text PostgreSQL accepts (no NUL), at most ``limit`` characters."""
    text = value if isinstance(value, str) else str(value)
    return text.replace("\x00", "\\x00")[:limit]


def json_safe(value: Any, depth: int = 0) -> Any:
    """``value`` as JSON PostgreSQL accepts: AMQP table values (datetimes, decimals,
    bytes) become strings, NUL characters are escaped."""
    if depth > 20:
        return clean_text(repr(value), 1000)
    if isinstance(value, float):
        finite = value == value and value not in (float("inf"), float("-inf"))
        return value if finite else str(value)
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, str):
        return clean_text(value, 100_000)
    if isinstance(value, bytes):
        return clean_text(value.decode("utf-8", "backslashreplace"), 100_000)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {clean_text(k, 1000): json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v, depth + 1) for v in value]
    return clean_text(str(value), 10_000)


def has_nul(payload: Any) -> bool:
    return "\\u0000" in json.dumps(payload)


def raw_text(body: bytes) -> str:
    return clean_text(body[:RAW_BODY_LIMIT].decode("utf-8", "backslashreplace"), RAW_BODY_LIMIT)


#: Shortest piece of a password masked on its own (see :func:`secrets_of`).
_MIN_PIECE = 3


def secrets_of(url: str) -> list[str]:
    """What of ``url``'s passwords (every node) must not be shown, longest first: each as
    written and percent-decoded, and the pieces between the characters that split a URL
    (a password with a raw ``/`` is cut there by the URL parser, whose error quotes the
    piece before it: "Port could not be cast to integer value as 'S3cr'")."""
    found: set[str] = set()
    for node in node_urls(url) or [url]:
        password = userinfo_password(node)
        for form in (password, unquote(password)):
            if form:
                found.add(form)
                found.update(p for p in re.split(r"[/?#@:\[\]]", form) if len(p) >= _MIN_PIECE)
    return sorted(found, key=len, reverse=True)


def redact(text: str, url: str | None = None) -> str:
    """``text`` with the passwords of ``url`` (every node of it; default: the configured
    broker) masked."""
    url = url if url is not None else str(app_settings.BROKER_URL)
    for secret in secrets_of(url):
        text = text.replace(secret, "***")
    return text


def describe_error(exc: BaseException, url: str | None = None) -> str:
    return redact(f"{type(exc).__name__}: {exc}", url)[:2000]
