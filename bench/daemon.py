#!/usr/bin/env python
"""The relay as deployed: the ``relay_outbox`` daemon against ``--once``, and two daemons
sharing one backlog against one.

Per round, on the same broker and the same backlog of ``--rows`` pending ~1 KiB events
(1,000 keys, seeded by one SQL statement, so the rows are committed and due at once):

* **--once** (the baseline of the first ratio): ``manage.py relay_outbox --once``;
* **daemon**: ``manage.py relay_outbox`` (the loop every deployment runs), started and
  idle before the rows are seeded, stopped with SIGTERM once they are sent;
* **2 daemons**: two ``relay_outbox`` processes, started and announced (each takes its
  share, 32 lanes, while it has work) before the rows are seeded.  Rows sent by each come from their
  ``stopped; sent=N`` line.

Every figure is the rows over the span of their ``sent_at`` (the database clock of the
mark-sent updates), so process start-up and idle polling are left out the same way for
all three.  The order of the three runs alternates between rounds; ratios are medians of
per-round ratios.  Shipped settings (``TIME_SCALE`` 1.0, 64 lanes, batch 1000).

Targets (issue #8): daemon >= 0.95 x --once; with 2 daemons each sends 30-70 % of the
rows and the throughput is not below one daemon's (>= 1.0 x; a second relay only adds
throughput where the broker has room, e.g. several queues or nodes - one queue on one
node here).

Usage: ``python bench/daemon.py [--quick] [--rows N] [--rounds N]``
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common

DAEMON_TARGET = 0.95
SHARE_RANGE = (0.3, 0.7)
SCALE_TARGET = 1.0


def _env(broker: common.BenchBroker) -> dict[str, str]:
    from django.conf import settings

    env = dict(os.environ)
    env["DJANGO_SETTINGS_MODULE"] = "bench.settings"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(common.ROOT), env.get("PYTHONPATH")]))
    config = {**settings.RELIABLE_EVENTS, "TIME_SCALE": 1.0}  # the shipped clock
    env["RE_TEST_RELIABLE_EVENTS"] = json.dumps(config)
    return env


def _manage(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(common.ROOT / "manage.py"), "relay_outbox", *args],
        cwd=common.ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def _sent_span_rate(rows: int) -> float:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT count(*), extract(epoch FROM max(sent_at) - min(sent_at)) "
            f"FROM {common.outbox_table()} WHERE status = 'sent'"
        )
        count, span = cursor.fetchone()
    if count != rows:
        raise SystemExit(f"{count} of {rows} rows sent")
    return rows / max(float(span), 1e-6)


def _seed(rows: int) -> None:
    """Seed the backlog; the rows and their statistics (ANALYZE) commit together, so a
    daemon already polling never plans its first claims on the empty table's."""
    from django.db import transaction

    with transaction.atomic():
        common.seed_rows(rows)


def _all_sent() -> bool:
    return common.count_status("pending") == 0


def _relays() -> int:
    """Relays announced in the database (idle ones hold no lanes: they count all the same)."""
    from tests.support.producer_support import lanes_by_relay

    return len(lanes_by_relay())


def _stop(process: subprocess.Popen[str]) -> int:
    """SIGTERM; the rows it reported sent."""
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    if process.returncode != 0:
        raise SystemExit(f"relay_outbox exited {process.returncode}: {err[-2000:]}")
    line = next(line for line in out.splitlines() if "relay_outbox: stopped" in line)
    return int(line.split("sent=")[1].split()[0])


def run_once(env: dict[str, str], broker: common.BenchBroker, rows: int) -> float:
    common.truncate_outbox()
    _seed(rows)
    process = _manage(env, "--once")
    _out, err = process.communicate(timeout=600)
    if process.returncode != 0:
        raise SystemExit(f"relay_outbox --once exited {process.returncode}: {err[-2000:]}")
    rate = _sent_span_rate(rows)
    broker.purge()
    return rate


