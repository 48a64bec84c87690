"""The relay's claim keeps its plan when the table's statistics lag behind (issue 8).

A backlog inserted faster than the table is analysed (the statistics still say "empty")
used to get a claim that read every due row, anti-joined and sorted them all: 3 s per
claim at 200,000 pending rows.  The claim pins its plan: it walks the pending rows in id
order and stops at the batch size, whatever the statistics say."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import connection

from reliable_events.conf import app_settings
from reliable_events.models import OutboxMessage
from reliable_events.relay import LaneShare, claim_due

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.postgres]


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from _nodes(child)


@pytest.mark.parametrize("fenced", [False, True])
def test_the_claim_walks_the_pending_index_without_statistics(fenced: bool) -> None:
    """``fenced``: a relay's claim, limited to the lanes it holds leases on (its tokens)."""
    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL plan")
    table = OutboxMessage._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {table}")  # statistics of an empty table
        cursor.execute(
            f"""INSERT INTO {table} (message_id, topic, key, lane, queue, payload, headers,
                status, attempts, next_attempt_at, created_at, last_error)
            SELECT 'm' || g, 'plan.test', 'k' || (g % 100), 0, '', '{{}}'::jsonb,
                '{{}}'::jsonb, 'pending', 0, now(), now(), ''
            FROM generate_series(1, 20000) AS g"""
        )
    plans: list[dict[str, Any]] = []

    def explain(
        execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any
    ) -> Any:
        if "FOR UPDATE OF o SKIP LOCKED" in sql:
            cursor = context["cursor"].cursor  # the driver's: no wrappers again
            cursor.execute("EXPLAIN (FORMAT JSON) " + sql, params)
            value = cursor.fetchone()[0]
            plans.append((json.loads(value) if isinstance(value, str) else value)[0]["Plan"])
        return execute(sql, params, many, context)

    share = LaneShare(connection.alias)
    lanes = share.refresh() if fenced else list(range(int(app_settings.LANES)))
    try:
        with connection.execute_wrapper(explain):
            rows = claim_due(connection.alias, lanes, 100, fence=share.fence() if fenced else None)
    finally:
        share.release()
    assert [row[0] for row in rows] == sorted(row[0] for row in rows)
    assert len(rows) == 100
    assert len(plans) == 1
    kinds = [node["Node Type"] for node in _nodes(plans[0])]
    assert "Sort" not in kinds, kinds
    walks = [node.get("Index Name") for node in _nodes(plans[0]) if "Index Name" in node]
    assert "re_outbox_pending_id" in walks, walks
