"""Was a consumer's queue deleted under it?  What the topology check re-created, as the
heartbeats carry it and liveness shows it.

A deleted queue takes its messages with it, and the retries that come back to it from
the delay queues while it is gone; the topology check declares it again (so nothing more
is lost), but what was lost is gone unseen unless someone reads the consumer's log.  The
worker keeps the queues its check found missing in its heartbeat (``recreated``: name ->
when); liveness shows a warning for ``RECREATED_WINDOW`` and the metric
``reliable_events_consumer_queues_recreated`` counts them, so an alert can fire and
``replay_events`` can be run.

On a worker's first check a missing queue is usually a first deployment: it counts only
when an earlier heartbeat of the consumer recorded that queue (it existed, and is gone).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from datetime import datetime, timedelta

from django.utils import timezone
from django.utils.dateparse import parse_datetime

#: How long liveness shows a re-created queue.
RECREATED_WINDOW = timedelta(hours=1)


def lost_queues(
    recreated: Mapping[str, tuple[datetime, bool]], recorded: Callable[[], Collection[str]]
) -> dict[str, str]:
    """Of the queues the topology check declared again (name -> (when, on the first
    check)), those that were lost, as name -> ISO time: all found on a later check, and
    those of the first check that an earlier heartbeat recorded (``recorded()``, asked
    only then)."""
    lost = {queue: when.isoformat() for queue, (when, first) in recreated.items() if not first}
    first = [queue for queue, (_, on_first) in recreated.items() if on_first]
    if first:
        known = recorded()
        lost.update({queue: recreated[queue][0].isoformat() for queue in first if queue in known})
    return lost


def recent(
    notes: Iterable[Mapping[str, str]], queues: Iterable[str], now: datetime | None = None
) -> dict[str, datetime]:
    """The queues of ``queues`` re-created within ``RECREATED_WINDOW``, by the newest
    time any of the heartbeats' ``recreated`` notes gives."""
    now = now or timezone.now()
    wanted = set(queues)
    found: dict[str, datetime] = {}
    for note in notes:
        for queue, text in (note or {}).items():
            when = parse_datetime(str(text)) if queue in wanted else None
            if when is None or now - when > RECREATED_WINDOW:
                continue
            if queue not in found or when > found[queue]:
                found[queue] = when
    return found


def warning(name: str, recreated: Mapping[str, datetime], now: datetime | None = None) -> str:
    """What liveness says of a consumer whose queues were re-created lately."""
    now = now or timezone.now()
    newest = max(recreated.values())
    listed = ", ".join(sorted(recreated))
    return (
        f"{listed} {'was' if len(recreated) == 1 else 'were'} deleted and declared again "
        f"{(now - newest).total_seconds():.0f}s ago: the messages in it and the retries "
        f"due meanwhile are lost; `manage.py replay_events {name} --since <before it was "
        "deleted>` re-delivers them (what was applied is skipped)"
    )