def run_daemons(
    env: dict[str, str], broker: common.BenchBroker, rows: int, count: int
) -> tuple[float, list[int]]:
    common.truncate_outbox()
    processes = [_manage(env) for _ in range(count)]
    try:
        _wait(lambda: _relays() == count, 60, "the relays to announce themselves")
        _seed(rows)
        _wait(_all_sent, 600, "the backlog to drain")
    finally:
        sent = []
        for process in processes:
            sent.append(_stop(process) if process.poll() is None else -1)
    rate = _sent_span_rate(rows)
    broker.purge()
    return rate, sent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small run (10,000 rows, 1 round)")
    parser.add_argument("--rows", type=int, default=None, help="pending rows (default 50000)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3)")
    args = parser.parse_args(argv)
    rows = args.rows or (10_000 if args.quick else 50_000)
    rounds = args.rounds or (1 if args.quick else 3)

    common.setup_django()
    once: list[float] = []
    daemon: list[float] = []
    pair: list[float] = []
    shares: list[list[int]] = []
    with common.bench_broker(PUBLISH_ON_COMMIT=False) as broker:
        env = _env(broker)
        for number in range(1, rounds + 1):
            order = ["once", "daemon", "pair"]
            if number % 2 == 0:
                order.reverse()
            for what in order:
                if what == "once":
                    once.append(run_once(env, broker, rows))
                elif what == "daemon":
                    daemon.append(run_daemons(env, broker, rows, 1)[0])
                else:
                    rate, sent = run_daemons(env, broker, rows, 2)
                    pair.append(rate)
                    shares.append(sent)
            print(
                f"  round {number}: --once {once[-1]:,.0f}/s, daemon {daemon[-1]:,.0f}/s, "
                f"2 daemons {pair[-1]:,.0f}/s (sent {shares[-1][0]:,}/{shares[-1][1]:,})",
                flush=True,
            )
        common.truncate_outbox()
    daemon_ratio = common.median([d / o for d, o in zip(daemon, once, strict=True)])
    pair_ratio = common.median([p / d for p, d in zip(pair, daemon, strict=True)])
    worst_share = min(min(s) / rows for s in shares)
    share_met = all(SHARE_RANGE[0] <= n / rows <= SHARE_RANGE[1] for s in shares for n in s)
    daemon_met = daemon_ratio >= DAEMON_TARGET
    pair_met = pair_ratio >= SCALE_TARGET
    print(f"rows={rows} rounds={rounds} (medians)")
    print(f"  relay_outbox --once   : {common.median(once):10,.0f} events/s (baseline)")
    print(
        f"  relay_outbox daemon   : {common.median(daemon):10,.0f} events/s  ratio "
        f"{daemon_ratio:.2f} (target >= {DAEMON_TARGET}: {common.verdict(daemon_met)})"
    )
    print(
        f"  2 relay_outbox daemons: {common.median(pair):10,.0f} events/s  ratio "
        f"{pair_ratio:.2f} vs one (target >= {SCALE_TARGET}: {common.verdict(pair_met)}); "
        f"smallest share {worst_share:.0%} (target 30-70 %: {common.verdict(share_met)})"
    )
    table = [
        {
            "benchmark": "relay_outbox daemon (events/s)",
            "value": common.median(daemon),
            "baseline": "relay_outbox --once, same backlog",
            "baseline_value": common.median(once),
            "ratio": daemon_ratio,
            "target": f">= {DAEMON_TARGET}",
            "met": daemon_met,
        },
        {
            "benchmark": "2 relay_outbox daemons, one queue (events/s)",
            "value": common.median(pair),
            "baseline": "one daemon, same backlog",
            "baseline_value": common.median(daemon),
            "ratio": pair_ratio,
            "target": f">= {SCALE_TARGET}",
            "met": pair_met,
        },
        {
            "benchmark": "2 daemons: smallest share of the rows",
            "value": worst_share,
            "baseline": "",
            "baseline_value": None,
            "ratio": None,
            "target": "30-70 %",
            "met": share_met,
        },
    ]
    common.emit(
        "daemon",
        {
            "rows": rows,
            "rounds": rounds,
            "once": once,
            "daemon": daemon,
            "pair": pair,
            "shares": shares,
            "daemon_ratio": daemon_ratio,
            "pair_ratio": pair_ratio,
            "table": table,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
