"""Celery tasks: thin wrappers over the relay and the purge.

Put them on django-celery-beat's DatabaseScheduler with one command::

    python manage.py install_beat_schedule

A relay task fired while the previous run is still going does no harm: on PostgreSQL
each ordering lane is held by one relay at a time (lease rows; relays share the
lanes fairly), and every run is bounded by ``max_seconds``.  The task runs the same
pipelined relay as ``relay_outbox`` (:meth:`reliable_events.relay.Relay.drain`).

Each worker process that runs the relay task keeps a relay heartbeat, as the daemon does,
with the process's totals (liveness counts it as a relay while its last run is younger
than ``HEARTBEAT_TIMEOUT_SECONDS``: schedule the task more often than that).  On SQLite
a task fired while another relay publishes finds the one lease held and does nothing.
"""

from __future__ import annotations

import os
from typing import Any

from celery import shared_task

from reliable_events.heartbeats import HeartbeatWriter
from reliable_events.maintenance import purge
from reliable_events.relay import RelayReport, relay_once

#: This worker process's relay heartbeat and the totals of its runs (by pid: a forked
#: child keeps its own).
_heartbeats: dict[int, tuple[HeartbeatWriter, RelayReport]] = {}


def relay_heartbeat() -> tuple[HeartbeatWriter, RelayReport]:
    """The relay heartbeat of the current process, and the totals it reports."""
    pid = os.getpid()
    found = _heartbeats.get(pid)
    if found is None:
        found = _heartbeats[pid] = (HeartbeatWriter("relay"), RelayReport())
    return found


@shared_task(ignore_result=True)
def relay_outbox(max_seconds: float = 50.0) -> dict[str, Any]:
    """Publish every due outbox row (for at most ``max_seconds``)."""
    report = relay_once(max_seconds=max_seconds)
    heartbeat, total = relay_heartbeat()
    total.add(report)
    heartbeat.broker_state(report.broker_error)
    heartbeat.tick(total)
    return {
        "claimed": report.claimed,
        "sent": report.sent,
        "failed": report.failed,
        "dead": report.dead,
        "interrupted": report.interrupted,
        "broker_error": report.broker_error,
    }


@shared_task(ignore_result=True)
def purge_outbox() -> dict[str, Any]:
    """Delete sent outbox rows and processed records past their retention."""
    report = purge()
    return {"outbox_deleted": report.outbox_deleted, "processed_deleted": report.processed_deleted}
