"""Retention: bounded-batch purges of sent outbox rows and old processed records."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from django.db.models import QuerySet
from django.utils import timezone

from reliable_events.conf import app_settings
from reliable_events.db import write_alias
from reliable_events.heartbeats import purge_heartbeats
from reliable_events.models import OutboxMessage, ProcessedMessage
from reliable_events.reports import Report


@dataclass
class PurgeReport(Report):
    TEXT_FIELDS = (
        "outbox_deleted",
        "processed_deleted",
        "batches",
        "seconds",
        "heartbeats_deleted",
    )

    outbox_deleted: int = 0
    processed_deleted: int = 0
    heartbeats_deleted: int = 0
    batches: int = 0
    seconds: float = 0.0


def _delete_in_batches(
    query: QuerySet[OutboxMessage] | QuerySet[ProcessedMessage],
    batch_size: int,
    progress: Callable[[int], None] | None,
) -> tuple[int, int]:
    deleted = batches = 0
    while True:
        ids = list(query.order_by("pk").values_list("pk", flat=True)[:batch_size])
        if not ids:
            return deleted, batches
        count, _ = query.model._default_manager.using(query.db).filter(pk__in=ids).delete()
        deleted += count
        batches += 1
        if progress is not None:
            progress(deleted)


def purge(
    *,
    older_than: timedelta | None = None,
    processed_older_than: timedelta | None = None,
    batch_size: int | None = None,
    using: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> PurgeReport:
    """Delete sent outbox rows and processed records past their retention.

    Pending and dead rows are never deleted.  Works in batches of ``batch_size`` rows,
    one short statement each, so it never holds long locks.
    """
    started = time.monotonic()
    alias = write_alias(OutboxMessage, using)
    size = max(1, int(batch_size or app_settings.PURGE_BATCH_SIZE))
    now = timezone.now()
    # ``is None``, not ``or``: an explicit zero age means "every sent row".
    outbox_age = (
        older_than
        if older_than is not None
        else timedelta(days=float(app_settings.OUTBOX_RETENTION_DAYS))
    )
    processed_age = (
        processed_older_than
        if processed_older_than is not None
        else timedelta(days=float(app_settings.PROCESSED_RETENTION_DAYS))
    )
    report = PurgeReport()
    report.outbox_deleted, outbox_batches = _delete_in_batches(
        OutboxMessage.objects.using(alias).sent_before(now - outbox_age), size, progress
    )
    report.processed_deleted, processed_batches = _delete_in_batches(
        ProcessedMessage.objects.using(alias).processed_before(now - processed_age),
        size,
        progress,
    )
    report.heartbeats_deleted = purge_heartbeats(using=alias)
    report.batches = outbox_batches + processed_batches
    report.seconds = time.monotonic() - started
    return report
