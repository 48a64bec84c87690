"""Bookkeeping writes: a database saying "not now" is waited for, a real error is not hidden."""

from __future__ import annotations

import pytest
from django.db import IntegrityError, OperationalError

from reliable_events.consuming import database_guard
from reliable_events.exceptions import DatabaseUnavailable

pytestmark = pytest.mark.django_db


def test_a_locked_database_becomes_a_wait_not_a_crash():
    # SQLite's "database is locked" arrives on a live connection: before, it escaped the
    # guard and stopped consume_events.
    with pytest.raises(DatabaseUnavailable) as info, database_guard("default", "writing"):
        raise OperationalError("database is locked")
    assert isinstance(info.value.__cause__, OperationalError)


def test_an_integrity_error_is_not_mistaken_for_an_outage():
    with pytest.raises(IntegrityError), database_guard("default", "writing"):
        raise IntegrityError("duplicate key")
