"""``LISTEN``/``NOTIFY`` on a raw driver connection, with whichever PostgreSQL driver
Django runs on here (psycopg 3 in the suite's lanes; psycopg2 in the py311 lane's
psycopg2 part, ``scripts/test``)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connection

from reliable_events import pg_listen

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

CHANNEL = "reliable_events_test_listen"


@pytest.fixture
def listening() -> Iterator[Any]:
    if connection.vendor != "postgresql":
        pytest.skip("LISTEN/NOTIFY is PostgreSQL's")
    raw = pg_listen.connect(connection.alias)
    try:
        pg_listen.listen(raw, CHANNEL)
        yield raw
    finally:
        raw.close()


def notify(times: int = 1) -> None:
    with connection.cursor() as cursor:
        for _ in range(times):
            cursor.execute(f"NOTIFY {CHANNEL}")


def driver(raw: Any) -> str:
    return type(raw).__module__.split(".")[0]


def test_the_connection_is_the_projects_driver_in_autocommit(listening):
    connection.ensure_connection()
    assert driver(listening) == driver(connection.connection)
    assert listening.autocommit is True


def test_a_notify_wakes_the_wait(listening):
    notify()
    started = time.monotonic()
    assert pg_listen.wait(listening, 5.0) is True
    assert time.monotonic() - started < 1.0


def test_without_a_notify_the_wait_times_out(listening):
    started = time.monotonic()
    assert pg_listen.wait(listening, 0.3) is False
    assert 0.25 <= time.monotonic() - started < 2.0


def test_one_wait_consumes_every_notification_that_came(listening):
    notify(times=3)
    time.sleep(0.2)
    assert pg_listen.wait(listening, 1.0) is True
    assert pg_listen.wait(listening, 0.0) is False


def test_drain_drops_what_came_without_waiting(listening):
    notify(times=2)
    time.sleep(0.2)
    started = time.monotonic()
    pg_listen.drain(listening)
    assert time.monotonic() - started < 0.5
    assert pg_listen.wait(listening, 0.2) is False


def test_a_notify_sent_in_a_transaction_comes_at_its_commit(listening):
    from django.db import transaction

    with transaction.atomic():
        notify()
        assert pg_listen.wait(listening, 0.3) is False
    assert pg_listen.wait(listening, 5.0) is True
