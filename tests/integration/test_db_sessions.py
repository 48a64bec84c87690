"""The test database's guard against leaked sessions (tests/support/db_sessions.py, run by
``tests/conftest.py`` before the test database is dropped): a session another process
left open is waited for, then named (whose process) and ended."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from django.db import connection

from tests.support.db_sessions import client_process, end_lingering_sessions, other_sessions

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.postgres]

#: A child that opens a session on the test database and keeps it (either driver).
CHILD = """
import json, sys, time
try:
    import psycopg as driver
except ImportError:
    import psycopg2 as driver
conn = driver.connect(**json.loads(sys.argv[1]))
conn.cursor().execute("SELECT 'lingering-marker'")
print("connected", flush=True)
time.sleep(120)
"""
APPLICATION = "reliable-events-lingering-test"


def test_a_session_left_by_another_process_is_named_and_ended() -> None:
    database = connection.settings_dict
    dsn = {
        "host": database["HOST"] or "127.0.0.1",
        "port": int(database["PORT"] or 5432),
        "user": database["USER"],
        "dbname": database["NAME"],
        "application_name": APPLICATION,
    }
    if database["PASSWORD"]:
        dsn["password"] = database["PASSWORD"]
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(dsn)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "connected"
        with connection.cursor() as cursor:
            ended = end_lingering_sessions(cursor, timeout=0.5)
            left = [row for row in other_sessions(cursor) if row[1] == APPLICATION]
        mine = [text for text in ended if APPLICATION in text]
        assert len(mine) == 1, ended
        assert f"pid {child.pid}: {sys.executable} -c" in mine[0]
        assert "lingering-marker" in mine[0]  # its last query
        assert left == []
    finally:
        child.kill()
        child.wait()


def test_a_client_without_a_tcp_port_is_said_to_be_on_a_unix_socket() -> None:
    assert client_process(None) == "a Unix-socket client"
    assert client_process(-1) == "a Unix-socket client"
