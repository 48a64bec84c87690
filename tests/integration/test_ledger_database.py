"""The ledger on the database transport (``BROKER_URL = "db://"``): 5,000 events through
real processes while the relay and the consumers are SIGKILLed at random moments.

* **SQLite** (the embedded default): its own database file (WAL, ``BEGIN IMMEDIATE``, as
  recommended for several processes), one relay, one consumer process; runs in the
  SQLite tier of ``scripts/test`` (skipped on PostgreSQL, whose tier runs the next one);
* **PostgreSQL**: the test database, two relays and two competing consumer processes on
  the consumer's queue (``FOR UPDATE SKIP LOCKED``).

Producers (``manage.py ledger_produce``) commit an ``Order`` and its event in one
transaction; every 1-3 s a random relay or consumer is SIGKILLed and started again.
Every setting is the shipped default but the broker URL and the exchange name.  Then
each message id is checked: every committed event applied exactly once (its unique
``Effect`` and its ``ProcessedMessage``), dead letters exactly for the designed
permanent failures, the designed transient failures applied on their retry, nothing
left in the queue table.  Besides the random kills, two are aimed: a consumer that just
printed it is applying a "slow" event (it pauses inside its transaction) is killed at
once.  That kills landed inside consumer transactions is shown by the ledger consumer's
"applying" lines: an id printed more often than it was applied had its transaction cut
short and was claimed again.

Traces (OpenTelemetry SDK in every child, each span exported to a file as it ends,
``tests/support/otel_support.py``): every applied event has a ``process`` span that
leads back to the span current when ``publish_event`` ran, including the events of a
producer that SIGKILLs itself between its commit and its on-commit publish (the relay's
sweep sends them) and dead letters re-driven with an edited payload after the chaos.

These tests kill only their own child processes (not ``disruptive``).
``RE_DB_LEDGER_EVENTS`` changes the number of events.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.db import connection

from reliable_events.conf import AppSettings
from reliable_events.consuming import PERMANENT_ERROR
from tests.support.ledger_support import chaos, kill_in_handler, ledger_fleet, n_of
from tests.support.otel_support import SPANS_ENV, check_ledger_traces, read_span_files
from tests.support.producer_support import ROOT, child_env
from tests.support.service_control import wait_for
from tests.testapp.consumers import APPLIED_TWICE, APPLYING
from tests.testapp.management.commands.ledger_produce import designed_failure

EVENTS = int(os.environ.get("RE_DB_LEDGER_EVENTS", "5000"))
PRODUCERS = 2
PER_TRANSACTION = 5
#: The whole test (set-up to assertions) stays within this, hangs included.  A hang guard,
#: not a speed goal: a quiet machine converges in about a minute, a CI machine running
#: other lanes beside it may take three times as long.
BUDGET_SECONDS = 270.0
pytestmark = pytest.mark.timeout(int(BUDGET_SECONDS) + 90)
#: The ledger consumer's own retry policy (a consumer attribute, not a library setting).
MAX_RETRIES = 3
RETRY_DELAYS = [0.5]
DUPLICATE_LINE = "skipped duplicate"
#: Kills aimed inside a handler (at "slow" events), besides the random ones.
HANDLER_KILLS = 2
#: Random kills at least (the chaos goes on after the producers until there were this many).
MIN_KILLS = 15
#: Events of the producer that dies between its commit and its on-commit publish.
CRASH_EVENTS = 5
#: Dead letters re-driven (edit and retry, the payload fixed) after the chaos.
REDRIVE = 3
#: Run in a child (the ledger's database): edit-and-retry dead letters, print the copies.
REDRIVE_CODE = """
import json
from reliable_events import deadletters
from reliable_events.models import DeadLetter
copies = {}
for letter in DeadLetter.objects.filter(consumer=%r, status="open").order_by("id")[:%d]:
    result = deadletters.edit_and_retry(letter, {**letter.payload, "fail": None}, user="ledger")
    copies[result.copies[letter.pk]] = letter.message_id
print("REDRIVEN " + json.dumps(copies))
"""

Query = Callable[[str], list[tuple[Any, ...]]]


def shipped_settings(exchange: str) -> dict[str, Any]:
    """The children's ``RELIABLE_EVENTS``: the shipped defaults (the test settings tune
    some), the database transport and this run's exchange name."""
    defaults = {name: getattr(AppSettings, name) for name in AppSettings.names()}
    defaults.update(BROKER_URL="db://", EXCHANGE=exchange, CELERY_CONSUMERS=None)
    return defaults


