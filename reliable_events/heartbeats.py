"""What does each process record of itself, and when is it forgotten?

A relay daemon (``relay_outbox``) and every consume loop (``consume_events``, the Celery
``ConsumerStep``) own a :class:`HeartbeatWriter`: one ``Heartbeat`` row per process,
updated at most every ``HEARTBEAT_SECONDS`` (one ``UPDATE``), marked ``stopped`` on a
clean exit, with the consumers it runs and what they have on the broker.  This module is
the table's only writer: the rows of a consumer removed from the code are forgotten
(``forget_consumer``) or purged after ``HEARTBEAT_RETENTION_DAYS`` (``purge_outbox``).
:mod:`reliable_events.liveness` reads them.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from django.db import DatabaseError
from django.utils import timezone

from reliable_events.conf import app_settings
from reliable_events.consumer.base import EventConsumer, registry
from reliable_events.db import write_alias
from reliable_events.models import Heartbeat
from reliable_events.queue_depths import QueueDepth, gone, queue_depths
from reliable_events.reports import Report
from reliable_events.sanitize import describe_error, redact

logger = logging.getLogger(__name__)

#: Most heartbeat rows read to find what consumers removed from the code left behind.
MAX_PURGE_SCAN = 10_000


def heartbeat_alias(using: str | None) -> str:
    return write_alias(Heartbeat, using)


def counters_of(report: Report | Mapping[str, Any] | None) -> dict[str, Any]:
    """A report's printed fields (or a mapping) as plain JSON numbers."""
    if report is None:
        return {}
    if isinstance(report, Report):
        return {name: getattr(report, name) for name in report.TEXT_FIELDS}
    return dict(report)


class HeartbeatWriter:
    """The heartbeat of this process; :meth:`tick` often, :meth:`stop` at exit.

    Never raises: a database that does not answer costs a debug log line, and the
    next tick tries again.
    """

    def __init__(
        self,
        kind: str,
        consumers: Iterable[str] = (),
        *,
        using: str | None = None,
        topology: Mapping[str, Mapping[str, list[str]]] | None = None,
    ) -> None:
        self.kind = kind
        self.consumers = sorted(consumers)
        #: What each consumer has on the broker (:func:`topology_of`): kept with the
        #: heartbeat, it says what a consumer later removed from the code left there.
        self.topology = {name: dict(value) for name, value in (topology or {}).items()}
        self.alias = heartbeat_alias(using)
        self.host = socket.gethostname()[:255]
        self.pid = os.getpid()
        self.interval = app_settings.seconds("HEARTBEAT_SECONDS")
        self.started_at = timezone.now()
        self.row_id: int | None = None
        self._next = 0.0
        #: What this process says beside its counters (``broker_error``, ``recreated``),
        #: written with them.
        self.notes: dict[str, Any] = {}
        self._counters: dict[str, Any] = {}

    def tick(self, report: Report | Mapping[str, Any] | None = None) -> bool:
        """Write the heartbeat if ``HEARTBEAT_SECONDS`` passed; whether it wrote."""
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self.interval
        self._counters = counters_of(report)
        return self._write(self._counters, stopped=False)

    def broker_state(self, error: str) -> None:
        """Record whether the broker answers (``error``: why not, redacted; ``""``: it
        does): a process that retries a broker it cannot reach is alive, not working."""
        if error or "broker_error" in self.notes:  # else nothing changes (every step)
            self.note("broker_error", redact(error)[:300])

    def note(self, name: str, value: Any) -> None:
        """Keep ``value`` (JSON; empty: nothing to say) with the counters, written at
        once when it changed."""
        if value == self.notes.get(name, type(value)()):
            return
        if value:
            self.notes[name] = value
        else:
            self.notes.pop(name, None)
        self._next = time.monotonic() + self.interval
        self._write(self._counters, stopped=False)

    def stop(self, report: Report | Mapping[str, Any] | None = None) -> None:
        """Record a clean stop (the process is no longer counted as alive)."""
        if self.row_id is not None:
            self._write(counters_of(report), stopped=True)

    def _write(self, counters: dict[str, Any], *, stopped: bool) -> bool:
        if self.notes:
            counters = {**counters, **self.notes}
        values = {
            "last_seen": timezone.now(),
            "counters": counters,
            "stopped": stopped,
            "consumers": self.consumers,
            "topology": self.topology,
        }
        rows = Heartbeat.objects.using(self.alias)
        try:
            if self.row_id is not None and rows.filter(pk=self.row_id).update(**values):
                return True
            self.row_id = rows.create(
                kind=self.kind, host=self.host, pid=self.pid, started_at=self.started_at, **values
            ).pk
        except DatabaseError as exc:
            logger.debug("reliable_events: heartbeat not written: %s", describe_error(exc))
            return False
        return True


