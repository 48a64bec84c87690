"""The ledger: 10,000 events through real processes while everything is killed and restarted.

* 3 producer processes (``manage.py ledger_produce``) commit an ``Order`` and its event in
  one transaction (``publish_event``), retrying their transaction while PostgreSQL
  restarts; the outbox rows (``queue=''``) are the ledger of committed events;
* 2 ``relay_outbox`` and 2 ``consume_events`` processes (one consumer, two competing
  processes on its queue; ``tests/testapp/consumers.py``) run throughout;
* every 1-3 s a random relay or consumer is SIGKILLed and restarted at once, and twice
  a consumer is SIGKILLed inside a handler (a "slow" event, unacknowledged), which must
  come back as a redelivery;
* RabbitMQ is restarted once (``rabbitmqctl stop_app`` / ``start_app``) and PostgreSQL
  once (``pg_ctlcluster ... restart``) in the middle of the run; both are running again
  (and accept connections) when the test ends, whatever happens.

Then every message id is checked: each committed event applied exactly once (a unique
``Effect`` row and its ``ProcessedMessage``), nothing applied twice, dead letters exactly
for the designed permanent failures (1 %), the designed transient failures (1 %, fail on
attempt 1) applied once on their retry.  Redeliveries and the duplicates the idempotency
record absorbed are counted from the consumers' log files (``reliable_events.consuming``
writes one INFO line each), which survive SIGKILL.

Traces (OpenTelemetry SDK in every child, each span exported to a file as it ends,
``tests/support/otel_support.py``): every applied event has a ``process`` span that leads
back to the span current when ``publish_event`` ran, including the events of a producer
that SIGKILLs itself between its commit and its on-commit publish (the relay's sweep
sends them) and dead letters re-driven with an edited payload after the chaos.

Marked ``disruptive``: it restarts the shared PostgreSQL and RabbitMQ (set
``RE_DISRUPTIVE_TESTS=1``; ``scripts/test`` does).  ``RE_LEDGER_EVENTS`` changes the
number of events (default 10,000).  Bounded: about 5 minutes at worst.  The second test
is the same ledger without the service restarts (only its own children are killed, so
not ``disruptive``), with every Django connection (this process and every child)
going through a private PgBouncer in transaction pooling mode
(``tests/support/pgbouncer.py``), on ``RE_LEDGER_PGBOUNCER_EVENTS`` events (default 3,000).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import DatabaseError, InterfaceError, connection

from reliable_events import deadletters
from reliable_events.consuming import PERMANENT_ERROR
from reliable_events.models import DeadLetter, OutboxMessage, ProcessedMessage
from reliable_events.topology import declare_on_amqp_channel, full_topology
from tests.support.consumer_support import make_consumer
from tests.support.ledger_support import chaos, db, kill_in_handler, ledger_fleet, n_of
from tests.support.otel_support import SPANS_ENV, check_ledger_traces, read_span_files
from tests.support.producer_support import child_env
from tests.support.service_control import (
    ensure_postgres,
    ensure_rabbitmq,
    restart_postgres,
    restart_rabbitmq,
    wait_for,
)
from tests.testapp.consumers import APPLIED_TWICE
from tests.testapp.management.commands.ledger_produce import designed_failure
from tests.testapp.models import Effect, Order

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.postgres,
    pytest.mark.rabbitmq,
    pytest.mark.slow,
]

EVENTS = int(os.environ.get("RE_LEDGER_EVENTS", "10000"))
#: Events of the variant without service restarts, through PgBouncer (the pooler and the
#: lane leases are what it proves; kept shorter for the CI budget).
PGBOUNCER_EVENTS = int(os.environ.get("RE_LEDGER_PGBOUNCER_EVENTS", "3000"))
#: Random kills at least (the chaos goes on after the producers until there were this many).
MIN_KILLS = 10
#: Kills aimed inside a handler (at "slow" events, their message unacknowledged), besides
#: the random ones: each must come back as a redelivery.  A short run's random kills may
#: all land on consumers that had nothing in flight.
HANDLER_KILLS = 2
#: Events of the producer that dies between its commit and its on-commit publish.
CRASH_EVENTS = 5
#: Dead letters re-driven (edit and retry, the payload fixed) after the chaos.
REDRIVE = 3
PRODUCERS = 3
#: Orders (each with its event) per producer transaction.
PER_TRANSACTION = 5
RELAYS = 2
CONSUMERS = 2
#: The whole test (set-up to assertions) stays within this, hangs included.
BUDGET_SECONDS = 270.0
MAX_RETRIES = 3
RETRY_DELAYS = [0.5]
REDELIVERED_LINE = "received a redelivered message"
DUPLICATE_LINE = "skipped duplicate"
#: Log lines of the children that show a fault was felt.
BROKER_FAULT_LINES = ("broker connection lost or refused", "publish failed")
DATABASE_FAULT_LINES = ("waiting for the database", "database error", "OperationalError")
#: Settings of every child: the shipped publish retry policy (a broker restart charges
#: no attempt, so no row can go dead of it) on the tests' TIME_SCALE clock, quick
#: reconnects, short on-commit reservation.
CHILD_SETTINGS: dict[str, Any] = {
    "ON_COMMIT_GRACE_SECONDS": 3.0,
    "CONSUMER_RECONNECT_MAX": 2.0,
    "CONNECT_TIMEOUT": 3.0,
    "CONFIRM_TIMEOUT": 10.0,
    "PREFETCH_COUNT": 20,
}

# -- services: tests/support/service_control.py; processes: tests/support/ledger_support.py


# -- the broker, seen from outside --------------------------------------------------------
class Queues:
    """Ready-message counts of the run's queues over a connection that reconnects."""

    def __init__(self, url: str, names: list[str]) -> None:
        self.url = url
        self.names = names
        self._conn: Any = None

    def counts(self) -> dict[str, int]:
        from kombu import Connection

        for _ in range(3):
            try:
                if self._conn is None:
                    self._conn = Connection(self.url, connect_timeout=3)
                    self._conn.ensure_connection(max_retries=0)
                channel: Any = self._conn.default_channel
                return {
                    name: int(channel.queue_declare(name, passive=True).message_count)
                    for name in self.names
                }
            except Exception:
                self.close()
                time.sleep(0.5)
        raise AssertionError("cannot read the queue counts from RabbitMQ")

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.release()
            self._conn = None

    def delete(self, exchanges: list[str]) -> None:
        from kombu import Connection

        self.close()
        with Connection(self.url, connect_timeout=5) as conn:
            channel: Any = conn.channel()
            for name in self.names:
                channel.queue_delete(name)
            for name in exchanges:
                channel.exchange_delete(name)


