"""The three "counters + text" reports print through one base, with the lines scripts parse."""

from __future__ import annotations

from reliable_events.consumer.worker import WorkerStats
from reliable_events.maintenance import PurgeReport
from reliable_events.relay.claims import RelayReport


def test_relay_report_prints_its_counters_and_not_its_lanes():
    report = RelayReport(
        claimed=3, sent=2, failed=1, dead=0, interrupted=4, batches=5, seconds=1.23456, lanes=7
    )
    assert str(report) == "claimed=3 sent=2 failed=1 dead=0 interrupted=4 batches=5 seconds=1.235"


def test_purge_report_prints_its_counters():
    report = PurgeReport(
        outbox_deleted=1, processed_deleted=2, batches=3, seconds=0.5, heartbeats_deleted=4
    )
    assert str(report) == (
        "outbox_deleted=1 processed_deleted=2 batches=3 seconds=0.500 heartbeats_deleted=4"
    )


def test_worker_stats_print_counters_then_the_computed_mean_and_rate():
    stats = WorkerStats(
        processed=4,
        duplicates=1,
        retried=2,
        dead_lettered=3,
        poison=5,
        requeued=6,
        reconnects=7,
        database_outages=8,
        handler_seconds=0.01,
        first_settled=100.0,
        last_settled=102.0,
    )
    # settled = 4 + 1 + 2 + 3 + 5 = 15 over 2 s: (15 - 1) / 2 = 7/s
    assert str(stats) == (
        "processed=4 duplicates=1 retried=2 dead_lettered=3 poison=5 parked=0 requeued=6 "
        "reconnects=7 database_outages=8 handler_mean_ms=2.50 rate=7/s"
    )
    assert str(WorkerStats()).endswith("handler_mean_ms=0.00 rate=0/s")


def test_relay_reports_add_up_every_counter_seconds_included():
    total = RelayReport()
    for seconds in (0.25, 0.5):
        total.add(RelayReport(claimed=2, sent=2, batches=1, seconds=seconds, lanes=3))
    assert str(total) == "claimed=4 sent=4 failed=0 dead=0 interrupted=0 batches=2 seconds=0.750"
    assert total.lanes == 3


def test_relay_totals_keep_the_first_few_errors():
    # A daemon adds every run's report to its totals for as long as it runs.
    total = RelayReport()
    for run in range(1000):
        total.add(RelayReport(interrupted=3, errors=[f"run {run}: connection refused"] * 3))
    assert total.interrupted == 3000
    assert total.errors == ["run 0: connection refused"] * 3 + ["run 1: connection refused"] * 2
