"""Loops and signals (runner.py), duration parsing, Celery tasks, beat schedule, and the
package itself: no migration drift, importable before django.setup()."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.core.management import call_command
from django.db import DatabaseError, InterfaceError

from reliable_events import publish_event
from reliable_events.liveness import liveness
from reliable_events.models import OutboxMessage
from reliable_events.runner import StopFlag, run_loop, stop_on_signals
from reliable_events.schedule import DEFAULT_SCHEDULE, install_beat_schedule
from reliable_events.utils import parse_duration
from tests.support.optional import needs_beat
from tests.support.producer_support import ROOT


# -- runner -------------------------------------------------------------------------------
def test_stop_flag():
    flag = StopFlag()
    assert not flag.is_set()
    assert flag.wait(0) is False
    assert flag.wait(-1) is False  # negative waits are clamped
    flag.set("SIGTERM")
    assert flag.is_set()
    assert flag.signal_name == "SIGTERM"
    assert flag.wait(10) is True  # returns at once once set


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_on_signals_turns_a_signal_into_the_flag(sig):
    before = signal.getsignal(sig)
    flag = StopFlag()
    with stop_on_signals(flag):
        os.kill(os.getpid(), sig)
        assert flag.wait(5)
    assert flag.signal_name == sig.name
    assert signal.getsignal(sig) == before  # handlers restored


def test_stop_on_signals_off_the_main_thread_installs_nothing():
    before = signal.getsignal(signal.SIGTERM)
    seen: list[Any] = []

    def worker() -> None:
        flag = StopFlag()
        with stop_on_signals(flag) as same:
            seen.append((same is flag, signal.getsignal(signal.SIGTERM)))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [(True, before)]


@pytest.mark.django_db(transaction=True)  # the loop closes stale connections
def test_run_loop_calls_step_until_stopped_and_sleeps_when_idle():
    flag = StopFlag()
    calls: list[bool] = []
    answers = iter([True, True, False, True])

    def step() -> bool:
        busy = next(answers, None)
        if busy is None:
            flag.set()
            return False
        calls.append(busy)
        return busy

    run_loop(step, stop=flag, idle_seconds=0.01)
    assert calls == [True, True, False, True]


@pytest.mark.django_db(transaction=True)
def test_run_loop_survives_database_errors_and_redacts_them(re_settings, caplog):
    re_settings(BROKER_URL="amqp://user:hunter2-secret@127.0.0.1:5672//")
    flag = StopFlag()
    errors = [
        DatabaseError("server closed the connection; hunter2-secret"),
        InterfaceError("connection already closed"),
    ]
    calls = 0

    def step() -> bool:
        nonlocal calls
        calls += 1
        if errors:
            raise errors.pop(0)
        flag.set()
        return True

    with caplog.at_level(logging.WARNING, logger="reliable_events"):
        run_loop(step, stop=flag, idle_seconds=0, max_error_sleep=0.01)
    assert calls == 3
    assert "database error (DatabaseError: server closed the connection; ***)" in caplog.text
    assert "InterfaceError" in caplog.text
    assert "hunter2" not in caplog.text
    # the loop closed the broken connections; the next query reconnects
    assert OutboxMessage.objects.count() == 0


# -- utils --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90),
        ("90s", 90),
        ("15m", 900),
        ("12h", 43200),
        ("7d", 604800),
        ("2w", 1209600),
        ("1.5h", 5400),
        (" 3 d ", 259200),
        ("0", 0),
    ],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "d", "-1d", "7 days", "1y", "1e3s", "1h30m"])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


# -- Celery tasks -------------------------------------------------------------------------
@pytest.fixture
def celery_app() -> Iterator[Any]:
    """A Celery app configured from the Django settings (CELERY_TASK_ALWAYS_EAGER)."""
    from celery import Celery
    from celery._state import get_current_app

    previous = get_current_app()
    app = Celery("tests-producer", set_as_current=True)
    app.config_from_object("django.conf:settings", namespace="CELERY")
    assert app.conf.task_always_eager
    yield app
    previous.set_current()


@pytest.mark.django_db
def test_relay_task_publishes_due_rows(celery_app, re_settings):
    from reliable_events.tasks import relay_outbox

    re_settings(PUBLISH_ON_COMMIT=False)
    for n in range(3):
        publish_event("tasks.test", {"n": n})
    result = relay_outbox.delay(max_seconds=5)
    assert result.get() == {
        "claimed": 3,
        "sent": 3,
        "failed": 0,
        "dead": 0,
        "interrupted": 0,
        "broker_error": "",
    }
    assert OutboxMessage.objects.pending().count() == 0
    assert relay_outbox.delay().get()["claimed"] == 0
    # A beat-run relay counts as a live relay (the overview, the probes, the metrics).
    state = liveness(with_queues=False)
    assert state.relays_alive == 1
    (beat,) = state.processes
    assert (beat.kind, beat.pid, beat.counters["sent"]) == ("relay", os.getpid(), 3)


@pytest.mark.django_db
def test_purge_task_deletes_old_sent_rows(celery_app):
    from django.utils import timezone

    from reliable_events.tasks import purge_outbox

    now = timezone.now()
    OutboxMessage.objects.create(
        message_id="old",
        topic="a",
        payload={},
        status="sent",
        next_attempt_at=now,
        sent_at=now - timedelta(days=30),
    )
    OutboxMessage.objects.create(
        message_id="new", topic="a", payload={}, status="sent", next_attempt_at=now, sent_at=now
    )
    assert purge_outbox.delay().get() == {"outbox_deleted": 1, "processed_deleted": 0}
    assert list(OutboxMessage.objects.values_list("message_id", flat=True)) == ["new"]


def test_tasks_are_registered_under_their_documented_names(celery_app):
    import reliable_events.tasks  # noqa: F401 - registers the shared tasks

    names = set(celery_app.tasks)
    assert {"reliable_events.tasks.relay_outbox", "reliable_events.tasks.purge_outbox"} <= names
    assert {item.task for item in DEFAULT_SCHEDULE} <= names


@needs_beat
@pytest.mark.django_db
def test_install_beat_schedule_service():
    first = install_beat_schedule(relay_every=5, purge_every=60)
    again = install_beat_schedule(relay_every=5, purge_every=60)
    assert [created for _, created in first] == [True, True]
    assert [created for _, created in again] == [False, False]


# -- the package --------------------------------------------------------------------------
@pytest.mark.django_db
def test_no_migration_drift():
    """The models and the migrations agree (nothing for makemigrations to write)."""
    call_command("makemigrations", "reliable_events", "--check", "--dry-run", verbosity=0)


def test_importable_before_django_setup():
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    env["PYTHONPATH"] = str(ROOT)
    code = (
        "import reliable_events\n"
        "from reliable_events import publish_event\n"
        "from reliable_events.exceptions import InvalidEvent\n"
        "from django.conf import settings\n"
        "assert callable(publish_event) and issubclass(InvalidEvent, ValueError)\n"
        "assert not settings.configured\n"
        "print('ok', reliable_events.__version__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok ")
