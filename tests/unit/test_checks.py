"""Every system check of reliable_events/checks.py: its id, its message and its hint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.core.checks import Error, Warning
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import connection

from reliable_events.checks import reliable_events_checks
from reliable_events.checks_database import sqlite_option_problems

ROOT = Path(__file__).resolve().parents[2]


def _ids(messages: list[Any]) -> list[str]:
    return [m.id for m in messages]


def _only(re_settings: Any, **overrides: Any) -> list[Any]:
    re_settings(**overrides)
    return [m for m in reliable_events_checks() if m.id != "reliable_events.W002"]


def test_the_test_settings_pass_every_check(settings):
    expected = [] if settings.RELIABLE_EVENTS["BROKER_URL"] == "db://" else ["reliable_events.W002"]
    assert _ids(reliable_events_checks()) == expected  # W002: memory://


def test_amqp_settings_pass_cleanly(re_settings):
    re_settings(BROKER_URL="amqp://guest:guest@127.0.0.1:5672//")
    assert reliable_events_checks() == []
    re_settings(BROKER_URL="amqps://u:p@broker.example:5671//")
    assert reliable_events_checks() == []


def test_e001_settings_not_a_dict(settings):
    settings.RELIABLE_EVENTS = [("BROKER_URL", "amqp://")]
    messages = reliable_events_checks()
    assert _ids(messages) == ["reliable_events.E001"]
    assert isinstance(messages[0], Error)
    assert "must be a dict" in messages[0].msg
    assert "RELIABLE_EVENTS = {'BROKER_URL'" in str(messages[0].hint)


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("", "non-empty"),
        (None, "non-empty"),
        (5, "non-empty"),
        ("nosuch://x:9092", "'nosuch'"),
        ("redis://:s3cret@cache:6379/0", "kombu's 'redis' transport"),  # no confirms
        ("sqs://", "kombu's 'sqs' transport"),
        ("amqp://u:s3cret@[rabbit//", "not a URL"),  # an unclosed "[": urlsplit refuses it
        ("amqp://u:s3cret@rabbit:56720000//", "not a URL"),  # a port out of range
        ("amqp://u:s3cret#1@rabbit:5672//", "not a URL"),  # cut at "#": port "s3cret"
        ("amqp://u:p@s3cret#1@rabbit:5672//", "reserves"),  # cut at "#": host "s3cret"
    ],
)
def test_e002_broker_url(settings, re_settings, url, words):
    settings.CELERY_BROKER_URL = None
    messages = _only(re_settings, BROKER_URL=url)
    if url is None:  # None means: Celery's broker URL, else the embedded transport
        assert _ids(messages) == []
        return
    assert _ids(messages) == ["reliable_events.E002"]
    assert words in messages[0].msg
    assert "amqp://" in str(messages[0].hint)
    assert "s3cret" not in messages[0].msg


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("MAX_ATTEMPTS", 0, "positive integer"),
        ("MAX_ATTEMPTS", True, "positive integer"),
        ("RELAY_BATCH_SIZE", "500", "positive integer"),
        ("CONFIRM_WINDOW", -1, "positive integer"),
        ("MAX_PAYLOAD_BYTES", 1.5, "positive integer"),
        ("BACKOFF_BASE", 0, "positive number"),
        ("CONFIRM_TIMEOUT", "30", "positive number"),
        ("OUTBOX_RETENTION_DAYS", False, "positive number"),
        ("RELAY_IDLE_SECONDS", -0.1, "number >= 0"),
        ("ON_COMMIT_BREAKER_SECONDS", None, "number >= 0"),
    ],
)
def test_e003_bad_numbers(re_settings, name, value, words):
    messages = _only(re_settings, **{name: value})
    assert "reliable_events.E003" in _ids(messages)
    e003 = [m for m in messages if m.id == "reliable_events.E003"]
    assert len(e003) == 1
    assert name in e003[0].msg
    assert words in e003[0].msg
    assert e003[0].hint == "See docs/settings.md."


def test_e004_queue_type(re_settings):
    messages = _only(re_settings, QUEUE_TYPE="stream")
    assert _ids(messages) == ["reliable_events.E004"]
    assert "'classic' or 'quorum'" in messages[0].msg
    assert _only(re_settings, QUEUE_TYPE="quorum") == []


def test_e012_cloudevents_mode(re_settings):
    messages = _only(re_settings, CLOUDEVENTS="json")
    assert _ids(messages) == ["reliable_events.E012"]
    assert "off, binary, structured" in messages[0].msg
    assert _only(re_settings, CLOUDEVENTS="structured") == []


@pytest.mark.parametrize("exchange", ["", "amq.topic", 5])
def test_e005_exchange(re_settings, exchange):
    messages = _only(re_settings, EXCHANGE=exchange)
    assert _ids(messages) == ["reliable_events.E005"]
    assert "amq." in messages[0].msg


@pytest.mark.parametrize("lanes", [0, 32768, True, "64", 2.0])
def test_e006_lanes(re_settings, lanes):
    messages = _only(re_settings, LANES=lanes)
    assert _ids(messages) == ["reliable_events.E006"]
    assert "pending rows" in str(messages[0].hint)


def test_e007_grace_must_exceed_the_hook_timeouts(re_settings):
    messages = _only(
        re_settings,
        ON_COMMIT_GRACE_SECONDS=1.0,
        ON_COMMIT_CONNECT_TIMEOUT=0.25,
        ON_COMMIT_CONFIRM_TIMEOUT=1.0,
    )
    assert _ids(messages) == ["reliable_events.E007"]
    assert messages[0].hint == "Set it above 1.25 seconds."
    assert _only(re_settings, ON_COMMIT_GRACE_SECONDS=1.3) == []


def test_e007_is_left_to_e003_when_a_value_is_not_a_number(re_settings):
    assert _ids(_only(re_settings, ON_COMMIT_CONFIRM_TIMEOUT="1")) == ["reliable_events.E003"]


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"RETRY_DELAYS": []}, "RETRY_DELAYS"),
        ({"RETRY_DELAYS": "1,5"}, "RETRY_DELAYS"),
        ({"RETRY_DELAYS": [1, -5]}, "RETRY_DELAYS"),
        ({"RETRY_DELAYS": [1, True]}, "RETRY_DELAYS"),
        ({"MAX_RETRIES": -1}, "MAX_RETRIES"),
        ({"MAX_RETRIES": "5"}, "MAX_RETRIES"),
        ({"MAX_RETRIES": True}, "MAX_RETRIES"),
    ],
)
def test_e008_retry_policy(re_settings, overrides, words):
    messages = _only(re_settings, **overrides)
    assert _ids(messages) == ["reliable_events.E008"]
    assert words in messages[0].msg
    assert messages[0].hint == "See docs/settings.md."


def test_e009_processed_retention_shorter_than_the_retry_horizon(re_settings):
    messages = _only(re_settings, RETRY_DELAYS=[60, 60], PROCESSED_RETENTION_DAYS=0.001)
    assert _ids(messages) == ["reliable_events.E009"]
    assert "applied twice" in messages[0].msg
    assert "RETRY_DELAYS" in str(messages[0].hint)
    assert _only(re_settings, RETRY_DELAYS=[60, 60], PROCESSED_RETENTION_DAYS=1) == []


def test_w001_unknown_setting(re_settings):
    messages = _only(re_settings, BROKER_URLL="amqp://", MAX_ATTEMPT=3)
    assert _ids(messages) == ["reliable_events.W001"]
    assert isinstance(messages[0], Warning)
    assert "BROKER_URLL, MAX_ATTEMPT" in messages[0].msg
    assert "spelling" in str(messages[0].hint)


@pytest.mark.parametrize("url", ["memory://", "memory:///"])
def test_w002_memory_transport(re_settings, url):
    re_settings(BROKER_URL=url)
    messages = reliable_events_checks()
    assert _ids(messages) == ["reliable_events.W002"]
    assert isinstance(messages[0], Warning)
    assert "same process" in messages[0].msg
    assert "db://" in str(messages[0].hint)


def test_filesystem_transport_is_refused_pointing_to_the_database_transport(re_settings):
    re_settings(BROKER_URL="filesystem://")
    messages = reliable_events_checks()
    assert _ids(messages) == ["reliable_events.E010"]
    assert "loses messages" in messages[0].msg
    assert "db://" in str(messages[0].hint)


@pytest.mark.parametrize(
    ("overrides", "text"),
    [
        ({"ORDERED_PARTITIONS": 0}, "'ORDERED_PARTITIONS'] must be an integer from 1 to 64"),
        ({"ORDERED_PARTITIONS": 100}, "'ORDERED_PARTITIONS'] must be an integer from 1 to 64"),
        ({"MAX_DELIVERIES": 5000}, "'MAX_DELIVERIES'] must be an integer from 1 to 999"),
        ({"METRICS_PORT": "abc"}, "'METRICS_PORT'] must be an integer from 1 to 65535 or None"),
        ({"METRICS_PORT": 70000}, "'METRICS_PORT'] must be an integer from 1 to 65535 or None"),
        ({"CELERY_CONSUMERS": "billing"}, "'CELERY_CONSUMERS'] must be None or a list"),
        ({"CELERY_CONSUMERS": [""]}, "'CELERY_CONSUMERS'] must be None or a list"),
    ],
)
def test_settings_that_broke_at_run_time_are_reported(re_settings, overrides, text):
    messages = _only(re_settings, **overrides)
    assert _ids(messages) == ["reliable_events.E003"]
    assert text in messages[0].msg


def test_bounded_settings_accept_their_range(re_settings):
    fine = {"ORDERED_PARTITIONS": 64, "MAX_DELIVERIES": 999, "METRICS_PORT": None}
    assert _only(re_settings, **fine, CELERY_CONSUMERS=["a.b"]) == []
    assert _only(re_settings, METRICS_PORT=9100, CELERY_CONSUMERS=None) == []


def test_several_problems_are_all_reported(re_settings):
    ids = _ids(_only(re_settings, QUEUE_TYPE="x", EXCHANGE="", LANES=0, MAX_ATTEMPTS=0))
    assert sorted(ids) == [
        "reliable_events.E003",
        "reliable_events.E004",
        "reliable_events.E005",
        "reliable_events.E006",
    ]


def test_checks_are_registered_with_django(re_settings):
    re_settings(QUEUE_TYPE="stream")
    with pytest.raises(SystemCheckError, match=r"reliable_events\.E004"):
        call_command("check")


def test_w004_session_state_on_a_pooled_database(settings, re_settings):
    pooled = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "x",
        "DISABLE_SERVER_SIDE_CURSORS": True,
        "OPTIONS": {"prepare_threshold": None},
    }
    settings.DATABASES = {**settings.DATABASES, "pooled": pooled}
    assert "reliable_events.W004" not in _ids(_only(re_settings))
    settings.DATABASES = {**settings.DATABASES, "pooled": {**pooled, "OPTIONS": {}}}
    messages = [m for m in _only(re_settings) if m.id == "reliable_events.W004"]
    assert len(messages) == 1
    assert isinstance(messages[0], Warning)
    assert "'pooled'" in messages[0].msg
    assert "prepare_threshold" in messages[0].msg
    assert "PgBouncer" in str(messages[0].hint)
    settings.DATABASES = {**settings.DATABASES, "pooled": pooled}
    messages = _only(re_settings, RELAY_LISTEN=True)
    assert _ids(messages) == ["reliable_events.W004"]
    assert "RELAY_LISTEN" in messages[0].msg
    # without DISABLE_SERVER_SIDE_CURSORS nothing says the database is pooled
    settings.DATABASES = {**settings.DATABASES, "pooled": {**pooled, "OPTIONS": {}}}
    settings.DATABASES["pooled"]["DISABLE_SERVER_SIDE_CURSORS"] = False
    assert "reliable_events.W004" not in _ids(_only(re_settings))


def test_e013_naive_times_off_utc_on_sqlite(settings, re_settings):
    """SQLite's clock is UTC: with naive times in another zone every due time is off (the
    SQLite tier sees the error, the PostgreSQL tier does not: its clock knows zones)."""
    on_sqlite = connection.vendor == "sqlite"
    settings.USE_TZ = False
    for zone, off_utc in (
        ("UTC", False),
        ("Etc/UTC", False),
        ("Europe/London", True),  # UTC in winter only
        ("Asia/Tokyo", True),
        ("America/New_York", True),
    ):
        settings.TIME_ZONE = zone
        messages = [m for m in _only(re_settings) if m.id == "reliable_events.E013"]
        assert len(messages) == (1 if off_utc and on_sqlite else 0), zone
        if messages:
            assert isinstance(messages[0], Error)
            assert repr(zone) in messages[0].msg
            assert "'default'" in messages[0].msg
            assert "USE_TZ = True" in str(messages[0].hint)
    settings.USE_TZ = True
    assert "reliable_events.E013" not in _ids(_only(re_settings))


@pytest.mark.parametrize(
    ("interval", "timeout"),
    [
        ("ORDERED_HEARTBEAT_SECONDS", "ORDERED_MEMBER_TTL"),
        ("HEARTBEAT_SECONDS", "HEARTBEAT_TIMEOUT_SECONDS"),
    ],
)
def test_e014_w005_a_heartbeat_timeout_must_leave_room_for_late_beats(
    re_settings, interval, timeout
):
    messages = _only(re_settings, **{interval: 2.0, timeout: 2.0})
    assert _ids(messages) == ["reliable_events.E014"]
    assert isinstance(messages[0], Error)
    assert f"RELIABLE_EVENTS['{timeout}'] (2 s) is not above {interval} (2 s)" in messages[0].msg
    assert messages[0].hint == f"Keep it a few times {interval}, e.g. 10."

    messages = _only(re_settings, **{interval: 2.0, timeout: 3.0})
    assert _ids(messages) == ["reliable_events.W005"]
    assert isinstance(messages[0], Warning)
    assert "under twice" in messages[0].msg

    assert _only(re_settings, **{interval: 2.0, timeout: 4.0}) == []


@pytest.mark.parametrize("name", ["ORDERED_HEARTBEAT_SECONDS", "ORDERED_MEMBER_TTL"])
@pytest.mark.parametrize("value", [0, -1, "5", None])
def test_the_ordered_heartbeat_settings_are_positive_numbers(re_settings, name, value):
    messages = _only(re_settings, **{name: value})
    assert _ids(messages) == ["reliable_events.E003"]  # not also E014
    assert name in messages[0].msg


@pytest.mark.parametrize(
    ("wal", "warned"), [("", True), ("1", False)]
)  # RE_TEST_SQLITE_WAL=1: timeout 30, IMMEDIATE, WAL, as docs/relay.md says
def test_w006_a_shared_sqlite_file_without_the_options_for_several_writers(
    tmp_path: Path, wal: str, warned: bool
) -> None:
    """A trial with startproject's settings: 851 of 1,200 concurrent publishes failed with
    "database is locked", and ``check`` said nothing."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "PYTHONPATH": str(ROOT),
        "RE_TEST_DATABASE": "sqlite",
        "RE_TEST_SQLITE_NAME": str(tmp_path / "shared.sqlite3"),
        "RE_TEST_SQLITE_WAL": wal,
        "RE_TEST_RELIABLE_EVENTS": json.dumps({"BROKER_URL": "db://"}),
    }
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert ("reliable_events.W006" in output) is warned, output
    if warned:
        assert 'no OPTIONS["transaction_mode"] = "IMMEDIATE"' in output
        assert '"transaction_mode": "IMMEDIATE"' in output  # the hint: what to set


def test_w006_options_read_from_each_sqlite_alias() -> None:
    problems = sqlite_option_problems
    assert problems({}) == [
        'no OPTIONS["transaction_mode"] = "IMMEDIATE"',
        'OPTIONS["timeout"] is 5 s',
    ]
    assert problems({"OPTIONS": {"timeout": 30, "transaction_mode": "immediate"}}) == []
    assert problems({"OPTIONS": {"timeout": "x", "transaction_mode": "EXCLUSIVE"}}) == [
        "OPTIONS[\"timeout\"] is 'x' s"
    ]


def test_e002_a_celery_broker_on_redis_is_named_as_the_source(settings, re_settings) -> None:
    """BROKER_URL defaults to CELERY_BROKER_URL: a Celery-on-Redis project learns at
    ``check`` time, not from the relay's ModuleNotFoundError (a trial)."""
    settings.CELERY_BROKER_URL = "redis://cache:6379/0"
    settings.RELIABLE_EVENTS = {}
    messages = [m for m in reliable_events_checks() if m.id == "reliable_events.E002"]
    assert len(messages) == 1
    assert "(taken from CELERY_BROKER_URL) uses kombu's 'redis' transport" in messages[0].msg
    assert "'db://'" in str(messages[0].hint)
