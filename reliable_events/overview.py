"""Figures for the admin overview page and the API's outbox stats.

Every query here is bounded: counts and ``MIN`` aggregates, the open dead letters
grouped by consumer, and three ``GROUP BY hour`` aggregates over the last
``hours`` hours (the database truncates and counts; Python only fills the gaps).

The hourly series:

* ``published``: outbox rows the broker confirmed in that hour (``sent_at``);
* ``failed``: outbox rows created in that hour whose publish failed and that are
  not sent yet (pending after at least one failed attempt, or dead);
* ``dead_lettered``: dead letters written in that hour (``created_at``), whatever
  became of them since.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from django.db.models import Count, Max, Min, Q, QuerySet
from django.db.models.functions import Substr, TruncHour
from django.utils import timezone

from reliable_events.db import read_alias
from reliable_events.liveness import Liveness, liveness
from reliable_events.models import DeadLetter, OutboxMessage
from reliable_events.status import OutboxStatus, outbox_status
from reliable_events.unrouted import UnroutedCount, cached_unrouted_count

#: The series of the hourly chart, in drawing order: (key, label, CSS class).
SERIES = (
    ("published", "published", "re-published"),
    ("failed", "publish failed", "re-failed"),
    ("dead_lettered", "dead-lettered", "re-dead"),
)


@dataclass
class HourBucket:
    """Event counts of one hour (``start`` is the hour's first instant, UTC)."""

    start: datetime
    published: int = 0
    failed: int = 0
    dead_lettered: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "start": self.start.isoformat(),
            "published": self.published,
            "failed": self.failed,
            "dead_lettered": self.dead_lettered,
        }


@dataclass
class Overview:
    """Everything the overview page shows."""

    status: OutboxStatus
    hours: list[HourBucket] = field(default_factory=list)
    generated_at: datetime = field(default_factory=timezone.now)
    #: Events the broker kept in ``<EXCHANGE>.unrouted`` (``None``: not asked).
    unrouted: UnroutedCount | None = None
    #: Relays and consumers seen, each consumer's queue (``None``: not asked).
    liveness: Liveness | None = None

    @property
    def totals(self) -> dict[str, int]:
        return {key: sum(getattr(b, key) for b in self.hours) for key, _, _ in SERIES}

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.status.as_dict(),
            "unrouted": self.unrouted.count if self.unrouted else None,
            "unrouted_error": self.unrouted.error if self.unrouted else "",
            "generated_at": self.generated_at.isoformat(),
            "last_24h": self.totals,
            "hourly": [bucket.as_dict() for bucket in self.hours],
            "liveness": self.liveness.as_dict() if self.liveness else None,
        }


def _per_hour(query: QuerySet[Any], field_name: str) -> dict[datetime, int]:
    rows = (
        query.order_by()
        .annotate(hour=TruncHour(field_name, tzinfo=UTC))
        .values("hour")
        .annotate(n=Count("id"))
        .values_list("hour", "n")
    )
    # Aware datetimes compare and hash by instant, so these match the buckets' keys.
    return {hour: n for hour, n in rows if hour is not None}


def hourly_counts(*, hours: int = 24, using: str | None = None) -> list[HourBucket]:
    """One bucket per hour for the last ``hours`` hours (oldest first, current hour last)."""
    alias = read_alias(OutboxMessage, using)
    now = timezone.now()
    if now.tzinfo is not None:
        now = now.astimezone(UTC)
    current = now.replace(minute=0, second=0, microsecond=0)
    first = current - timedelta(hours=hours - 1)
    outbox = OutboxMessage.objects.using(alias)
    published = _per_hour(outbox.sent().filter(sent_at__gte=first), "sent_at")
    failed = _per_hour(
        outbox.filter(created_at__gte=first).filter(
            Q(status=OutboxMessage.Status.DEAD)
            | Q(status=OutboxMessage.Status.PENDING, attempts__gt=0)
        ),
        "created_at",
    )
    dead = _per_hour(DeadLetter.objects.using(alias).filter(created_at__gte=first), "created_at")
    buckets = []
    for index in range(hours):
        start = first + timedelta(hours=index)
        buckets.append(
            HourBucket(
                start=start,
                published=published.get(start, 0),
                failed=failed.get(start, 0),
                dead_lettered=dead.get(start, 0),
            )
        )
    return buckets


def overview(*, hours: int = 24, using: str | None = None) -> Overview:
    """The outbox status and the hourly series, in a handful of bounded queries, and the
    unrouted queue's depth (one passive declare, cached for ``UNROUTED_CACHE_SECONDS``)."""
    return Overview(
        status=outbox_status(using=using),
        hours=hourly_counts(hours=hours, using=using),
        unrouted=cached_unrouted_count(),
        liveness=liveness(using=using),
    )


# -- drawing ---------------------------------------------------------------------------
CHART_WIDTH = 720
CHART_HEIGHT = 180
CHART_MARGIN_LEFT = 40
CHART_MARGIN_BOTTOM = 22
CHART_MARGIN_TOP = 8


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    css: str
    title: str


