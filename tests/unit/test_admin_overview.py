"""The overview's figures: hourly buckets aggregated in SQL, the chart layout, the groups."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from reliable_events.models import DeadLetter, OutboxMessage
from reliable_events.overview import build_chart, failure_groups, hourly_counts, overview
from tests.support.deadletter_factory import at_hour, dead_letter, many_dead_letters, outbox_row

pytestmark = pytest.mark.django_db


def test_hourly_counts_put_each_row_in_its_hour(django_assert_num_queries: Any) -> None:
    for _ in range(3):
        outbox_row(status="sent", sent_at=at_hour(0, minute=5))
    outbox_row(status="sent", sent_at=at_hour(5, minute=59))
    outbox_row(status="sent", sent_at=at_hour(30))  # older than 24 hours: not shown
    failed = outbox_row(status="pending", attempts=2)
    OutboxMessage.objects.filter(pk=failed.pk).update(created_at=at_hour(2))
    outbox_row(status="pending", attempts=0)  # not failed yet
    dead = outbox_row(status="dead", attempts=10)
    OutboxMessage.objects.filter(pk=dead.pk).update(created_at=at_hour(2, minute=1))
    letters = many_dead_letters(2)
    DeadLetter.objects.filter(pk__in=[x.pk for x in letters]).update(created_at=at_hour(23))

    with django_assert_num_queries(3):
        buckets = hourly_counts(hours=24)

    assert len(buckets) == 24
    assert buckets[-1].start == at_hour(0, minute=0)
    assert buckets[0].start == at_hour(23, minute=0)
    by_age = {23 - index: bucket for index, bucket in enumerate(buckets)}
    assert by_age[0].published == 3
    assert by_age[5].published == 1
    assert by_age[2].failed == 2
    assert by_age[0].failed == 0
    assert by_age[23].dead_lettered == 2
    assert sum(b.published for b in buckets) == 4
    assert sum(b.failed for b in buckets) == 2
    assert sum(b.dead_lettered for b in buckets) == 2


def test_overview_as_dict_is_json_ready() -> None:
    outbox_row(status="pending")
    dead_letter()
    data = overview().as_dict()
    assert data["pending"] == 1
    assert data["open_dead_letters_by_consumer"] == {"billing.charge": 1}
    assert data["last_24h"] == {"published": 0, "failed": 0, "dead_lettered": 1}
    assert len(data["hourly"]) == 24
    assert data["oldest_pending_age_seconds"] is not None


def test_chart_scales_bars_to_a_round_ceiling() -> None:
    outbox_row(status="sent", sent_at=timezone.now())
    for _ in range(6):
        outbox_row(status="sent", sent_at=timezone.now() - timedelta(hours=3))
    chart = build_chart(hourly_counts())
    assert len(chart.bars) == 24 * 3
    assert [value for _, value in chart.y_ticks] == [0, 5, 10]  # ceiling 10 for a max of 6
    tallest = max(chart.bars, key=lambda bar: bar.height)
    assert "6 published" in tallest.title
    plot_height = chart.plot_bottom - chart.y_ticks[-1][0]
    assert tallest.height == pytest.approx(plot_height * 0.6, abs=0.05)
    assert all(
        bar.y + bar.height == pytest.approx(chart.plot_bottom, abs=0.05) for bar in chart.bars
    )


def test_failure_groups_count_open_letters_only() -> None:
    many_dead_letters(3, consumer="a", fingerprint="f1", error_type="x.E1")
    many_dead_letters(1, consumer="a", fingerprint="f1", status=DeadLetter.Status.DISCARDED)
    many_dead_letters(2, consumer="b", fingerprint="f1", error_type="x.E1")
    groups = failure_groups()
    assert [(g.consumer, g.fingerprint, g.count, g.error_type) for g in groups] == [
        ("a", "f1", 3, "x.E1"),
        ("b", "f1", 2, "x.E1"),
    ]
    assert groups[0].sample_error == "card gateway timed out after 5s"
    assert failure_groups(limit=1)[0].consumer == "a"
