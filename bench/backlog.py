#!/usr/bin/env python
"""Drain of a deep pending backlog: 1,000,000 pending rows against 20,000 (issue 8).

The backlog after a broker outage is exactly when the relay's speed matters, and its
claim must not get slower the deeper the backlog is.  Each phase starts from an empty,
analysed table (statistics of an empty outbox, as after a quiet period) and inserts its
pending ~1 KiB events on 1,000 keys in one ``INSERT ... SELECT generate_series``
**without** analysing again: the table grew by a million rows faster than autovacuum
would notice, which is when PostgreSQL used to plan the claim as "read every due row,
sort them all" (3 s a claim).  A ``CHECKPOINT`` follows, so that the drain does not pay
for writing out the insert (1.2 GB for 1M rows).  Then ``manage.py relay_outbox`` drains
it as deployed, a subprocess on the benchmark database:

* **daemon**: ``relay_outbox`` (the loop every deployment runs), stopped with SIGTERM
  once nothing is pending;
* **once**: ``relay_outbox --once``.

The rate is the rows marked after the first mark over the time from the first ``sent_at``
to the last (database clock), so the process start-up is not counted.  Phases: 20k
(baseline), 1M, 20k again (the baseline brackets the large phase on this shared, noisy
machine); the ratio is the 1M rate over the median 20k rate, per mode.  Target: >= 0.8
for the daemon.  The messages go to a private queue, purged every few seconds so that
the shared broker never holds the backlog.

Usage: ``python bench/backlog.py [--quick] [--small N] [--large N] [--modes daemon once]``
(``--quick``: 20,000 vs 200,000).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common

TARGET_RATIO = 0.8
MODES = {"daemon": (), "once": ("--once",)}
#: Seconds between two purges of the benchmark queue while a drain runs.
PURGE_EVERY = 2.0


def relay_env(broker: common.BenchBroker) -> dict[str, str]:
    """Environment of a ``manage.py relay_outbox`` child on the benchmark database."""
    env = dict(os.environ)
    env["DJANGO_SETTINGS_MODULE"] = "bench.settings"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(common.ROOT), env.get("PYTHONPATH")]))
    env["RE_TEST_RELIABLE_EVENTS"] = json.dumps(broker.settings(PUBLISH_ON_COMMIT=False))
    return env


def fresh_backlog(rows: int) -> float:
    """Empty the table, analyse it empty, insert ``rows`` pending rows; return seconds."""
    from django.db import connection

    common.truncate_outbox()
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {common.outbox_table()}")
    started = time.perf_counter()
    common.seed_rows(rows, analyze=False)
    with connection.cursor() as cursor:
        cursor.execute("CHECKPOINT")  # the insert's writes are not the drain's
    return time.perf_counter() - started


def pending_left() -> bool:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT EXISTS (SELECT 1 FROM {common.outbox_table()} WHERE status = 'pending')"
        )
        return bool(cursor.fetchone()[0])


def drain(broker: common.BenchBroker, mode: str, rows: int, timeout: float) -> float:
    """Drain the seeded backlog with a ``relay_outbox`` child; return events/s."""
    from django.db import connection

    # Output to a file, not a pipe: the daemon prints a line per batch, and a pipe nobody
    # reads until the end fills up and blocks it.
    with tempfile.TemporaryFile(mode="w+") as log:
        process = subprocess.Popen(
            [sys.executable, str(common.ROOT / "manage.py"), "relay_outbox", *MODES[mode]],
            cwd=common.ROOT,
            env=relay_env(broker),
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            _wait_drained(broker, process, mode, timeout)
        finally:
            if process.poll() is None and mode == "daemon":
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.seek(0)
        output = log.read()
    if process.returncode != 0:
        raise SystemExit(f"{mode}: relay_outbox exited {process.returncode}: {output[-2000:]}")
    broker.purge()
    table = common.outbox_table()
    with connection.cursor() as cursor:
        # From the first mark to the last: the rows marked after the first one.  Two
        # statements: one joining the first mark in gave a plan that ran for minutes on
        # the freshly updated million rows (statistics of the pending table).
        cursor.execute(f"SELECT min(sent_at), max(sent_at) FROM {table} WHERE status = 'sent'")
        first, last = cursor.fetchone()
        cursor.execute(
            f"""SELECT count(*), count(*) FILTER (WHERE sent_at > %s)
            FROM {table} WHERE status = 'sent'""",
            [first],
        )
        sent, after_first = cursor.fetchone()
        seconds = (last - first).total_seconds() if first is not None else 0.0
    if sent != rows:
        raise SystemExit(f"{mode}: {sent} of {rows} rows sent")
    return float(after_first) / max(float(seconds), 1e-6)


def _wait_drained(
    broker: common.BenchBroker, process: subprocess.Popen[str], mode: str, timeout: float
) -> None:
    """Until nothing is pending (or the child exited), purging the queue now and then."""
    deadline = time.monotonic() + timeout
    last_purge = time.monotonic()
    while pending_left() and process.poll() is None:
        if time.monotonic() > deadline:
            raise SystemExit(f"{mode}: backlog not drained within {timeout:.0f} s")
        time.sleep(0.2)
        if time.monotonic() - last_purge > PURGE_EVERY:
            broker.purge()
            last_purge = time.monotonic()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="20,000 vs 200,000 pending rows")
    parser.add_argument("--small", type=int, default=None, help="baseline backlog (20000)")
    parser.add_argument("--large", type=int, default=None, help="deep backlog (1000000)")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    args = parser.parse_args(argv)
    small = args.small or 20_000  # smaller: a handful of batches, too noisy a baseline
    large = args.large or (200_000 if args.quick else 1_000_000)

    common.setup_django()
    rates: dict[str, dict[str, list[float]]] = {m: {"small": [], "large": []} for m in args.modes}
    with common.bench_broker(PUBLISH_ON_COMMIT=False) as broker:
        for phase, rows in (("small", small), ("large", large), ("small", small)):
            for mode in args.modes:
                seconds = fresh_backlog(rows)
                print(f"{rows:,} pending rows on {common.KEYS} keys (insert {seconds:.1f} s)")
                rate = drain(broker, mode, rows, timeout=max(120.0, rows / 500))
                rates[mode][phase].append(rate)
                print(f"  relay_outbox {mode}: {rate:,.0f} events/s", flush=True)
        common.truncate_outbox()

    table = []
    figures: dict[str, dict[str, float]] = {}
    met_all = True
    for mode in args.modes:
        base = common.median(rates[mode]["small"])
        deep = common.median(rates[mode]["large"])
        ratio = deep / base
        met = ratio >= TARGET_RATIO
        met_all = met_all and (met or mode != "daemon")
        figures[mode] = {"small": base, "large": deep, "ratio": ratio}
        print(
            f"relay_outbox {mode}: {large:,} pending {deep:,.0f} events/s vs {small:,} pending "
            f"{base:,.0f} events/s: ratio {ratio:.2f} (target >= {TARGET_RATIO}: "
            f"{common.verdict(met)})"
        )
        table.append(
            {
                "benchmark": f"relay_outbox {mode}, {large:,} pending rows (events/s)",
                "value": deep,
                "baseline": f"same with {small:,} pending rows",
                "baseline_value": base,
                "ratio": ratio,
                "target": f">= {TARGET_RATIO}",
                "met": met,
            }
        )
    common.emit(
        "backlog",
        {
            "small": small,
            "large": large,
            "rates": figures,
            "samples": rates,
            "target": TARGET_RATIO,
            "met": met_all,
            "table": table,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