def redrive(env: dict[str, str], consumer: str) -> dict[str, str]:
    """Edit and retry ``REDRIVE`` open dead letters (their payload fixed), in a child
    process (the service the admin uses) with the fleet's settings (``env``: its broker;
    the test settings' in-process one would take the copies away with the child); the
    copies' ids -> the original ids."""
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "manage.py"),
            "shell",
            "-c",
            REDRIVE_CODE % (consumer, REDRIVE),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    line = next(x for x in done.stdout.splitlines() if x.startswith("REDRIVEN "))
    copies: dict[str, str] = json.loads(line.split(" ", 1)[1])
    return copies


def run_ledger(
    *, env: dict[str, str], query: Query, relays: int, consumers: int, logs: Path
) -> tuple[str, dict[str, Any]]:
    """Run the fleet through the chaos until every event is settled; the ledger's figures."""
    started = time.monotonic()
    deadline = started + BUDGET_SECONDS
    run = f"dbledger-{uuid.uuid4().hex[:8]}"
    name = f"{run}.apply"
    spans = logs / "spans"
    spans.mkdir()
    fleet = ledger_fleet(
        env={
            **env,
            SPANS_ENV: str(spans),
            "RE_TEST_RELIABLE_EVENTS": json.dumps(shipped_settings(f"test-ev-{run}")),
        },
        logs=logs,
        run=run,
        events=EVENTS,
        producers=PRODUCERS,
        per_transaction=PER_TRANSACTION,
        budget_seconds=BUDGET_SECONDS,
        consumer={
            "name": name,
            "topics": ["ledger.#"],
            "max_retries": MAX_RETRIES,
            "retry_delays": RETRY_DELAYS,
        },
        crash_events=CRASH_EVENTS,
    )
    stop_chaos = threading.Event()
    chaos_errors: list[BaseException] = []
    chaos_thread = threading.Thread(target=chaos, args=(fleet, stop_chaos, chaos_errors))
    aimed: list[str] = []
    aim_thread = threading.Thread(
        target=kill_in_handler,
        args=(fleet, stop_chaos, chaos_errors, aimed),
        kwargs={"kills": HANDLER_KILLS},
    )

    def count(sql: str) -> int:
        return int(query(sql)[0][0])

    outbox = f"FROM reliable_events_outboxmessage WHERE message_id LIKE '{run}-%'"

    def converged() -> bool:
        fleet.revive()
        pending = count(f"SELECT COUNT(*) {outbox} AND status <> 'sent'")
        settled = count(f"SELECT COUNT(*) FROM testapp_effect WHERE consumer = '{name}'") + count(
            "SELECT COUNT(DISTINCT message_id) FROM reliable_events_deadletter "
            f"WHERE consumer = '{name}'"
        )
        queued = count("SELECT COUNT(*) FROM reliable_events_queuedmessage")
        return pending == 0 and queued == 0 and settled >= count(f"SELECT COUNT(*) {outbox}")

    def converged_twice() -> bool:
        if not converged():
            return False
        time.sleep(1.0)
        return converged()

    marks: dict[str, float] = {}
    try:
        with fleet.lock:
            for i in range(consumers):
                fleet.start("consumer", i)
            for i in range(relays):
                fleet.start("relay", i)
            for i in range(PRODUCERS):
                fleet.start("producer", i)
            crasher = fleet.start("crasher", 0)
        chaos_thread.start()
        aim_thread.start()
        wait_for(
            lambda: all(c.proc.poll() is not None for c in fleet.producers()),
            timeout=max(0.0, deadline - time.monotonic() - 40),
        )
        marks["producers_done"] = time.monotonic() - started
        codes = [c.proc.poll() for c in fleet.producers()]
        # A fast run keeps the chaos going while the backlog drains, up to MIN_KILLS.
        wait_for(
            lambda: fleet.kills >= MIN_KILLS and len(aimed) >= HANDLER_KILLS,
            timeout=max(0.0, deadline - time.monotonic() - 40),
        )
        stop_chaos.set()
        chaos_thread.join(60)
        aim_thread.join(60)
        quiet = wait_for(
            converged_twice, timeout=max(0.0, deadline - time.monotonic() - 25), interval=1.0
        )
        marks["converged"] = time.monotonic() - started
        copies = redrive(fleet.env, name) if quiet else {}
        listed = ", ".join(f"'{c}'" for c in copies) or "''"
        wait_for(
            lambda: (
                count(
                    f"SELECT COUNT(*) FROM testapp_effect WHERE consumer = '{name}' "
                    f"AND message_id IN ({listed})"
                )
                == len(copies)
            ),
            timeout=max(0.0, deadline - time.monotonic() - 10),
            interval=0.5,
        )
        marks["redriven"] = time.monotonic() - started
        fleet.stop(("consumer", "relay"))
    finally:
        stop_chaos.set()
        for thread in (chaos_thread, aim_thread):
            if thread.is_alive():
                thread.join(60)
        fleet.kill_all()
        (logs / "timeline.log").write_text("\n".join(fleet.timeline) + "\n")

    consumer_logs = fleet.text("consumer")
    every_effect = query(
        f"SELECT message_id, payload FROM testapp_effect WHERE consumer = '{name}'"
    )
    effects = [row for row in every_effect if row[0] not in copies]
    figures: dict[str, Any] = {
        "ids": {row[0] for row in query(f"SELECT message_id {outbox} AND queue = ''")},
        "statuses": dict(query(f"SELECT status, COUNT(*) {outbox} GROUP BY status")),
        "orders": Counter(
            row[0]
            for row in query(f"SELECT reference FROM testapp_order WHERE reference LIKE '{run}-%'")
        ),
        "applied": Counter(row[0] for row in effects),
        "attempts": {row[0]: _json(row[1])["attempt"] for row in effects},
        "processed": {
            row[0]
            for row in query(
                f"SELECT message_id FROM reliable_events_processedmessage WHERE consumer = '{name}'"
            )
        },
        "letters": query(
            "SELECT message_id, reason, error_type, error_message, status "
            f"FROM reliable_events_deadletter WHERE consumer = '{name}'"
        ),
        "leftover": dict(
            query("SELECT queue, COUNT(*) FROM reliable_events_queuedmessage GROUP BY queue")
        ),
        "applying": Counter(
            line.split()[-1] for line in consumer_logs.splitlines() if line.startswith(APPLYING)
        ),
        "duplicates": consumer_logs.count(DUPLICATE_LINE),
        "codes": codes,
        "crasher_code": crasher.proc.poll(),
        "quiet": quiet,
        "kills": fleet.kills,
        "aimed": aimed,
        "kills_by_kind": Counter(
            line.split("SIGKILLed ", 1)[1].split("-", 1)[0]
            for line in fleet.timeline
            if "SIGKILLed " in line
        ),
        "unexpected_exits": fleet.unexpected_exits,
        "chaos_errors": chaos_errors,
        "wall": time.monotonic() - started,
        "marks": marks,
        "producer_log": fleet.text("producer")[-3000:],
        "expected": EVENTS + CRASH_EVENTS,
        "copies": copies,
        "copies_applied": {row[0] for row in every_effect if row[0] in copies},
    }
    figures["traces"] = check_ledger_traces(
        read_span_files(spans),
        {row[0]: _json(row[1]).get("trace") or {} for row in every_effect},
        copies=copies,
        swept={i for i in figures["ids"] if i.startswith(f"{run}-crash-")},
        exported_before_commit=True,
    )
    return run, figures