def left_behind(name: str, *, using: str | None = None) -> dict[str, list[str]] | None:
    """What consumer ``name`` has on the broker as its newest heartbeat recorded it
    (:func:`topology_of`), ``{}`` when its heartbeats predate that record, ``None`` when no
    heartbeat names it."""
    rows = Heartbeat.objects.using(heartbeat_alias(using)).filter(kind=Heartbeat.Kind.CONSUMER)
    naming = [
        row
        for row in rows.order_by("-last_seen").only("consumers", "topology")[:MAX_PURGE_SCAN]
        if name in (row.consumers or [])
    ]
    if not naming:
        return None
    return recorded_topology(naming, [name]).get(name, {})


def forget_heartbeats(name: str, *, using: str | None = None) -> int:
    """Take consumer ``name`` out of every heartbeat (a row that ran it alone is
    deleted); how many rows named it."""
    rows = Heartbeat.objects.using(heartbeat_alias(using))
    found = [
        row for row in rows.only("id", "consumers", "topology") if name in (row.consumers or [])
    ]
    for row in found:
        if row.consumers == [name]:
            rows.filter(pk=row.pk).delete()
            continue
        topology = dict(row.topology) if isinstance(row.topology, dict) else {}
        topology.pop(name, None)
        rows.filter(pk=row.pk).update(
            consumers=[other for other in row.consumers if other != name], topology=topology
        )
    return len(found)


def topology_of(cls: type[EventConsumer]) -> dict[str, list[str]]:
    """A consumer's queues and its own exchanges, by name."""
    return {
        "queues": [spec.name for spec in cls.queue_specs()],
        "exchanges": [spec.name for spec in cls.exchange_specs()],
    }


def purge_heartbeats(*, using: str | None = None) -> int:
    """Delete heartbeats not renewed for ``HEARTBEAT_RETENTION_DAYS`` (``purge_outbox``),
    but the last one of a consumer removed from the code while its queues are still there:
    liveness goes on showing them (a warning is logged)."""
    alias = heartbeat_alias(using)
    cutoff = timezone.now() - timedelta(days=float(app_settings.HEARTBEAT_RETENTION_DAYS))
    rows = Heartbeat.objects.using(alias)
    kept = _kept_for_leftovers(alias, cutoff)
    deleted, _ = rows.filter(last_seen__lt=cutoff).exclude(pk__in=kept).delete()
    return int(deleted)


def _kept_for_leftovers(alias: str, cutoff: datetime) -> list[int]:
    """The newest row older than ``cutoff`` of each consumer no longer in the code (and
    in no newer row) whose queues still exist or hold messages."""
    rows = Heartbeat.objects.using(alias).filter(kind=Heartbeat.Kind.CONSUMER)
    recent: set[str] = set()
    newer = rows.filter(last_seen__gte=cutoff).values_list("consumers", flat=True)
    for names in newer[:MAX_PURGE_SCAN]:
        recent.update(names or [])
    registered = set(registry.names())
    newest: dict[str, Heartbeat] = {}
    scan = rows.filter(last_seen__lt=cutoff).order_by("-last_seen")
    for row in scan.only("id", "consumers", "topology")[:MAX_PURGE_SCAN]:
        for name in row.consumers or []:
            if name not in registered and name not in recent and name not in newest:
                newest[name] = row
    left = {
        name: topology["queues"]
        for name, row in newest.items()
        for topology in [recorded_topology([row], [name]).get(name)]
        if topology
    }
    if not left:
        return []
    depths = queue_depths([queue for queues in left.values() for queue in queues])
    kept = []
    for name, queues in left.items():
        found = [depths.get(queue, QueueDepth()) for queue in queues]
        if not gone(found):
            kept.append(newest[name].pk)
            logger.warning(
                "reliable_events: consumer %s is not in the code any more, but its queues "
                "(%s) are still there with %d message(s): its heartbeat is kept so that "
                "liveness shows them; `manage.py forget_consumer %s` deletes them",
                name,
                listed(queues),
                sum(depth.messages or 0 for depth in found),
                name,
            )
    return kept


def listed(queues: list[str]) -> str:
    return queues[0] if len(queues) == 1 else f"{queues[0]} (+{len(queues) - 1} more)"


def recorded_topology(rows: list[Heartbeat], names: list[str]) -> dict[str, dict[str, list[str]]]:
    """The queues and exchanges of the consumers ``names`` as their newest heartbeat that
    recorded them says (``rows``: newest first); a name no row recorded them for (older
    heartbeats) is left out."""
    found: dict[str, dict[str, list[str]]] = {}
    for row in rows:
        topology = row.topology if isinstance(row.topology, dict) else {}
        for name in names:
            entry = topology.get(name)
            if name in found or not isinstance(entry, dict) or not entry.get("queues"):
                continue
            found[name] = {
                key: [str(value) for value in entry.get(key) or []]
                for key in ("queues", "exchanges")
            }
    return found
