#!/usr/bin/env python
"""Dead-letter payload search on PostgreSQL: the GIN index against a sequential scan.

The admin's and the API's payload search (``reliable_events.payload_search``) is one
containment test, ``payload @> '{"order_id": …}'``, answered by the GIN index
``re_deadletter_payload_gin`` (``jsonb_path_ops``).  This seeds ``--rows`` dead letters
(one ``INSERT … SELECT generate_series``, ~200-byte payloads, then ``ANALYZE``) and
times the search's page query (``LIMIT 50``) for a value that matches one row:

* **index**: the planner as shipped (it picks the GIN index);
* **baseline**: the same query in the same run with index and bitmap scans disabled
  (``SET LOCAL enable_indexscan/enable_bitmapscan = off``): what it costs without the
  index, e.g. on a database where the migration did not run.

Target: the indexed search at least 10x faster than the scan at 200,000 rows.  The
seeded rows are deleted at the end.

Usage: ``python bench/payload_search.py [--quick] [--rows N] [--rounds N]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common

TARGET_RATIO = 10.0
CONSUMER = "bench.payload-search"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    rows = 20_000 if args.quick else args.rows
    rounds = 5 if args.quick else args.rounds
    common.setup_django()

    from django.db import connection, transaction

    from reliable_events import payload_search
    from reliable_events.models import DeadLetter

    table = DeadLetter._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(f'DELETE FROM "{table}" WHERE consumer = %s', [CONSUMER])
        print(f"seeding {rows:,} dead letters…", flush=True)
        cursor.execute(
            f"""INSERT INTO "{table}" (consumer, queue, message_id, topic, key, payload,
                   raw_body, headers, reason, error_type, error_message, traceback,
                   fingerprint, attempts, history, first_failed_at, last_failed_at, status,
                   resolved_by, note, created_at)
                SELECT %s, %s, 'bench-' || n, 'orders.created', '', jsonb_build_object(
                       'order_id', n, 'customer', jsonb_build_object('id', 'c-' || (n %% 1000)),
                       'lines', jsonb_build_array(jsonb_build_object('sku', 'A-1', 'qty', 2)),
                       'note', repeat('x', 100)),
                       '', '{{}}'::jsonb, 'retries-exhausted', 'x.Error', 'boom', '', 'fp',
                       3, '[]'::jsonb, now(), now(), 'open', '', '', now()
                FROM generate_series(1, %s) AS n""",
            [CONSUMER, CONSUMER, rows],
        )
        cursor.execute(f'ANALYZE "{table}"')

    def timed(disable_index: bool, value: int) -> float:
        query = payload_search.search(
            DeadLetter.objects.filter(consumer=CONSUMER), {"order_id": value}
        ).order_by("-id")[:50]
        with transaction.atomic(), connection.cursor() as cursor:
            if disable_index:
                cursor.execute("SET LOCAL enable_indexscan = off")
                cursor.execute("SET LOCAL enable_bitmapscan = off")
            started = time.perf_counter()
            found = list(query.values_list("id", flat=True))
            elapsed = time.perf_counter() - started
        assert len(found) == 1, found
        return elapsed

    plan = payload_search.search(DeadLetter.objects.all(), {"order_id": 7}).explain()
    uses_index = "re_deadletter_payload_gin" in plan
    samples: dict[str, list[float]] = {"index": [], "scan": []}
    try:
        for round_no in range(rounds):
            value = 1 + (round_no * 7919) % rows
            # Alternate the order so that caching favours neither side.
            for phase in ("index", "scan") if round_no % 2 else ("scan", "index"):
                samples[phase].append(timed(phase == "scan", value))
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f'DELETE FROM "{table}" WHERE consumer = %s', [CONSUMER])
    index_ms = common.median(samples["index"]) * 1000
    scan_ms = common.median(samples["scan"]) * 1000
    ratio = scan_ms / index_ms if index_ms else float("inf")
    met = uses_index and ratio >= TARGET_RATIO
    print(f"rows={rows:,} rounds={rounds} (medians; the plan uses the GIN index: {uses_index})")
    print(f"  payload search with the GIN index : {index_ms:8.2f} ms")
    print(f"  same query as a sequential scan   : {scan_ms:8.2f} ms (baseline)")
    print(f"  scan / index ratio {ratio:.1f} (target >= {TARGET_RATIO}: {common.verdict(met)})")
    common.emit(
        "payload_search",
        {
            "rows": rows,
            "rounds": rounds,
            "uses_index": uses_index,
            "index_ms": index_ms,
            "scan_ms": scan_ms,
            "ratio": ratio,
            "target": TARGET_RATIO,
            "met": met,
            "table": [
                {
                    "benchmark": f"payload search, {rows:,} dead letters (ms, lower is better)",
                    "value": index_ms,
                    "baseline": "same query as a sequential scan",
                    "baseline_value": scan_ms,
                    "ratio": ratio,
                    "target": f"scan/index >= {TARGET_RATIO}",
                    "met": met,
                }
            ],
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