@dataclass(frozen=True)
class Chart:
    """A grouped bar chart as plain numbers, drawn by the template as inline SVG."""

    width: int
    height: int
    bars: list[Bar]
    y_ticks: list[tuple[float, int]]
    x_labels: list[tuple[float, str]]
    plot_left: int
    plot_right: int
    plot_bottom: float


def build_chart(buckets: list[HourBucket]) -> Chart:
    """Lay out one group of three bars per hour; no JavaScript needed to show it."""
    top = max([1] + [getattr(bucket, key) for bucket in buckets for key, _, _ in SERIES])
    ceiling = _nice_ceiling(top)
    plot_w = CHART_WIDTH - CHART_MARGIN_LEFT - 4
    plot_h = CHART_HEIGHT - CHART_MARGIN_BOTTOM - CHART_MARGIN_TOP
    bottom = float(CHART_MARGIN_TOP + plot_h)
    slot = plot_w / max(1, len(buckets))
    bar_w = max(1.0, (slot - 3) / len(SERIES))
    bars: list[Bar] = []
    labels: list[tuple[float, str]] = []
    for index, bucket in enumerate(buckets):
        left = CHART_MARGIN_LEFT + index * slot + 1.5
        for offset, (key, label, css) in enumerate(SERIES):
            value = int(getattr(bucket, key))
            height = plot_h * value / ceiling
            bars.append(
                Bar(
                    x=round(left + offset * bar_w, 2),
                    y=round(bottom - height, 2),
                    width=round(bar_w, 2),
                    height=round(height, 2),
                    css=css,
                    title=f"{bucket.start:%H}:00 UTC: {value} {label}",
                )
            )
        if index % max(3, len(buckets) // 8) == 0 or index == len(buckets) - 1:
            label = f"{bucket.start:%a %H}h" if len(buckets) > 24 else f"{bucket.start:%H}h"
            labels.append((round(left + slot / 2, 2), label))
    ticks = [
        (round(bottom - plot_h * fraction, 2), round(ceiling * fraction))
        for fraction in (0, 0.5, 1)
    ]
    return Chart(
        width=CHART_WIDTH,
        height=CHART_HEIGHT,
        bars=bars,
        y_ticks=ticks,
        x_labels=labels,
        plot_left=CHART_MARGIN_LEFT,
        plot_right=CHART_WIDTH - 4,
        plot_bottom=bottom,
    )


def _nice_ceiling(value: int) -> int:
    """The smallest of 1, 2, 5 x 10^n at or above ``value`` (an even axis)."""
    magnitude = 1
    while True:
        for step in (1, 2, 5):
            if step * magnitude >= value:
                return step * magnitude
        magnitude *= 10


# -- failure groups ----------------------------------------------------------------------
@dataclass(frozen=True)
class FailureGroup:
    """Open dead letters of one consumer sharing a fingerprint (type + first app frame)."""

    fingerprint: str
    consumer: str
    error_type: str
    count: int
    first_failed_at: datetime | None
    last_failed_at: datetime | None
    sample_error: str
    #: The group's highest dead-letter id: group actions act on ids up to it (what was seen).
    last_id: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "consumer": self.consumer,
            "error_type": self.error_type,
            "count": self.count,
            "first_failed_at": self.first_failed_at.isoformat() if self.first_failed_at else None,
            "last_failed_at": self.last_failed_at.isoformat() if self.last_failed_at else None,
            "sample_error": self.sample_error,
            "last_id": self.last_id,
        }


def failure_groups(
    query: QuerySet[DeadLetter] | None = None, *, limit: int = 200, using: str | None = None
) -> list[FailureGroup]:
    """Open dead letters grouped by consumer and fingerprint, largest group first.

    One ``GROUP BY`` query, at most ``limit`` groups; ``sample_error`` is one of the
    group's error messages (the greatest, so it is stable between page loads).
    """
    if query is None:
        alias = read_alias(DeadLetter, using)
        query = DeadLetter.objects.using(alias).all()
    rows = (
        query.filter(status=DeadLetter.Status.OPEN)
        .order_by()
        .values("fingerprint", "consumer")
        .annotate(
            count=Count("id"),
            error_type=Max("error_type"),
            first=Min("first_failed_at"),
            last=Max("last_failed_at"),
            sample=Max(Substr("error_message", 1, 300)),
            last_id=Max("id"),
        )
        .order_by("-count", "consumer", "fingerprint")[: max(1, limit)]
    )
    return [
        FailureGroup(
            fingerprint=row["fingerprint"],
            consumer=row["consumer"],
            error_type=row["error_type"] or "",
            count=row["count"],
            first_failed_at=row["first"],
            last_failed_at=row["last"],
            sample_error=row["sample"] or "",
            last_id=row["last_id"] or 0,
        )
        for row in rows
    ]