def _json(value: Any) -> dict[str, Any]:
    loaded = json.loads(value) if isinstance(value, str | bytes) else value
    assert isinstance(loaded, dict)
    return loaded


def check_ledger(figures: dict[str, Any], report_figures: Any, label: str) -> None:
    """The ledger: nothing lost, nothing applied twice, dead letters exactly as designed."""
    ids: set[str] = figures["ids"]
    expected: int = figures["expected"]
    copies: dict[str, str] = figures["copies"]
    trace_figures, trace_failures = figures["traces"]
    applied: Counter[str] = figures["applied"]
    attempts: dict[str, int] = figures["attempts"]
    letters: list[tuple[Any, ...]] = figures["letters"]
    dead = Counter(letter[0] for letter in letters)

    permanent = {i for i in ids if designed_failure(n_of(i)) == "permanent"}
    once = {i for i in ids if designed_failure(n_of(i)) == "once"}
    lost = ids - set(applied) - set(dead)
    # Claimed again after a kill cut the transaction short (or a database error rolled it back).
    interrupted = sum(
        1 for i, printed in figures["applying"].items() if printed > applied.get(i, 0)
    )
    report_figures(
        f"\nledger on the database transport ({label}): events={len(ids)} (expected "
        f"{EVENTS}) applied={len(applied)} dead_letters={len(letters)} (designed "
        f"{len(permanent)}) failed_once_then_applied="
        f"{sum(1 for i in once if attempts.get(i, 0) >= 2)}"
        f"\n  kills={figures['kills']} ({dict(figures['kills_by_kind'])}, "
        f"{len(figures['aimed'])} aimed inside a handler) "
        f"unexpected_exits={len(figures['unexpected_exits'])} "
        f"transactions_cut_by_kills={interrupted} duplicates_absorbed={figures['duplicates']} "
        f"lost={len(lost)} applied_twice={sum(1 for c in applied.values() if c > 1)}"
        f"\n  traces: {trace_figures} failures={len(trace_failures)}"
        f"\n  wall_time={figures['wall']:.1f}s "
        + " ".join(f"{k}={v:.1f}s" for k, v in figures["marks"].items())
        + f"\n  outbox={figures['statuses']} leftover_in_queues={figures['leftover']}"
    )
    assert not figures["chaos_errors"], f"the chaos thread failed: {figures['chaos_errors'][0]!r}"
    assert figures["codes"] == [0] * PRODUCERS, (figures["codes"], figures["producer_log"])
    assert figures["crasher_code"] == -9, "the crashing producer did not die after its commit"
    assert len(ids) == expected
    assert set(figures["orders"]) == ids
    assert set(figures["orders"].values()) == {1}
    assert figures["statuses"] == {"sent": expected}, "outbox rows not all sent"
    assert figures["quiet"], "the run did not converge (see the ledger line above)"
    assert not lost, f"{len(lost)} committed event(s) never applied: {sorted(lost)[:10]}"
    assert set(applied) == ids - permanent
    assert set(applied.values()) == {1}
    assert figures["processed"] == set(applied) | figures["copies_applied"], (
        "idempotency records do not match the effects"
    )
    assert not [x for x in letters if APPLIED_TWICE in x[3]], "applied twice"
    assert set(dead) == permanent, sorted(set(dead) ^ permanent)[:10]
    assert set(dead.values()) == {1}, [i for i, c in dead.items() if c > 1][:10]
    assert {(x[1], x[2]) for x in letters} == {
        (PERMANENT_ERROR, "reliable_events.exceptions.PermanentError")
    }
    # The re-driven letters are retried, their edited copies applied; the rest are open.
    assert len(copies) == REDRIVE
    assert figures["copies_applied"] == set(copies), "a re-driven copy was not applied"
    assert {x[0] for x in letters if x[4] == "retried"} == set(copies.values())
    assert {x[4] for x in letters if x[0] not in copies.values()} == {"open"}
    assert once
    assert all(attempts[i] >= 2 for i in once)
    retried = sorted(i for i, a in attempts.items() if a > 1 and i not in once)
    assert not retried, f"{len(retried)} undesigned retries, e.g. {retried[:5]}"
    assert figures["leftover"] == {}, figures["leftover"]
    assert figures["kills"] >= MIN_KILLS, "the chaos did not happen"
    assert len(figures["aimed"]) == HANDLER_KILLS, "the aimed kills did not happen"
    assert set(figures["aimed"]) <= set(applied), "a slow event killed in its handler was lost"
    assert interrupted >= len(figures["aimed"]), "no kill landed inside a consumer transaction"
    assert not figures["unexpected_exits"], figures["unexpected_exits"]
    # Traces: every applied event (re-driven copies too) has a process span leading back
    # to the span current when publish_event ran; the crashed producer's events went out
    # through the relay's sweep, linked to their creation.
    assert not trace_failures, trace_failures[:10]
    assert trace_figures["applied"] == len(applied) + len(copies)
    assert trace_figures["swept"] == CRASH_EVENTS
    assert trace_figures["redriven"] == REDRIVE


