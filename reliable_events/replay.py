"""Which events does a consumer get again?  Sent events replayed to one consumer.

A consumer whose queue lost messages (the queue deleted under it with messages in it, or
with retries on their way back to it; a broker node lost without replicas), or a new
consumer that should see the recent past, is given the sent events of a time window
again: each becomes a re-delivery row addressed to its queue alone, as a dead letter's
retry is, and the relay (or the on-commit hook) publishes it with a confirm.  The
consumer applies those it never applied and skips the others as duplicates, by their
message ids, so the window must lie within ``PROCESSED_RETENTION_DAYS`` (its idempotency
records) and ``OUTBOX_RETENTION_DAYS`` (the sent rows).  ``manage.py replay_events`` is
its command.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from django.utils import timezone

from reliable_events.conf import app_settings
from reliable_events.consumer import registry
from reliable_events.db import own_transaction, write_alias
from reliable_events.deadletters import prepare_queues
from reliable_events.exceptions import ReliableEventsError
from reliable_events.models import OutboxMessage
from reliable_events.outbox import hold, insert_many, new_row
from reliable_events.routing import binding_matches

#: Rows read and written per transaction.
CHUNK = 500


class ReplayRefused(ReliableEventsError):
    """Nothing was replayed; the message says why."""


@dataclass
class ReplayReport:
    consumer: str
    queue: str
    dry_run: bool = False
    #: Re-delivery rows written (or that would be, on a dry run).
    queued: int = 0
    topics: Counter[str] = field(default_factory=Counter)
    #: The queue could not be declared (the relay publishes once it exists).
    warnings: list[str] = field(default_factory=list)


def replay(
    name: str,
    *,
    since: timedelta,
    until: timedelta = timedelta(0),
    topic: str | None = None,
    dry_run: bool = False,
    force: bool = False,
    limit: int | None = None,
    using: str | None = None,
    progress: Callable[[ReplayReport], None] | None = None,
) -> ReplayReport:
    """Re-deliver to consumer ``name`` the sent events created between ``since`` and
    ``until`` ago whose topic it subscribes to (and matching ``topic``, a binding pattern),
    oldest first, at most ``limit``.

    Refused (:class:`ReplayRefused`) for an ordered consumer (a re-delivery to one queue
    would bypass its partitions), for an empty window, and for a window reaching past
    ``PROCESSED_RETENTION_DAYS`` unless ``force`` (an event whose idempotency record was
    purged would be applied a second time).
    """
    cls = registry.get(name)
    if cls.ordered:
        raise ReplayRefused(
            f"{name!r} is an ordered consumer: a re-delivery to one queue would bypass its "
            "partitions and its per-key order"
        )
    if since <= until:
        raise ReplayRefused(f"the window is empty: --since ({since}) must reach past --until")
    kept = timedelta(days=float(app_settings.PROCESSED_RETENTION_DAYS))
    if since > kept and not force:
        raise ReplayRefused(
            f"the window starts {since} ago, before the oldest idempotency records are kept "
            f"(PROCESSED_RETENTION_DAYS = {kept.days}): an event whose record was purged "
            "would be applied twice; shorten it, or force it"
        )
    report = ReplayReport(name, cls.queue_name(), dry_run=dry_run)
    _, report.warnings = prepare_queues({0: name}, declare=not dry_run)
    alias = write_alias(OutboxMessage, using)
    now = timezone.now()
    rows = OutboxMessage.objects.using(alias).filter(
        status=OutboxMessage.Status.SENT, queue="", created_at__gte=now - since
    )
    if until:
        rows = rows.filter(created_at__lt=now - until)
    patterns = [topic] if topic else []
    last = 0
    while limit is None or report.queued < limit:
        chunk = list(
            rows.filter(id__gt=last)
            .order_by("id")
            .only("id", "message_id", "topic", "key", "payload", "headers")[:CHUNK]
        )
        if not chunk:
            break
        last = chunk[-1].pk
        wanted = [
            row
            for row in chunk
            if any(binding_matches(bound, row.topic) for bound in cls.topics)
            and all(binding_matches(pattern, row.topic) for pattern in patterns)
        ][: None if limit is None else limit - report.queued]
        if wanted and not dry_run:
            _redeliver(alias, report.queue, wanted)
        report.queued += len(wanted)
        report.topics.update(row.topic for row in wanted)
        if progress is not None and wanted:
            progress(report)
    return report


def _redeliver(alias: str, queue: str, rows: list[OutboxMessage]) -> None:
    with own_transaction(alias):
        when = hold(alias)
        insert_many(
            [
                new_row(
                    message_id=row.message_id,
                    topic=row.topic,
                    key=row.key,
                    queue=queue,
                    payload=row.payload,
                    headers=row.headers,
                    due=when.due,
                )
                for row in rows
            ],
            alias,
            on_commit=when.on_commit,
        )
