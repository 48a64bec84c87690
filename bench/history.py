#!/usr/bin/env python
"""Relay throughput with 1,000,000 rows of sent history against 10,000.

The outbox keeps sent rows until ``purge_outbox`` deletes them (``OUTBOX_RETENTION_DAYS``),
so a busy installation carries a large history.  The relay must not slow down with it:
its claim reads pending rows only, through partial indexes on them.

Phases on the benchmark database, each starting from an empty table:

1. **10k** (the baseline): 10,000 sent rows, then per round ``--rows`` pending ~1 KiB
   events are seeded and drained by ``Relay.drain()``;
2. **1M**: 1,000,000 sent rows (one ``INSERT ... SELECT generate_series``; history
   payloads are small to keep the run short - the claim does not read them), then the
   same rounds;
3. **10k** again, so that the baseline brackets the 1M phase on this shared, noisy
   machine.

A 100k phase runs too (``--medium``): at that size PostgreSQL once chose to walk the
primary key through the history for the claim; the partial index
``re_outbox_pending_id`` fixed it, and this phase keeps watching.

After each bulk insert the table is vacuumed and analysed, as autovacuum would do (it is
off on the development server).  Rows drained in a round join the history.  Target:
1M-history rate >= 0.8 x 10k-history rate (medians over the rounds of the phases).

Usage: ``python bench/history.py [--quick] [--rows N] [--rounds N] [--history N]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common
from bench.relay import empty_topology

TARGET_RATIO = 0.8
SMALL_HISTORY = 10_000


def add_history(count: int) -> float:
    """Insert ``count`` sent rows (a day old, small payloads); vacuum; return seconds."""
    from django.db import connection

    started = time.perf_counter()
    table = common.outbox_table()
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            INSERT INTO {table} (message_id, topic, key, lane, queue, payload, headers,
                status, attempts, next_attempt_at, created_at, sent_at, last_error)
            SELECT gen_random_uuid()::text, 'bench.created', 'h' || (g %% 5000),
                (g %% 64), '', jsonb_build_object('n', g), '{{}}'::jsonb, 'sent', 1,
                now() - interval '1 day', now() - interval '1 day',
                now() - interval '1 day', ''
            FROM generate_series(1, %s) AS g
            """,
            [count],
        )
        cursor.execute(f"VACUUM (ANALYZE) {table}")
    return time.perf_counter() - started


def history_count() -> int:
    return common.count_status("sent")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small run (100k history, 1 round)")
    parser.add_argument("--rows", type=int, default=None, help="pending rows (default 20000)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per phase (default 3)")
    parser.add_argument("--history", type=int, default=None, help="large history (1000000)")
    parser.add_argument(
        "--medium", type=int, default=None, help="medium history phase (default 100000; 0: none)"
    )
    args = parser.parse_args(argv)
    rows = args.rows or (5000 if args.quick else 20000)
    rounds = args.rounds or (1 if args.quick else 3)
    large = args.history or (100_000 if args.quick else 1_000_000)
    medium = 0 if args.quick else (100_000 if args.medium is None else args.medium)

    common.setup_django()
    from reliable_events.conf import app_settings

    phases: list[tuple[str, int, int]] = [("small", SMALL_HISTORY, rounds)]
    if medium:
        phases.append(("medium", medium, rounds))
    phases += [("large", large, rounds), ("small", SMALL_HISTORY, max(1, rounds - 1))]
    rates: dict[str, list[float]] = {name: [] for name, _, _ in phases}
    histories: dict[str, int] = {}
    with common.bench_broker(PUBLISH_ON_COMMIT=False) as broker:
        batch = int(app_settings.RELAY_BATCH_SIZE)
        window = int(app_settings.CONFIRM_WINDOW)
        for phase, history, phase_rounds in phases:
            common.truncate_outbox()
            seconds = add_history(history)
            histories.setdefault(phase, history_count())
            print(f"history {history_count():,} rows (bulk insert + vacuum {seconds:.1f} s)")
            for number in range(1, phase_rounds + 1):
                rate = _drain(broker, rows, batch, window)
                rates[phase].append(rate)
                print(f"  round {number}: relay {rate:,.0f} events/s", flush=True)
        common.truncate_outbox()
    small = common.median(rates["small"])
    medians = {phase: common.median(values) for phase, values in rates.items()}
    ratio = medians["large"] / small
    met = ratio >= TARGET_RATIO
    print(f"rows={rows} rounds={rounds} batch={batch} window={window} (medians)")
    print(f"  relay, {histories['small']:>9,} history rows : {small:10,.0f} events/s (baseline)")
    for phase in ("medium", "large"):
        if phase in medians:
            print(
                f"  relay, {histories[phase]:>9,} history rows : {medians[phase]:10,.0f} "
                f"events/s  ratio {medians[phase] / small:.2f}"
            )
    print(f"  1M / 10k ratio {ratio:.2f} (target >= {TARGET_RATIO}: {common.verdict(met)})")
    table = [
        {
            "benchmark": f"relay with {histories[phase]:,} history rows (events/s)",
            "value": medians[phase],
            "baseline": f"same with {SMALL_HISTORY:,} history rows",
            "baseline_value": small,
            "ratio": medians[phase] / small,
            "target": f">= {TARGET_RATIO}" if phase == "large" else "",
            "met": met if phase == "large" else None,
        }
        for phase in ("medium", "large")
        if phase in medians
    ]
    common.emit(
        "history",
        {
            "rows": rows,
            "rounds": rounds,
            "histories": histories,
            "rates": medians,
            "ratio": ratio,
            "target": TARGET_RATIO,
            "met": met,
            "samples": rates,
            "table": table,
        },
    )
    return 0


def _drain(broker: common.BenchBroker, rows: int, batch: int, window: int) -> float:
    """Seed ``rows`` pending events and drain them (keeping the history)."""
    from reliable_events.broker import open_publisher
    from reliable_events.relay import Relay

    before = history_count()
    common.seed_rows(rows)
    relay = Relay(batch_size=batch, publisher=open_publisher(window=window))
    try:
        relay.publisher.declare(empty_topology())  # connect outside the timing
        started = time.perf_counter()
        report = relay.drain()
        elapsed = time.perf_counter() - started
    finally:
        relay.close()
    if report.sent != rows or history_count() != before + rows:
        raise SystemExit(f"relay run incomplete: {report}")
    broker.purge()
    return rows / elapsed


if __name__ == "__main__":
    sys.exit(main())
