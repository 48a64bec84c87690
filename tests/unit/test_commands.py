"""The management commands as thin shells: arguments, output and exit codes.

DB-agnostic (memory:// transport, or a closed TCP port for a broker that is down).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import timedelta
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.test import override_settings
from django.utils import timezone

from reliable_events import publish_event
from reliable_events.models import DeadLetter, OutboxMessage, ProcessedMessage
from reliable_events.relay import LaneShare
from reliable_events.topology import unrouted_name
from tests.support.optional import needs_beat
from tests.support.producer_support import database_not_answering, free_port

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str, **options: Any) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command(*args, stdout=out, stderr=err, **options)
    return out.getvalue(), err.getvalue()


def outbox_row(
    status: str,
    *,
    age: timedelta = timedelta(0),
    sent_age: timedelta | None = None,
    message_id: str | None = None,
) -> OutboxMessage:
    now = timezone.now()
    row = OutboxMessage.objects.create(
        message_id=message_id or f"m-{OutboxMessage.objects.count()}-{status}",
        topic="a.b",
        payload={},
        status=status,
        next_attempt_at=now - age,  # due since it was stored (not a delay= event)
        sent_at=now - sent_age if sent_age is not None else None,
    )
    OutboxMessage.objects.filter(pk=row.pk).update(created_at=now - age)
    return row


def dead_letter(consumer: str) -> DeadLetter:
    now = timezone.now()
    return DeadLetter.objects.create(
        consumer=consumer, reason="retries-exhausted", first_failed_at=now, last_failed_at=now
    )


# -- relay_outbox -------------------------------------------------------------------------
def test_relay_once_with_nothing_due_exits_0():
    out, _ = run("relay_outbox", "--once")
    assert "relay_outbox: claimed=0 sent=0" in out


def test_relay_once_publishes_what_is_due(re_settings):
    re_settings(PUBLISH_ON_COMMIT=False)
    for n in range(3):
        publish_event("a.b", {"n": n})
    out, _ = run("relay_outbox", "--once", "--batch-size", "2")
    assert "sent=3" in out
    assert OutboxMessage.objects.pending().count() == 0


@pytest.mark.skipif(connection.vendor == "postgresql", reason="SQLite's one lease")
def test_relay_once_says_when_another_relay_holds_the_lease(re_settings):
    re_settings(PUBLISH_ON_COMMIT=False)
    publish_event("a.b", {"n": 1})
    holder = LaneShare(connection.alias)  # the relay that publishes on this database
    holder.refresh()
    try:
        out, _ = run("relay_outbox", "--once")
    finally:
        holder.release()
    assert "claimed=0" in out
    assert "other relays held every lane the whole time: this run published nothing" in out
    assert OutboxMessage.objects.pending().count() == 1


@pytest.mark.skipif(connection.vendor != "postgresql", reason="lane leases")
def test_relay_once_waits_for_the_lanes_of_a_relay_that_died(re_settings):
    re_settings(PUBLISH_ON_COMMIT=False)
    publish_event("a.b", {"n": 1})
    LaneShare(connection.alias).refresh()  # took every lane, then died (never renews)
    out, _ = run("relay_outbox", "--once")
    assert "sent=1" in out
    assert OutboxMessage.objects.pending().count() == 0


def test_relay_once_exits_3_when_events_could_not_be_published(re_settings):
    re_settings(
        PUBLISH_ON_COMMIT=False,
        BROKER_URL=f"amqp://guest:guest@127.0.0.1:{free_port()}//",
        CONNECT_TIMEOUT=1.0,
    )
    publish_event("a.b", {})
    err = StringIO()
    with pytest.raises(CommandError) as info:
        call_command("relay_outbox", "--once", stdout=StringIO(), stderr=err)
    assert info.value.returncode == 3
    assert "could not be published; they stay pending" in str(info.value)
    assert "error: cannot connect to broker" in err.getvalue()
    row = OutboxMessage.objects.get()
    assert row.status == OutboxMessage.Status.PENDING
    assert row.attempts == 0  # the broker failed, not the event: no attempt counted


def test_relay_once_exits_3_when_the_broker_refuses_an_event(re_settings):
    """The broker answers but refuses one row (addressed to a queue nobody declared): that
    row counts an attempt and stays pending, the command says so and exits 3."""
    re_settings(PUBLISH_ON_COMMIT=False, BROKER_URL="db://")
    row = OutboxMessage.objects.create(
        message_id="m-addressed",
        topic="a.b",
        queue="nobody.listens",
        payload={},
        next_attempt_at=timezone.now(),
    )
    err = StringIO()
    with pytest.raises(CommandError) as info:
        call_command("relay_outbox", "--once", stdout=StringIO(), stderr=err)
    assert info.value.returncode == 3
    assert str(info.value) == "1 event(s) could not be published; they stay pending"
    assert err.getvalue().startswith("  error: ")
    row.refresh_from_db()
    assert (row.status, row.attempts) == (OutboxMessage.Status.PENDING, 1)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"CLOUDEVENTS": "sometimes"}, "CLOUDEVENTS is 'sometimes'"),
    ],
)
def test_relay_with_a_bad_configuration_exits_1(re_settings, setting, message):
    re_settings(**setting)
    with pytest.raises(CommandError, match=message) as info:
        run("relay_outbox", "--once")
    assert info.value.returncode == 1


@pytest.mark.parametrize("size", ["0", "-5"])
def test_relay_batch_size_must_be_positive(size):
    with pytest.raises(CommandError, match=r"is not a batch size \(1 to 1000000\)") as info:
        run("relay_outbox", "--once", "--batch-size", size)
    assert info.value.returncode == 1


def test_relay_batch_size_must_be_an_integer():
    with pytest.raises(CommandError, match="'many' is not a batch size"):
        run("relay_outbox", "--once", "--batch-size", "many")


# -- outbox_status ------------------------------------------------------------------------
def test_outbox_status_text_and_json():
    outbox_row("pending", age=timedelta(seconds=90))
    outbox_row("sent")
    outbox_row("sent")
    outbox_row("dead")
    dead_letter("billing")
    dead_letter("billing")
    dead_letter("mailer")

    out, _ = run("outbox_status")
    lines = out.splitlines()
    assert lines[:3] == ["pending: 1", "sent: 2", "dead: 1"]
    assert lines[3].startswith("oldest pending age: ")
    assert float(lines[3].split(": ")[1].rstrip("s")) >= 89
    assert lines[4:7] == ["open dead letters: 3", "  billing: 2", "  mailer: 1"]
    assert lines[7] == "scheduled (delay=, not due yet): 0"
    assert lines[8] == "held keys (ordered consumers): 0, parked events: 0"
    assert lines[9].startswith(f"unrouted ({unrouted_name()}): ")  # tests/unit/test_unrouted.py

    out, _ = run("outbox_status", "--json")
    data = json.loads(out)
    assert data["pending"] == 1
    assert data["sent"] == 2
    assert data["dead"] == 1
    assert data["oldest_pending_age_seconds"] >= 89
    assert data["open_dead_letters"] == 3
    assert data["open_dead_letters_by_consumer"] == {"billing": 2, "mailer": 1}


def test_outbox_status_of_an_empty_outbox():
    out, _ = run("outbox_status")
    assert "oldest pending age: -" in out
    data = json.loads(run("outbox_status", "--json", "--skip-broker")[0])
    assert data == {
        "pending": 0,
        "sent": 0,
        "dead": 0,
        "oldest_pending_age_seconds": None,
        "open_dead_letters": 0,
        "open_dead_letters_by_consumer": {},
        "scheduled": 0,
        "held_keys": 0,
        "parked_events": 0,
        "liveness": {
            "consumers": [],
            "processes": [],
            "relay_broker_error": "",
            "relay_last_seen": None,
            "relays_alive": 0,
            "relays_failing": 0,
            "timeout_seconds": 3.0,
        },
    }
    run("outbox_status", "--fail-on-dead", "--max-pending-age", "1")  # healthy: exit 0


def test_outbox_status_fail_on_dead_exits_3_for_dead_rows():
    outbox_row("dead")
    run("outbox_status")  # without the flag: exit 0
    with pytest.raises(CommandError, match="1 dead outbox row") as info:
        run("outbox_status", "--fail-on-dead")
    assert info.value.returncode == 3


def test_outbox_status_fail_on_dead_exits_3_for_open_dead_letters():
    letter = dead_letter("billing")
    with pytest.raises(CommandError, match="1 open dead letter") as info:
        run("outbox_status", "--fail-on-dead")
    assert info.value.returncode == 3
    DeadLetter.objects.filter(pk=letter.pk).update(status=DeadLetter.Status.DISCARDED)
    run("outbox_status", "--fail-on-dead")


def test_outbox_status_max_pending_age_exits_4():
    outbox_row("pending", age=timedelta(minutes=10))
    run("outbox_status", "--max-pending-age", "3600")
    with pytest.raises(CommandError, match="oldest pending row is 600s old") as info:
        run("outbox_status", "--max-pending-age", "60")
    assert info.value.returncode == 4


# -- purge_outbox -------------------------------------------------------------------------
def test_purge_deletes_old_sent_rows_only_in_bounded_batches():
    old_sent = [outbox_row("sent", sent_age=timedelta(days=10)) for _ in range(5)]
    recent_sent = outbox_row("sent", sent_age=timedelta(hours=1))
    # old pending and dead rows are never purged, whatever their age
    old_pending = outbox_row("pending", age=timedelta(days=30))
    old_dead = outbox_row("dead", age=timedelta(days=30), sent_age=timedelta(days=30))

    out, _ = run("purge_outbox", "--older-than", "7d", "--batch-size", "2")
    assert out.splitlines()[:3] == [
        "  deleted 2 rows so far",
        "  deleted 4 rows so far",
        "  deleted 5 rows so far",
    ]
    assert "purge_outbox: outbox_deleted=5 processed_deleted=0 batches=3" in out
    remaining = set(OutboxMessage.objects.values_list("pk", flat=True))
    assert remaining == {recent_sent.pk, old_pending.pk, old_dead.pk}
    assert not remaining & {row.pk for row in old_sent}


@pytest.mark.parametrize(("text", "kept"), [("2h", 1), ("30m", 0), ("90", 0), ("1.5h", 1)])
def test_purge_older_than_units(text, kept):
    outbox_row("sent", sent_age=timedelta(hours=1))
    run("purge_outbox", "--older-than", text)
    assert OutboxMessage.objects.count() == kept


def test_purge_older_than_zero_deletes_every_sent_row():
    outbox_row("sent", sent_age=timedelta(seconds=5))
    outbox_row("pending")
    run("purge_outbox", "--older-than", "0s")
    assert list(OutboxMessage.objects.values_list("status", flat=True)) == ["pending"]


def test_purge_default_retention_comes_from_settings(re_settings):
    outbox_row("sent", sent_age=timedelta(days=3))
    run("purge_outbox")
    assert OutboxMessage.objects.count() == 1  # default: 7 days
    re_settings(OUTBOX_RETENTION_DAYS=2)
    run("purge_outbox")
    assert OutboxMessage.objects.count() == 0


def test_purge_processed_records():
    old = ProcessedMessage.objects.create(consumer="c", message_id="old")
    ProcessedMessage.objects.filter(pk=old.pk).update(
        processed_at=timezone.now() - timedelta(days=30)
    )
    ProcessedMessage.objects.create(consumer="c", message_id="new")
    out, _ = run("purge_outbox", "--processed-older-than", "1w", verbosity=0)
    assert "processed_deleted=1" in out
    assert "so far" not in out  # no progress lines at verbosity 0
    assert list(ProcessedMessage.objects.values_list("message_id", flat=True)) == ["new"]


@pytest.mark.parametrize(
    "args",
    [
        ["--older-than", "7 days"],
        ["--older-than", "-1d"],
        ["--older-than", "d"],
        ["--processed-older-than", "soon"],
        ["--batch-size", "0"],
    ],
)
def test_purge_rejects_bad_arguments(args):
    outbox_row("sent", sent_age=timedelta(days=30))
    with pytest.raises(CommandError) as info:
        run("purge_outbox", *args)
    assert info.value.returncode == 1
    assert OutboxMessage.objects.count() == 1


# -- install_beat_schedule ----------------------------------------------------------------
@needs_beat
def test_install_beat_schedule_is_idempotent():
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    out, _ = run("install_beat_schedule")
    assert out.splitlines() == [
        "created: reliable_events: relay outbox",
        "created: reliable_events: purge outbox",
    ]
    out, _ = run("install_beat_schedule")
    assert out.splitlines() == [
        "updated: reliable_events: relay outbox",
        "updated: reliable_events: purge outbox",
    ]
    tasks = {t.name: t for t in PeriodicTask.objects.all()}
    assert set(tasks) == {"reliable_events: relay outbox", "reliable_events: purge outbox"}
    relay = tasks["reliable_events: relay outbox"]
    assert relay.task == "reliable_events.tasks.relay_outbox"
    assert relay.interval.every == 10
    assert relay.expire_seconds == 10
    assert relay.enabled
    assert tasks["reliable_events: purge outbox"].interval.every == 3600

    run("install_beat_schedule", "--relay-every", "30")
    relay = PeriodicTask.objects.get(name="reliable_events: relay outbox")
    assert relay.interval.every == 30
    assert relay.expire_seconds == 30
    assert PeriodicTask.objects.count() == 2
    assert IntervalSchedule.objects.filter(every=10).count() == 1


@needs_beat
@pytest.mark.parametrize("args", [["--relay-every", "0"], ["--purge-every", "-1"]])
def test_install_beat_schedule_rejects_bad_intervals(args):
    with pytest.raises(CommandError, match=r"is not a number of seconds \(1 to 2147483647\)"):
        run("install_beat_schedule", *args)


def test_install_beat_schedule_needs_django_celery_beat(settings):
    from django.apps import apps

    installed = [app for app in settings.INSTALLED_APPS if app != "django_celery_beat"]
    with override_settings(INSTALLED_APPS=installed):
        assert not apps.is_installed("django_celery_beat")
        with pytest.raises(CommandError, match="django_celery_beat"):
            run("install_beat_schedule")


# -- declare_topology (embedded transport; the RabbitMQ side is an integration test) -------
def test_declare_topology_lists_what_it_declared(re_settings, clean_registry):
    re_settings(EXCHANGE="unit-topology", BROKER_URL="memory://")
    out, _ = run("declare_topology")
    assert "exchange unit-topology.unrouted (fanout)" in out
    assert "exchange unit-topology (topic)" in out
    assert "queue unit-topology.unrouted <- unit-topology.unrouted:-" in out
    assert out.strip().endswith("declare_topology: 2 exchange(s), 1 queue(s)")


def test_declare_topology_reports_an_unreachable_broker():
    with pytest.raises(CommandError, match="cannot connect to broker") as info:
        run("declare_topology", "--url", f"amqp://guest:secret-pw@127.0.0.1:{free_port()}//")
    assert "secret-pw" not in str(info.value)
    assert info.value.returncode == 1


# -- arguments ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("command", "args", "text"),
    [
        ("outbox_status", ["--max-pending-age", "nan"], "'nan' is not a finite number"),
        ("outbox_status", ["--max-pending-age", "-1"], "'-1' is negative"),  # always "old"
        ("consume_events", ["--until-idle", "inf"], "'inf' is not a finite number"),
        ("consume_events", ["--metrics-port", "99999"], "is not a port number (1 to 65535)"),
        ("relay_outbox", ["--metrics-port", "0"], "is not a port number (1 to 65535)"),
        ("retry_dead_letters", ["--id", str(2**63)], "is not an id (1 to 9223372036854775807)"),
        ("retry_dead_letters", ["--id", "0"], "is not an id"),
        ("purge_outbox", ["--older-than", "99999999d"], "is longer than 100 years"),
        ("relay_outbox", ["--batch-size", "9" * 20], "is not a batch size (1 to 1000000)"),
        ("purge_outbox", ["--batch-size", "0"], "is not a batch size (1 to 1000000)"),
        ("relay_outbox", ["--database", "nope"], "'nope' is not a database alias (DATABASES: "),
        ("outbox_status", ["--database", "nope"], "'nope' is not a database alias"),
        ("consume_events", ["--prefetch", "99999999"], "is not a prefetch count (1 to 65535)"),
        ("consume_events", ["--max-messages", "0"], "is not a positive count"),
        ("republish_unrouted", ["--limit", "0"], "'0' is not a positive count"),
        ("install_beat_schedule", ["--relay-every", str(2**31)], "is not a number of seconds"),
    ],
)
def test_values_that_would_misbehave_are_refused_with_a_message(
    command: str, args: list[str], text: str
) -> None:
    with pytest.raises(CommandError) as info:
        call_command(command, *args, stdout=StringIO(), stderr=StringIO())
    assert text in str(info.value)


def test_a_metrics_port_in_use_is_a_clear_error(re_settings: Any) -> None:
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(CommandError, match=f"cannot serve metrics on port {port}: "):
            call_command("relay_outbox", "--metrics-port", str(port), stdout=StringIO())


def test_arguments_the_parser_refuses_exit_1_not_argparse_2() -> None:
    """2 is ``reliable_events_health``'s "database does not answer": a probe with a typo
    must not read as that."""
    for args in (
        ["reliable_events_health", "--bogus"],
        ["outbox_status", "--max-pending-age", "x"],
    ):
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 1, result.stderr
        assert "error:" in result.stderr


def test_retry_dead_letters_of_a_consumer_nobody_registered_warns_of_a_typo(
    clean_registry: Any,
) -> None:
    """It exits 0 (nothing matched is not an error), but ``--consumer biling`` no longer
    passes unsaid (a trial)."""
    out, err = run("retry_dead_letters", "--consumer", "biling")
    assert "retry_dead_letters: " in out
    assert err == (
        "warning: no consumer named 'biling' is registered and none of the open dead letters "
        "is its: a typo? (consume_events --list names them)\n"
    )


@pytest.mark.django_db(transaction=True)
def test_outbox_status_with_the_database_down_is_one_line_and_exit_2() -> None:
    """A monitoring probe read a traceback and exit 1 (the code of a usage error)."""
    with database_not_answering(), pytest.raises(CommandError) as failed:
        run("outbox_status", "--skip-broker")
    assert failed.value.returncode == 2
    assert str(failed.value).startswith("the database does not answer (OperationalError")
    assert str(failed.value).endswith("): nothing could be counted")