@pytest.mark.alone
def test_ledger_on_sqlite_and_the_database_transport_survives_sigkills(
    tmp_path: Path, report_figures: Any
) -> None:
    if connection.vendor != "sqlite":
        pytest.skip("the SQLite tier runs it (RE_TEST_DATABASE=sqlite)")
    database = tmp_path / "ledger.sqlite3"
    env = {
        **child_env(),
        "RE_TEST_DATABASE": "sqlite",
        "RE_TEST_SQLITE_NAME": str(database),
        "RE_TEST_SQLITE_WAL": "1",
    }
    subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), "migrate", "--noinput", "-v", "0"],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=120,
    )
    reader = sqlite3.connect(database, timeout=30, isolation_level=None)

    def query(sql: str) -> list[tuple[Any, ...]]:
        return reader.execute(sql).fetchall()

    try:
        _, figures = run_ledger(env=env, query=query, relays=1, consumers=1, logs=tmp_path)
    finally:
        reader.close()
    check_ledger(figures, report_figures, "SQLite, 1 relay, 1 consumer")


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.alone
@pytest.mark.django_db(transaction=True)
def test_ledger_on_postgresql_and_the_database_transport_with_two_consumers(
    tmp_path: Path, report_figures: Any
) -> None:
    if connection.vendor != "postgresql":
        pytest.skip("the PostgreSQL tier runs it")

    def query(sql: str) -> list[tuple[Any, ...]]:
        with connection.cursor() as cursor:
            cursor.execute(sql)
            rows: list[tuple[Any, ...]] = cursor.fetchall()
            return rows

    _, figures = run_ledger(env=child_env(), query=query, relays=2, consumers=2, logs=tmp_path)
    check_ledger(figures, report_figures, "PostgreSQL, 2 relays, 2 consumers")
