"""Liveness: heartbeats written and read back, the admin overview turning red, the health
command's exit codes, ``outbox_status --json``, the purge of stale heartbeats, and the
consume loop's own heartbeat."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from datetime import timedelta
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.db import connection, transaction
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from reliable_events import queue_loss
from reliable_events.conf import app_settings
from reliable_events.consumer.worker import Worker
from reliable_events.heartbeats import HeartbeatWriter
from reliable_events.liveness import liveness
from reliable_events.maintenance import purge
from reliable_events.models import Heartbeat, QueuedMessage
from reliable_events.publishing import publish_event
from reliable_events.queue_depths import clear_cache
from reliable_events.relay.claims import RelayReport
from tests.support.consumer_support import make_consumer
from tests.support.producer_support import database_not_answering, free_port, with_port
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _fresh(re_settings: Any) -> None:
    re_settings(BROKER_URL="db://", METRICS_CACHE_SECONDS=0)
    clear_cache()


def health(*args: str) -> tuple[int, str]:
    out = StringIO()
    try:
        call_command("reliable_events_health", *args, stdout=out)
    except CommandError as exc:
        return exc.returncode, out.getvalue() + str(exc)
    return 0, out.getvalue()


def test_a_heartbeat_is_written_at_most_every_interval_and_marked_stopped() -> None:
    writer = HeartbeatWriter("relay")
    assert writer.tick(RelayReport(sent=3))
    assert not writer.tick(RelayReport(sent=4))  # within HEARTBEAT_SECONDS
    row = Heartbeat.objects.get()
    assert (row.kind, row.pid, row.stopped) == ("relay", writer.pid, False)
    assert row.counters["sent"] == 3
    assert liveness().relays_alive == 1
    writer.stop(RelayReport(sent=5))
    row.refresh_from_db()
    assert row.stopped
    assert row.counters["sent"] == 5
    assert liveness().relays_alive == 0


def test_a_stale_heartbeat_is_not_alive_and_is_purged(clean_registry: Any) -> None:
    make_consumer(clean_registry, name="billing")
    HeartbeatWriter("consumer", ["billing"]).tick()
    old = timezone.now() - timedelta(days=2)
    Heartbeat.objects.update(last_seen=old)
    state = liveness()
    assert state.processes[0].alive is False
    billing = state.consumer("billing")
    assert billing is not None
    assert billing.problem.startswith("not seen for ")
    report = purge()
    assert report.heartbeats_deleted == 1
    assert not Heartbeat.objects.exists()
    assert "heartbeats_deleted=1" in str(report)


def test_health_command_exit_codes(clean_registry: Any) -> None:
    consumer = make_consumer(clean_registry, name="health.c")
    assert health()[0] == 0
    assert health("--relay")[0] == 3
    code, text = health("--consumers", "nobody")
    assert code == 1
    assert "no consumer named 'nobody'" in text
    assert health("--consumers")[0] == 4  # every registered one: never seen
    assert health("--consumers", consumer.name)[0] == 4

    HeartbeatWriter("relay").tick()
    beat = HeartbeatWriter("consumer", [consumer.name])
    beat.tick()
    assert health("--relay", "--consumers")[0] == 0
    assert health("--relay", "--consumers", "--this-host")[0] == 0
    Heartbeat.objects.filter(kind="consumer").update(host="elsewhere")
    code, text = health("--consumers", consumer.name, "--this-host")
    assert code == 4
    assert "no live process on this host" in text

    beat.stop()
    code, text = health("--relay", "--consumers", "--json")
    assert code == 4
    assert '"alive": false' in text
    Heartbeat.objects.filter(kind="relay").update(stopped=True)
    assert health("--relay", "--consumers")[0] == 3  # the first failing check wins


def _probe(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    """``manage.py reliable_events_health`` in a child process, as a Kubernetes probe runs
    it, on the test database reached through ``port``."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "PYTHONPATH": str(ROOT),
        "RE_TEST_DATABASE": "postgres",
        "RE_TEST_PG_NAME": connection.settings_dict["NAME"],
        "RE_TEST_PG_PORT": str(port),
    }
    return subprocess.run(
        [sys.executable, "manage.py", "reliable_events_health", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.postgres
def test_health_command_exits_2_when_the_database_does_not_answer() -> None:
    target = connection.settings_dict
    with TcpProxy(target["HOST"], int(target["PORT"])) as proxy:
        healthy = _probe(proxy.port)
        assert (healthy.returncode, healthy.stdout.strip()) == (0, "database: ok"), healthy.stderr

        proxy.stop()  # the database's address now refuses connections
        down = _probe(proxy.port, "--relay")
        assert down.returncode == 2, down.stdout + down.stderr
        assert down.stdout.startswith("database: ")
        assert down.stdout.strip() != "database: ok"
        assert "relays alive" not in down.stdout  # nothing else was asked of a dead database
        assert down.stderr.strip().endswith("unhealthy: the database does not answer")
        assert "Traceback" not in down.stderr

        as_json = _probe(proxy.port, "--json")
        assert as_json.returncode == 2
        report = json.loads(as_json.stdout)
        assert (report["status"], report["database"]) == ("fail", False)
        assert report["error"]


def test_outbox_status_json_includes_liveness(clean_registry: Any) -> None:
    consumer = make_consumer(clean_registry, name="status.c")
    HeartbeatWriter("consumer", [consumer.name]).tick({"processed": 7})
    QueuedMessage.objects.create(queue=consumer.queue_name(), message_id="m1", body=b"{}")
    for n in (2, 3):  # retries waiting for their delay
        QueuedMessage.objects.create(
            queue=consumer.queue_name(),
            message_id=f"m{n}",
            body=b"{}",
            attempt=2,
            available_at=timezone.now() + timedelta(hours=1),
        )
    QueuedMessage.objects.create(queue="another.queue", message_id="m4", body=b"{}")
    out = StringIO()
    call_command("outbox_status", "--json", stdout=out)
    data = json.loads(out.getvalue())["liveness"]
    assert data["relays_alive"] == 0
    (state,) = data["consumers"]
    assert state["name"] == consumer.name
    assert state["alive"] is True
    assert (state["messages"], state["retrying"]) == (1, 2)
    assert state["problem"] == ""
    assert data["processes"][0]["counters"] == {"processed": 7}
    text = StringIO()
    call_command("outbox_status", stdout=text)
    assert f"consumer {consumer.name}: alive (1 waiting in status.c, 2 retrying)" in text.getvalue()
    text = StringIO()
    call_command("outbox_status", "--skip-broker", stdout=text)
    assert f"consumer {consumer.name}: alive\n" in text.getvalue()


def test_admin_overview_turns_red_for_a_consumer_not_seen(
    admin_client: Client, clean_registry: Any
) -> None:
    seen = make_consumer(clean_registry, name="overview.seen")
    missing = make_consumer(clean_registry, name="overview.missing")
    HeartbeatWriter("consumer", [seen.name]).tick()
    page = admin_client.get(reverse("admin:reliable_events_overview")).content.decode()
    rows = page.split('<table id="re-consumers">')[1].split("</table>")[0].split("<tr")
    by_name = {
        name: row for row in rows for name in (seen.name, missing.name) if f"<td>{name}</td>" in row
    }
    assert "re-bad" in by_name[missing.name]
    assert "never seen" in by_name[missing.name]
    assert "re-bad" not in by_name[seen.name]
    assert "alive" in by_name[seen.name]
    assert '<td class="re-count">0</td>' in by_name[seen.name]  # retrying (db://)
    assert ">Retrying</th>" in page
    assert ">Unacked</th>" not in page  # BROKER_MANAGEMENT_URL not set: not asked
    assert 'id="re-liveness-note"' in page
    assert "0 relay daemons alive" in page

    HeartbeatWriter("consumer", [missing.name]).tick()
    HeartbeatWriter("relay").tick()
    page = admin_client.get(reverse("admin:reliable_events_overview")).content.decode()
    assert 're-bad"' not in page.split('<table id="re-consumers">')[1].split("</table>")[0]
    assert 'id="re-liveness-note"' not in page
    assert "1 relay daemon alive" in page


def test_a_process_that_stopped_beating_without_stopping_is_a_warning(
    admin_client: Client, clean_registry: Any
) -> None:
    consumer = make_consumer(clean_registry, name="silent.c")
    consumer.ordered = True
    now = timezone.now()
    timeout = liveness().timeout_seconds  # HEARTBEAT_TIMEOUT_SECONDS on the tests' clock
    for n, (age, stopped) in enumerate(((0, 0), (2, 0), (4, 0), (2, 1), (20, 0))):
        writer = HeartbeatWriter("consumer", [consumer.name])
        writer.pid += n
        assert writer.tick()
        assert writer.row_id is not None
        Heartbeat.objects.filter(pk=writer.row_id).update(
            last_seen=now - timedelta(seconds=age * timeout), stopped=bool(stopped)
        )
    state = liveness().consumer(consumer.name)
    assert state is not None
    # The killed or frozen ones of the last 10 timeouts: not the clean stop, not older.
    assert (state.processes, state.silent, state.problem) == (1, 2, "")
    ago = f"stopped beating {2 * timeout:.0f}s ago"
    assert state.warning.startswith(f"2 process(es) {ago} without a clean stop")
    assert "and the whole queue, until it resumes or is killed" in state.warning  # db://

    text = StringIO()
    call_command("outbox_status", stdout=text)
    assert (
        f"consumer {consumer.name}: alive (0 waiting in silent.c, 0 retrying); "
        "2 process(es) stopped" in text.getvalue()
    )
    out = StringIO()
    call_command("outbox_status", "--json", stdout=out)
    (shown,) = json.loads(out.getvalue())["liveness"]["consumers"]
    assert (shown["silent"], shown["warning"]) == (2, state.warning)
    page = admin_client.get(reverse("admin:reliable_events_overview")).content.decode()
    row = page.split('<table id="re-consumers">')[1].split("</table>")[0]
    assert 'class="re-warn"' in row
    assert f'<span class="re-silent">2 process(es) {ago}' in row
    metrics = admin_client.get(reverse("reliable_events_metrics")).content.decode()
    assert f'reliable_events_consumer_processes_silent{{consumer="{consumer.name}"}} 2.0' in metrics

    Heartbeat.objects.exclude(last_seen__gte=now).update(stopped=True)
    state = liveness().consumer(consumer.name)
    assert state is not None
    assert (state.silent, state.warning) == (0, "")


@pytest.mark.django_db(transaction=True)
def test_the_consume_loop_beats_and_stops_cleanly(clean_registry: Any, re_settings: Any) -> None:
    re_settings(BROKER_URL="memory://")
    consumer = make_consumer(clean_registry, name="beating.c")
    worker = Worker([consumer], url="memory://")
    worker.run(until_idle=0.3)
    row = Heartbeat.objects.get(kind="consumer")
    assert row.consumers == [consumer.name]
    assert row.stopped
    assert set(row.counters) >= {"processed", "dead_lettered", "retried"}
    state = liveness().consumer(consumer.name)
    assert state is not None
    assert state.problem


@pytest.mark.django_db(transaction=True)
def test_a_heartbeat_the_database_does_not_take_is_skipped_without_raising() -> None:
    writer = HeartbeatWriter("relay")
    with database_not_answering():
        assert writer.tick(RelayReport(sent=1)) is False
    assert not Heartbeat.objects.exists()
    assert HeartbeatWriter("relay").tick(RelayReport(sent=2))  # the database is back


def test_a_consumer_removed_from_the_code_shows_its_leftover_rows_until_forgotten(
    clean_registry: Any,
) -> None:
    consumer = make_consumer(clean_registry, name="removed.c")
    worker = Worker([consumer])
    worker.heartbeat.tick()
    worker.heartbeat.stop()
    assert Heartbeat.objects.get().topology == {
        consumer.name: {"queues": [consumer.queue_name(), "removed.c.retry.1"], "exchanges": []}
    }
    QueuedMessage.objects.create(queue=consumer.queue_name(), message_id="m1", body=b"{}")
    clean_registry.unregister(consumer.name)

    state = liveness().consumer(consumer.name)
    assert state is not None
    assert (state.retired, state.messages) == (True, 1)
    assert state.problem == (
        "not in the code any more; 1 message(s) left in removed.c (+1 more): "
        "`manage.py forget_consumer removed.c` deletes them"
    )
    with pytest.raises(CommandError, match=r"hold 1 message\(s\) that no consumer will apply"):
        call_command("forget_consumer", consumer.name)
    out = StringIO()
    call_command("forget_consumer", consumer.name, "--force", stdout=out)
    assert out.getvalue().splitlines() == [
        "  deleted queue removed.c: 1 message(s)",
        "  deleted queue removed.c.retry.1: 0 message(s)",
        "forget_consumer removed.c: 2 queue(s) with 1 message(s) and 0 exchange(s) deleted; "
        "taken out of 1 heartbeat(s)",
    ]
    assert not QueuedMessage.objects.exists()
    assert not Heartbeat.objects.exists()
    assert liveness().consumer(consumer.name) is None


def test_a_removed_consumer_that_left_nothing_is_history_and_its_heartbeat_is_purged(
    clean_registry: Any,
) -> None:
    consumer = make_consumer(clean_registry, name="gone.c")
    other = make_consumer(clean_registry, name="still.c")
    heartbeat = Worker([consumer, other]).heartbeat
    heartbeat.tick()
    clean_registry.unregister(consumer.name)
    state = liveness().consumer(consumer.name)
    assert state is not None
    assert (state.retired, state.problem) == (False, "")  # other code runs it
    heartbeat.stop()
    assert liveness().consumer(consumer.name) is None  # no row left in its queue
    assert forget_heartbeats_of(consumer.name) == (["still.c"], ["still.c"])


def forget_heartbeats_of(name: str) -> tuple[list[str], list[str]]:
    from reliable_events.heartbeats import forget_heartbeats

    assert forget_heartbeats(name) == 1
    row = Heartbeat.objects.get()
    return row.consumers, sorted(row.topology)


@pytest.mark.django_db(transaction=True)
def test_a_long_batch_of_slow_handlers_keeps_beating(clean_registry: Any, re_settings: Any) -> None:
    """A batch of 100 events longer than HEARTBEAT_TIMEOUT_SECONDS (a trial: handlers of
    0.4 s, 150 events: /health/ answered 503 for 25 s while the consumer worked)."""
    timeout = app_settings.seconds("HEARTBEAT_TIMEOUT_SECONDS")
    seen: list[bool] = []

    def slow(consumer: Any, event: Any) -> None:
        time.sleep(timeout / 20)
        state = liveness().consumer(consumer.name)
        seen.append(state is not None and state.alive > 0)

    consumer = make_consumer(clean_registry, name="slow.c", behaviour=slow)
    consumer.batch_size = 100  # as on RabbitMQ (CONSUMER_BATCH_SIZE); db:// takes one
    worker = Worker([consumer], url="db://")
    worker.heartbeat.tick(worker.stats)  # as the loop's first step does
    with transaction.atomic():
        for n in range(40):  # one batch, twice the timeout
            publish_event("orders.created", {"n": n}, message_id=f"slow-{n}")
    worker.run(until_idle=0.5, max_messages=40)
    assert len(seen) == 40
    assert all(seen), f"not alive while handling events {[n for n, a in enumerate(seen) if not a]}"


@pytest.mark.django_db(transaction=True)
def test_the_health_endpoint_names_no_host_or_role_when_the_database_is_down(
    client: Client, clean_registry: Any, caplog: Any
) -> None:
    """Unauthenticated: the database's error message (host, port, role) is logged, and
    what it holds is unknown (``null``), not "0 relays alive"."""
    consumer = make_consumer(clean_registry, name="down.c")
    with database_not_answering(), caplog.at_level(logging.WARNING, "reliable_events.health"):
        response = client.get(f"/health/?relay=1&consumers={consumer.name}")
        code, text = health("--consumers", consumer.name, "--json")
    assert response.status_code == 503
    body = response.json()
    assert body["error"] == (
        "the database does not answer (OperationalError); the details are logged"
    )
    assert (body["database"], body["relay"]["alive"]) == (False, None)
    assert body["consumers"] == {
        consumer.name: {"alive": None, "problem": "unknown: the database does not answer"}
    }
    logged = [r.getMessage() for r in caplog.records if "health check" in r.getMessage()]
    assert logged
    assert "OperationalError" in logged[0]
    assert code == 2
    assert json.loads(text.split("\n")[0])["error"].startswith("OperationalError")  # the CLI's


def test_a_relay_that_cannot_reach_the_broker_is_alive_but_not_working(
    clean_registry: Any,
) -> None:
    """A trial: a relay_outbox on a refused port counted as "relays alive: 1", and
    ``reliable_events_health --relay`` exited 0 while rows aged."""
    failing = HeartbeatWriter("relay")
    failing.tick(RelayReport())
    failing.broker_state("BrokerError: cannot connect to broker amqp://u:**@h:1//: refused")
    assert health("--relay") == (
        3,
        "database: ok\nrelays alive: 1 (1 cannot reach the broker: BrokerError: cannot "
        "connect to broker amqp://u:**@h:1//: refused)\nunhealthy: no relay daemon reaches "
        "the broker",
    )
    state = liveness()
    assert (state.relays_alive, state.relays_failing, state.relays_working) == (1, 1, 0)
    assert state.as_dict()["relay_broker_error"].endswith("refused")
    working = HeartbeatWriter("relay")
    working.tick(RelayReport())
    assert health("--relay")[0] == 0  # one of two publishes
    failing.broker_state("")  # it reaches the broker again: written at once
    assert liveness().relays_failing == 0


@pytest.mark.django_db(transaction=True)
def test_a_consumer_that_cannot_reach_the_broker_says_so(
    clean_registry: Any, re_settings: Any
) -> None:
    """Its process stays alive (it beats while it reconnects), and the consumer is down
    for that reason, not "not seen" or "killed, or frozen"."""
    url = with_port("amqp://guest:hunter2-secret@127.0.0.1//", free_port())
    re_settings(BROKER_URL=url)
    consumer = make_consumer(clean_registry, name="cut.c")
    worker = Worker([consumer], url=url)
    worker.run(until_idle=0.3)  # one refused connect, then it stops (a clean stop)
    row = Heartbeat.objects.get(kind="consumer")
    assert "Connection refused" in row.counters["broker_error"]
    assert "hunter2-secret" not in json.dumps(row.counters)
    Heartbeat.objects.update(stopped=False)  # as if it were still retrying
    state = liveness().consumer(consumer.name)
    assert state is not None
    assert (state.processes, state.cut_off) == (0, 1)
    assert state.problem.startswith("1 process(es) running, but none reaches the broker: ")
    assert "Connection refused" in state.problem


def test_a_recreated_queue_shows_for_an_hour_by_its_newest_note() -> None:
    now = timezone.now()
    notes = [
        {"c": (now - timedelta(minutes=50)).isoformat(), "other": now.isoformat()},
        {"c": (now - timedelta(minutes=5)).isoformat(), "c.retry.1": "not a time"},
        {"c.retry.2": (now - timedelta(minutes=61)).isoformat()},  # past the hour
    ]
    found = queue_loss.recent(notes, ["c", "c.retry.1", "c.retry.2"], now=now)
    assert found == {"c": now - timedelta(minutes=5)}  # the newest; another's queue left out
    assert queue_loss.warning("c", found, now=now) == (
        "c was deleted and declared again 300s ago: the messages in it and the retries due "
        "meanwhile are lost; `manage.py replay_events c --since <before it was deleted>` "
        "re-delivers them (what was applied is skipped)"
    )