# -- the test ---------------------------------------------------------------------------
@pytest.fixture
def services(amqp_url: str) -> Iterator[None]:
    """Both services run before the test and are running again after it, whatever happens."""
    ensure_rabbitmq(amqp_url)
    ensure_postgres()
    try:
        yield
    finally:
        try:
            ensure_rabbitmq(amqp_url)
        finally:
            ensure_postgres()
            with contextlib.suppress(DatabaseError, InterfaceError):
                connection.close()  # the next query reconnects to the restarted server


@pytest.fixture
def run(services: None, amqp_url: str) -> Iterator[str]:
    """This run's unique name; its exchanges and queues are deleted after the test."""
    run = f"ledger-{uuid.uuid4().hex[:8]}"
    yield run
    exchange = f"test-ev-{run}"
    ensure_rabbitmq(amqp_url)
    names = [f"{run}.apply", f"{run}.apply.retry.1", f"{exchange}.unrouted"]
    Queues(amqp_url, names).delete([exchange, f"{exchange}.unrouted"])


@pytest.mark.disruptive
def test_ledger_every_committed_event_applied_exactly_once_through_kills_and_restarts(
    run: str,
    amqp_url: str,
    settings: Any,
    clean_registry: Any,
    tmp_path: Path,
    report_figures: Any,
) -> None:
    ledger(run, amqp_url, settings, clean_registry, tmp_path, report_figures, EVENTS, True)


def test_ledger_through_pgbouncer_every_committed_event_applied_once_and_traced_through_kills(
    through_pgbouncer: Any,
    run: str,
    amqp_url: str,
    settings: Any,
    clean_registry: Any,
    tmp_path: Path,
    report_figures: Any,
) -> None:
    ledger(
        run, amqp_url, settings, clean_registry, tmp_path, report_figures, PGBOUNCER_EVENTS, False
    )


