"""``own_transaction``: the app's own bookkeeping runs at READ COMMITTED whatever the
project's default (``OPTIONS["isolation_level"]``, or the server's default for the
session), costs no statement at the default, and leaves a caller's transaction alone."""

from __future__ import annotations

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from reliable_events.db import own_transaction

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

SET = "SET TRANSACTION ISOLATION LEVEL READ COMMITTED"


def statements(queries: CaptureQueriesContext) -> list[str]:
    """What ran, minus the transaction's own ``BEGIN`` and ``COMMIT``."""
    return [q["sql"] for q in queries if q["sql"] not in ("BEGIN", "COMMIT")]


def level() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SHOW transaction_isolation")
        value: str = cursor.fetchone()[0]
        return value


@pytest.mark.parametrize("name", ["REPEATABLE_READ", "SERIALIZABLE"])
def test_a_stricter_project_level_is_lowered_for_the_apps_transactions(project_isolation, name):
    project_isolation(name)
    with transaction.atomic():
        assert level() == name.lower().replace("_", " ")  # the project's own transactions
    with own_transaction(connection.alias):
        assert level() == "read committed"
    with transaction.atomic():
        assert level() == name.lower().replace("_", " ")  # one transaction only


def test_a_stricter_server_default_is_lowered_too(project_isolation):
    """No ``OPTIONS``: the database's or role's default counts, asked once per session."""
    project_isolation(None)
    with connection.cursor() as cursor:  # as ALTER DATABASE ... SET would, for this session
        cursor.execute("SET default_transaction_isolation = 'serializable'")
    with transaction.atomic():
        assert level() == "serializable"
    with own_transaction(connection.alias):
        assert level() == "read committed"
    with CaptureQueriesContext(connection) as queries, own_transaction(connection.alias):
        pass
    assert statements(queries) == [SET]  # the default was asked only once


def test_at_read_committed_it_adds_no_statement(project_isolation):
    project_isolation(None)
    with own_transaction(connection.alias):  # the first one asks the session's default
        pass
    with CaptureQueriesContext(connection) as queries, own_transaction(connection.alias):
        assert level() == "read committed"
    assert statements(queries) == ["SHOW transaction_isolation"]
    project_isolation("READ_COMMITTED")
    with CaptureQueriesContext(connection) as queries, own_transaction(connection.alias):
        pass
    assert not statements(queries)  # set in OPTIONS: nothing to ask


def test_inside_a_callers_transaction_the_callers_level_stays(project_isolation):
    project_isolation("REPEATABLE_READ")
    with transaction.atomic():
        with CaptureQueriesContext(connection) as queries, own_transaction(connection.alias):
            assert level() == "repeatable read"
        assert SET not in statements(queries)
