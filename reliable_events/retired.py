"""What is left of a consumer removed from the code, and how is it cleared?

A consumer deleted or renamed in the code leaves its queues on RabbitMQ, still bound to
its topics: they go on filling until the broker's disk or memory alarm blocks every
publisher.  Liveness shows such a consumer while a heartbeat names it (and
``purge_outbox`` keeps that heartbeat while its queues are there).
:func:`forget_consumer` deletes what its newest heartbeat recorded: its queue and delay
queues, or an ordered consumer's partitions and partitioning exchange (on ``db://`` the
rows of its queue), then takes it out of the heartbeats.  ``manage.py forget_consumer``
is its command.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from reliable_events.broker import queue_rows
from reliable_events.broker_url import is_amqp_url, is_database_url
from reliable_events.conf import app_settings
from reliable_events.consumer import registry
from reliable_events.db import queue_alias
from reliable_events.exceptions import ReliableEventsError
from reliable_events.heartbeats import forget_heartbeats, left_behind
from reliable_events.liveness import liveness
from reliable_events.queue_depths import clear_cache, queue_depths
from reliable_events.sanitize import describe_error
from reliable_events.unrouted import broker_channel


class ForgetRefused(ReliableEventsError):
    """The consumer's leftovers were not deleted; the message says why."""


@dataclass
class ForgetReport:
    consumer: str
    #: Messages each of its queues held (``None``: the queue was not there).
    queues: dict[str, int | None] = field(default_factory=dict)
    exchanges: list[str] = field(default_factory=list)
    dry_run: bool = False
    #: Heartbeat rows that named it (deleted, or updated without it).
    heartbeats: int = 0

    @property
    def messages(self) -> int:
        return sum(count or 0 for count in self.queues.values())


def forget_consumer(
    name: str,
    *,
    force: bool = False,
    dry_run: bool = False,
    url: str | None = None,
    using: str | None = None,
) -> ForgetReport:
    """Delete what consumer ``name``, no longer in the code, left on the broker.

    Refused (:class:`ForgetRefused`) while it is registered here or a live process runs
    it, when no heartbeat ever named it, when the broker cannot be asked, and when its
    queues hold messages unless ``force`` (they would be lost: nothing else applies them).
    """
    url = str(url or app_settings.BROKER_URL)
    if name in registry.names():
        raise ForgetRefused(
            f"{name!r} is a consumer of this code: remove it from the code (and stop its "
            "processes) first"
        )
    state = liveness(using=using, with_queues=False).consumer(name)
    if state is not None and state.processes:
        raise ForgetRefused(
            f"{state.processes} live process(es) still run {name!r}: stop them (or deploy "
            "the code without it) first"
        )
    recorded = left_behind(name, using=using)
    if recorded is None:
        raise ForgetRefused(
            f"no heartbeat names {name!r}: nothing is known of it here (check the name: "
            "`outbox_status` lists the consumers seen)"
        )
    report = ForgetReport(name, dry_run=dry_run)
    queues = recorded.get("queues") or [name]
    report.exchanges = list(recorded.get("exchanges") or [])
    clear_cache()
    depths = queue_depths(queues, url=url)
    for queue in queues:
        depth = depths[queue]
        if depth.error and not depth.missing:
            raise ForgetRefused(f"the broker could not count {queue}: {depth.error}")
        held = (depth.messages or 0) + (depth.delayed or 0)
        report.queues[queue] = None if depth.missing else held
    if report.messages and not (force or dry_run):
        raise ForgetRefused(
            f"the queues of {name!r} hold {report.messages} message(s) that no consumer will "
            "apply: deleting them loses them; --force (force=True) deletes them anyway"
        )
    if dry_run:
        return report
    if is_amqp_url(url):
        _delete_on_broker(url, report, force=force)
    elif is_database_url(url):
        queue_rows.delete_queues(queue_alias(url), queues)
    report.heartbeats = forget_heartbeats(name, using=using)
    return report


def _delete_on_broker(url: str, report: ForgetReport, *, force: bool) -> None:
    """The partitioning exchange first (nothing is routed to the partitions after it),
    then the queues, each only if still empty unless ``force``."""
    queue = ""
    try:
        with broker_channel(url, float(app_settings.CONNECT_TIMEOUT)) as channel:
            for exchange in report.exchanges:
                channel.exchange_delete(exchange)
            for queue in report.queues:
                channel.queue_delete(queue, if_empty=not force)
    except Exception as exc:
        where = f" while deleting {queue}" if queue else ""
        raise ForgetRefused(
            f"the broker refused{where}: {describe_error(exc, url)} (a message may have "
            "arrived since it was counted: run it again, or with --force)"
        ) from exc