def ledger(
    run: str,
    amqp_url: str,
    settings: Any,
    clean_registry: Any,
    tmp_path: Path,
    report_figures: Any,
    events: int,
    restarts_too: bool,
) -> None:
    """The ledger on ``events`` events; ``restarts_too``: RabbitMQ and PostgreSQL are
    restarted during the run (disruptive)."""
    expected = events + CRASH_EVENTS
    started = time.monotonic()
    deadline = started + BUDGET_SECONDS
    exchange = f"test-ev-{run}"
    name = f"{run}.apply"
    settings.RELIABLE_EVENTS = {
        **settings.RELIABLE_EVENTS,
        **CHILD_SETTINGS,
        "BROKER_URL": amqp_url,
        "EXCHANGE": exchange,
    }
    # The consumer's topology, declared before any event is published (the children
    # declare the same on connect: same name, topics, retries and delays).
    twin = make_consumer(
        clean_registry,
        name=name,
        topics=["ledger.#"],
        max_retries=MAX_RETRIES,
        retry_delays=RETRY_DELAYS,
    )
    topology = full_topology(twin.queue_specs())
    queues = Queues(amqp_url, [q.name for q in topology.queues])
    from kombu import Connection

    with Connection(amqp_url, connect_timeout=5) as conn:
        declare_on_amqp_channel(conn.channel(), topology)

    spans = tmp_path / "spans"
    spans.mkdir()
    fleet = ledger_fleet(
        env={**child_env(), SPANS_ENV: str(spans)},
        logs=tmp_path,
        run=run,
        events=events,
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
    restarts: list[str] = []
    marks: dict[str, float] = {}

    def committed() -> int:
        return db(lambda: OutboxMessage.objects.filter(message_id__startswith=run).count())

    def producers_done() -> bool:
        return all(c.proc.poll() is not None for c in fleet.producers())

    def reached(fraction: float) -> Callable[[], bool]:
        return lambda: producers_done() or committed() >= events * fraction

    try:
        with fleet.lock:
            for i in range(CONSUMERS):
                fleet.start("consumer", i)
            for i in range(RELAYS):
                fleet.start("relay", i)
            for i in range(PRODUCERS):
                fleet.start("producer", i)
            crasher = fleet.start("crasher", 0)
        chaos_thread.start()
        aim_thread.start()

        if restarts_too:
            # RabbitMQ restart at ~30 % of the events, PostgreSQL restart at ~60 %.
            wait_for(reached(0.3), timeout=max(0.0, deadline - time.monotonic() - 150))
            marks["rabbitmq restart at"] = time.monotonic() - started
            fleet.note("rabbitmqctl stop_app")
            restart_rabbitmq(amqp_url)
            fleet.note("rabbitmq accepts connections again")
            restarts.append(f"rabbitmq at {committed()} committed")
            wait_for(reached(0.6), timeout=max(0.0, deadline - time.monotonic() - 120))
            marks["postgresql restart at"] = time.monotonic() - started
            fleet.note("pg_ctlcluster restart")
            restart_postgres()
            with contextlib.suppress(DatabaseError, InterfaceError):
                connection.close()
            fleet.note("postgresql accepts connections again")
            restarts.append(f"postgresql at {committed()} committed")

        wait_for(producers_done, timeout=max(0.0, deadline - time.monotonic() - 60))
        marks["producers done"] = time.monotonic() - started
        codes = [c.proc.poll() for c in fleet.producers()]
        # A short run keeps the chaos going while the backlog drains, up to MIN_KILLS.
        wait_for(
            lambda: fleet.kills >= MIN_KILLS and len(aimed) >= HANDLER_KILLS,
            timeout=max(0.0, deadline - time.monotonic() - 90),
        )
        stop_chaos.set()
        chaos_thread.join(60)
        aim_thread.join(60)

        # Converge: nothing pending in the outbox, every id applied or dead-lettered,
        # and the queues empty twice in a row.
        def converged() -> bool:
            fleet.revive()
            pending = db(
                lambda: (
                    OutboxMessage.objects.filter(message_id__startswith=run)
                    .exclude(status=OutboxMessage.Status.SENT)
                    .count()
                )
            )
            settled = db(
                lambda: (
                    Effect.objects.filter(consumer=name).count()
                    + DeadLetter.objects.filter(consumer=name)
                    .values("message_id")
                    .distinct()
                    .count()
                )
            )
            return pending == 0 and settled >= committed() and not any(queues.counts().values())

        def converged_twice() -> bool:
            if not converged():
                return False
            time.sleep(1.0)
            return converged()

        quiet = wait_for(
            converged_twice, timeout=max(0.0, deadline - time.monotonic() - 30), interval=1.0
        )
        marks["converged"] = time.monotonic() - started
        # Re-drive a few dead letters, their payload fixed (the admin's edit and retry).
        copies: dict[str, str] = {}
        for letter in db(lambda: list(DeadLetter.objects.filter(consumer=name).order_by("id"))):
            if len(copies) < REDRIVE and quiet:
                fixed = dict(letter.payload or {}, fail=None)
                result = deadletters.edit_and_retry(letter, fixed, user="ledger")
                copies[result.copies[letter.pk]] = letter.message_id
        wait_for(
            lambda: (
                Effect.objects.filter(consumer=name, message_id__in=list(copies)).count()
                == len(copies)
            ),
            timeout=max(0.0, deadline - time.monotonic() - 10),
            interval=0.5,
        )
        marks["redriven"] = time.monotonic() - started
        fleet.stop(("consumer", "relay"))
        leftover = queues.counts()
    finally:
        stop_chaos.set()
        for thread in (chaos_thread, aim_thread):
            if thread.is_alive():
                thread.join(60)
        fleet.kill_all()
        queues.close()
        (tmp_path / "timeline.log").write_text("\n".join(fleet.timeline) + "\n")
    wall = time.monotonic() - started

    # -- the ledger --------------------------------------------------------------------
    ids = set(
        db(
            lambda: list(
                OutboxMessage.objects.filter(message_id__startswith=run, queue="").values_list(
                    "message_id", flat=True
                )
            )
        )
    )
    statuses = Counter(
        OutboxMessage.objects.filter(message_id__startswith=run).values_list("status", flat=True)
    )
    orders = Counter(
        Order.objects.filter(reference__startswith=run).values_list("reference", flat=True)
    )
    every_effect: list[tuple[str, Any]] = list(
        Effect.objects.filter(consumer=name).values_list("message_id", "payload")
    )
    effects = [row for row in every_effect if row[0] not in copies]
    copies_applied = {row[0] for row in every_effect if row[0] in copies}
    trace_figures, trace_failures = check_ledger_traces(
        read_span_files(spans),
        {message_id: payload.get("trace") or {} for message_id, payload in every_effect},
        copies=copies,
        swept={i for i in ids if i.startswith(f"{run}-crash-")},
        exported_before_commit=False,
    )
    applied = Counter(message_id for message_id, _ in effects)
    processed = set(
        ProcessedMessage.objects.filter(consumer=name).values_list("message_id", flat=True)
    )
    letters: list[tuple[str, str, str, str, str]] = list(
        DeadLetter.objects.filter(consumer=name).values_list(
            "message_id", "reason", "error_type", "error_message", "status"
        )
    )
    dead = Counter(letter[0] for letter in letters)

    permanent = {i for i in ids if designed_failure(n_of(i)) == "permanent"}
    once = {i for i in ids if designed_failure(n_of(i)) == "once"}
    attempts = {message_id: payload["attempt"] for message_id, payload in effects}
    consumer_logs = fleet.text("consumer")
    redeliveries = consumer_logs.count(REDELIVERED_LINE)
    duplicates = consumer_logs.count(DUPLICATE_LINE)
    every_log = consumer_logs + fleet.text("relay") + fleet.text("producer")
    # The restarts were felt (else they proved nothing): broker connections lost or
    # refused, publishes failed; database errors and transactions retried.
    broker_faults = sum(every_log.count(line) for line in BROKER_FAULT_LINES)
    database_faults = sum(every_log.count(line) for line in DATABASE_FAULT_LINES)
    lost = ids - set(applied) - set(dead)

    report_figures(
        f"\nledger: events={len(ids)} (expected {expected}) applied={len(applied)} "
        f"dead_letters={len(letters)} (designed {len(permanent)}) "
        f"failed_once_then_applied={sum(1 for i in once if attempts.get(i, 0) >= 2)}"
        f"\n  kills={fleet.kills} ({len(aimed)} aimed inside a handler) restarts={len(restarts)} "
        f"({'; '.join(restarts)}) "
        f"unexpected_exits={len(fleet.unexpected_exits)}"
        f"\n  broker_faults_felt={broker_faults} database_faults_felt={database_faults} "
        f"redeliveries_seen={redeliveries} duplicates_absorbed={duplicates} "
        f"lost={len(lost)} applied_twice={sum(1 for c in applied.values() if c > 1)}"
        f"\n  traces: {trace_figures} failures={len(trace_failures)}"
        f"\n  wall_time={wall:.1f}s "
        + " ".join(f"{k}={v:.1f}s" for k, v in marks.items())
        + f"\n  outbox={dict(statuses)} leftover_in_queues={leftover}"
    )

    assert not chaos_errors, f"the chaos thread failed: {chaos_errors[0]!r}"
    assert codes == [0] * PRODUCERS, (codes, fleet.text("producer")[-3000:])
    assert crasher.proc.poll() == -9, "the crashing producer did not die after its commit"
    assert len(ids) == expected
    # The business row and its event committed together, once each.
    assert set(orders) == ids
    assert set(orders.values()) == {1}
    assert statuses == {OutboxMessage.Status.SENT: expected}, "outbox rows not all sent"
    assert quiet, "the run did not converge (see the ledger line above)"
    assert not lost, f"{len(lost)} committed event(s) never applied: {sorted(lost)[:10]}"
    assert set(applied) == ids - permanent
    assert set(applied.values()) == {1}
    assert processed == set(applied) | copies_applied, "idempotency records do not match"
    # Dead letters: exactly the designed permanent failures, one each, for that reason.
    assert not [x for x in letters if APPLIED_TWICE in x[3]], "applied twice"
    assert set(dead) == permanent, sorted(set(dead) ^ permanent)[:10]
    assert set(dead.values()) == {1}, [i for i, c in dead.items() if c > 1][:10]
    assert {(x[1], x[2]) for x in letters} == {
        (PERMANENT_ERROR, "reliable_events.exceptions.PermanentError")
    }
    # The re-driven letters are retried, their edited copies applied; the rest are open.
    assert len(copies) == REDRIVE
    assert copies_applied == set(copies), "a re-driven copy was not applied"
    assert {x[0] for x in letters if x[4] == DeadLetter.Status.RETRIED} == set(copies.values())
    assert {x[4] for x in letters if x[0] not in copies.values()} == {DeadLetter.Status.OPEN}
    # Designed transient failures: failed on attempt 1, applied once on a retry.
    assert once
    assert all(attempts[i] >= 2 for i in once)
    # Kills and restarts are not handler failures: nothing else was applied on a retry.
    retried = sorted(i for i, a in attempts.items() if a > 1 and i not in once)
    assert not retried, f"{len(retried)} undesigned retries, e.g. {retried[:5]}"
    assert leftover == dict.fromkeys(queues.names, 0), leftover
    assert fleet.kills >= MIN_KILLS, "the chaos did not happen"
    assert len(aimed) == HANDLER_KILLS, "the aimed kills did not happen"
    assert set(aimed) <= set(applied), "a slow event killed in its handler was lost"
    if restarts_too:
        assert broker_faults > 0, "nobody noticed the RabbitMQ restart"
        assert database_faults > 0, "nobody noticed the PostgreSQL restart"
    assert redeliveries > 0, "no redelivery was seen: the kills proved nothing"
    assert not fleet.unexpected_exits, fleet.unexpected_exits
    # Traces: every applied event (re-driven copies too) has a process span leading back
    # to the span current when publish_event ran; the crashed producer's events went out
    # through the relay's sweep, linked to their creation.
    assert not trace_failures, trace_failures[:10]
    assert trace_figures["applied"] == len(applied) + len(copies)
    assert trace_figures["swept"] == CRASH_EVENTS
    assert trace_figures["redriven"] == REDRIVE
