"""Property-based tests of publish_event: InvalidEvent and nothing written, or a valid row."""

from __future__ import annotations

import json
import math
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.db import transaction
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reliable_events import publish_event
from reliable_events.exceptions import InvalidEvent
from reliable_events.models import OutboxMessage

pytestmark = pytest.mark.django_db

json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
not_json = st.sampled_from(
    [object(), {1, 2}, b"bytes", float("nan"), float("inf"), {"a": object()}, {(1, 2): "tuple key"}]
)
words = st.text(alphabet="abcXYZ019_-", min_size=1, max_size=6)
good_topics = st.lists(words, min_size=1, max_size=4).map(".".join)
any_topics = (
    good_topics | st.text(max_size=12) | st.sampled_from(["", "a..b", ".a", "a.", "a.*", "#", 7])
)
header_values = st.text(max_size=10) | st.integers() | st.none() | st.booleans()
any_headers = st.none() | st.dictionaries(
    st.text(max_size=6) | st.sampled_from(["x-event-key", "X-Death"]), header_values, max_size=3
)
any_keys = st.none() | st.text(max_size=12) | st.integers() | st.sampled_from(["", " k", "k\n"])
any_delays = (
    st.none()
    | st.floats(allow_nan=True)
    | st.integers(-5, 5)
    | st.sampled_from([timedelta(seconds=-1), timedelta(0), timedelta(seconds=3), "5", True])
)


def _decimal_json(value: Any) -> Any:
    return json.loads(json.dumps(value), parse_float=Decimal, parse_int=Decimal)


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def _expected_valid(topic: Any, payload: Any, headers: Any, key: Any, delay: Any) -> bool:
    """An independent, simple statement of what publish_event must accept."""
    import re

    if not isinstance(topic, str) or not re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*", topic):
        return False
    try:
        json.dumps(payload, allow_nan=False)
    except (TypeError, ValueError):
        return False
    if _has_nul(payload):
        return False
    if headers is not None:
        for name, value in headers.items():
            if not isinstance(name, str) or not name or name.lower().startswith("x-"):
                return False
            if not isinstance(value, str) or "\x00" in name + value:
                return False
    if key is not None and (
        not isinstance(key, str) or not key or key != key.strip() or any(ord(c) < 32 for c in key)
    ):
        return False
    if delay is not None:
        if isinstance(delay, bool) or not isinstance(delay, int | float | timedelta):
            return False
        seconds = delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
        if math.isnan(seconds) or seconds < 0 or seconds > 366 * 86400:
            return False
    return True


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    topic=any_topics,
    payload=json_values | not_json,
    headers=any_headers,
    key=any_keys,
    delay=any_delays,
)
def test_publish_event_is_all_or_nothing(topic, payload, headers, key, delay):
    before = OutboxMessage.objects.count()
    with transaction.atomic():
        try:
            row = publish_event(topic, payload, headers=headers, key=key, delay=delay)
        except InvalidEvent:
            assert OutboxMessage.objects.count() == before, "InvalidEvent but a row was written"
            assert not _expected_valid(topic, payload, headers, key, delay)
            return
        try:
            assert _expected_valid(topic, payload, headers, key, delay)
            stored = OutboxMessage.objects.get(pk=row.pk)
            assert stored.topic == topic
            assert stored.key == key
            assert stored.headers == (headers or {})
            # jsonb may respell numbers (1e16 -> 10000000000000000): compare as decimals
            assert _decimal_json(stored.payload) == _decimal_json(payload)
            assert stored.status == OutboxMessage.Status.PENDING
            assert stored.attempts == 0
            assert OutboxMessage.objects.count() == before + 1
        finally:
            transaction.set_rollback(True)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(size=st.integers(min_value=1, max_value=4096))
def test_payload_size_cap_is_exact(settings_fixture_size, size):
    cap = settings_fixture_size
    payload = "a" * size  # JSON encoding adds two quote bytes
    with transaction.atomic():
        try:
            publish_event("size.check", payload)
            accepted = True
        except InvalidEvent as exc:
            accepted = False
            message = str(exc)
        transaction.set_rollback(True)
    if not accepted:
        assert "MAX_PAYLOAD_BYTES" in message
    assert accepted == (size + 2 <= cap)


@pytest.fixture
def settings_fixture_size(settings):
    config = dict(settings.RELIABLE_EVENTS)
    config["MAX_PAYLOAD_BYTES"] = 2048
    settings.RELIABLE_EVENTS = config
    return 2048
