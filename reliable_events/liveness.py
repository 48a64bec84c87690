"""Who is alive?  Each process's heartbeat, and each consumer's queue.

:func:`liveness` reads the heartbeats (:mod:`reliable_events.heartbeats`) back (one
bounded query) together with the depth of each consumer's queue and of what waits in it
for a later attempt (a passive declare per queue on AMQP, its delay queues included, an
ordered consumer's partitions summed; one ``GROUP BY`` on ``db://``, due now and due
later; cached ``METRICS_CACHE_SECONDS``).
A consumer is *down* when no live process runs it, or when its queue holds messages and
the broker counts no consumer on it.  The admin overview, ``outbox_status --json``, the
health command and endpoint and the metrics all use it.  Heartbeat times are the
application hosts' clocks (keep them in sync).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from django.utils import timezone

from reliable_events import queue_loss
from reliable_events.broker_url import is_amqp_url
from reliable_events.conf import app_settings
from reliable_events.consumer.base import EventConsumer, registry
from reliable_events.consumer.partitions import partition_queues
from reliable_events.heartbeats import heartbeat_alias, listed, recorded_topology, topology_of
from reliable_events.models import Heartbeat
from reliable_events.queue_depths import QueueDepth, gone, queue_depths

logger = logging.getLogger(__name__)

#: Most heartbeat rows read at once (newest first).
MAX_ROWS = 500
#: Most consumer names reported (registered ones first).
MAX_CONSUMERS = 200
#: A process whose heartbeat stopped without a clean stop counts as *silent* for this
#: many ``HEARTBEAT_TIMEOUT_SECONDS`` (then it is only history).
SILENT_TIMEOUTS = 10


# -- reading -------------------------------------------------------------------------------
@dataclass
class ProcessBeat:
    """One process, as its last heartbeat shows it."""

    kind: str
    host: str
    pid: int
    consumers: list[str]
    started_at: datetime
    last_seen: datetime
    age_seconds: float
    alive: bool
    stopped: bool
    counters: dict[str, Any]


@dataclass
class ConsumerLiveness:
    """One consumer: the live processes running it, its queue, and what is wrong."""

    name: str
    queue: str
    processes: int = 0
    last_seen: datetime | None = None
    age_seconds: float | None = None
    messages: int | None = None
    #: Delivered to a process and not yet acked (``BROKER_MANAGEMENT_URL``; ``None``: not
    #: known, :attr:`unacked_error` says why when the API was asked).
    unacked: int | None = None
    unacked_error: str = ""
    queue_consumers: int | None = None
    queue_error: str = ""
    #: Messages waiting for a later attempt: in its delay queues (RabbitMQ) or due later
    #: in its queue (``db://``); ``None``: not known here (an ordered consumer retries in
    #: place; on ``memory://`` a retry is an outbox row).
    retrying: int | None = None
    #: Not registered in this code (known from heartbeats) and run by no live process:
    #: removed or renamed.
    retired: bool = False
    #: Empty when all is well, else why this consumer shows red.
    problem: str = ""
    #: Processes that ran it and stopped beating without a clean stop, lately
    #: (``SILENT_TIMEOUTS``): killed, or frozen with its connection still open.
    silent: int = 0
    #: Empty, or what an on-call engineer should look at although it is not down.
    warning: str = ""
    #: Its queues the topology check declared again lately (deleted: what they held is
    #: lost): name -> when (:mod:`reliable_events.queue_loss`).
    recreated: dict[str, datetime] = field(default_factory=dict)
    #: Live processes running it that cannot reach the broker (not in ``processes``).
    cut_off: int = 0
    #: Why (the newest such process's error, redacted).
    broker_error: str = ""

    @property
    def alive(self) -> bool:
        return self.processes > 0


@dataclass
class Liveness:
    processes: list[ProcessBeat]
    consumers: list[ConsumerLiveness]
    timeout_seconds: float
    generated_at: datetime = field(default_factory=timezone.now)

    @property
    def relays_alive(self) -> int:
        return sum(1 for p in self.processes if p.kind == Heartbeat.Kind.RELAY and p.alive)

    def _failing_relays(self) -> list[ProcessBeat]:
        return sorted(
            (
                p
                for p in self.processes
                if p.kind == Heartbeat.Kind.RELAY and p.alive and p.counters.get("broker_error")
            ),
            key=lambda p: p.last_seen,
            reverse=True,
        )

    @property
    def relays_failing(self) -> int:
        """Live relays that cannot reach the broker (alive, publishing nothing)."""
        return len(self._failing_relays())

    @property
    def relays_working(self) -> int:
        return self.relays_alive - self.relays_failing

    @property
    def relay_broker_error(self) -> str:
        """Why the newest failing relay cannot reach the broker ("" when none fails)."""
        failing = self._failing_relays()
        return str(failing[0].counters["broker_error"]) if failing else ""

    @property
    def relay_last_seen(self) -> datetime | None:
        seen = [p.last_seen for p in self.processes if p.kind == Heartbeat.Kind.RELAY]
        return max(seen) if seen else None

    @property
    def unacked_known(self) -> bool:
        """Whether the management API was asked (``BROKER_MANAGEMENT_URL``)."""
        return any(c.unacked is not None or c.unacked_error for c in self.consumers)

    @property
    def down(self) -> list[ConsumerLiveness]:
        return [consumer for consumer in self.consumers if consumer.problem]

    def consumer(self, name: str) -> ConsumerLiveness | None:
        return next((c for c in self.consumers if c.name == name), None)

    def as_dict(self) -> dict[str, Any]:
        def plain(value: Any) -> Any:
            if isinstance(value, dict):
                return {key: plain(item) for key, item in value.items()}
            return value.isoformat() if isinstance(value, datetime) else value

        return {
            "relays_alive": self.relays_alive,
            "relays_failing": self.relays_failing,
            "relay_broker_error": self.relay_broker_error,
            "relay_last_seen": plain(self.relay_last_seen),
            "timeout_seconds": self.timeout_seconds,
            "consumers": [
                {**{k: plain(v) for k, v in asdict(c).items()}, "alive": c.alive}
                for c in self.consumers
            ],
            "processes": [{k: plain(v) for k, v in asdict(p).items()} for p in self.processes],
        }


def relays_line(alive: int, failing: int, broker_error: str) -> str:
    """``relays alive: N``, with how many of them cannot reach the broker and why (the
    text of ``outbox_status`` and ``reliable_events_health``)."""
    why = f" ({failing} cannot reach the broker: {broker_error})" if failing else ""
    return f"relays alive: {alive}{why}"


def _queues_of(cls: type[EventConsumer] | None, name: str, amqp: bool) -> list[str]:
    """The queues a consumer's messages wait in: its partitions (an ordered consumer on
    RabbitMQ), else its queue."""
    if cls is None:
        return [name]
    if cls.ordered and amqp:
        return partition_queues(cls)
    return [cls.queue_name()]


def _shown_queue(queues: list[str]) -> str:
    """How a consumer's queues are named on one line (``<name>.p0 … p7``)."""
    return queues[0] if len(queues) == 1 else f"{queues[0]} … {queues[-1].rsplit('.', 1)[-1]}"


def _total(values: Iterable[int | None]) -> int | None:
    """The sum, ``None`` when one is not known."""
    found = list(values)
    return None if None in found else sum(value for value in found if value is not None)


def liveness(*, using: str | None = None, with_queues: bool = True) -> Liveness:
    """Every process seen, and every registered consumer's state (see the module doc)."""
    now = timezone.now()
    timeout = app_settings.seconds("HEARTBEAT_TIMEOUT_SECONDS")
    rows = list(Heartbeat.objects.using(heartbeat_alias(using)).order_by("-last_seen")[:MAX_ROWS])
    processes: list[ProcessBeat] = []
    for row in rows:
        age = max(0.0, (now - row.last_seen).total_seconds())
        processes.append(
            ProcessBeat(
                kind=row.kind,
                host=row.host,
                pid=row.pid,
                consumers=[str(name) for name in row.consumers or []],
                started_at=row.started_at,
                last_seen=row.last_seen,
                age_seconds=round(age, 3),
                alive=not row.stopped and age <= timeout,
                stopped=row.stopped,
                counters=row.counters if isinstance(row.counters, dict) else {},
            )
        )
    known = {cls.name: cls for cls in registry.all()}
    names = list(known)
    for process in processes:
        names.extend(n for n in process.consumers if n not in known and n not in names)
    names = names[:MAX_CONSUMERS]
    left = {
        name: topology["queues"]
        for name, topology in recorded_topology(rows, [n for n in names if n not in known]).items()
    }
    on_amqp = is_amqp_url(str(app_settings.BROKER_URL))
    queues = {
        name: left[name] if name in left else _queues_of(known.get(name), name, on_amqp)
        for name in names
    }
    consumers = {
        name: ConsumerLiveness(
            name,
            _shown_queue(queues[name]) if name not in left else listed(queues[name]),
            retired=name not in known,
        )
        for name in names
    }
    silent_after = timeout * SILENT_TIMEOUTS
    silent_for: dict[str, float] = {}
    notes: dict[str, list[dict[str, str]]] = {}
    for process in processes:
        if process.kind != Heartbeat.Kind.CONSUMER:
            continue
        silent = not process.alive and not process.stopped
        silent = silent and process.age_seconds <= silent_after
        for name in process.consumers:
            state = consumers.get(name)
            if state is None:
                continue
            if process.counters.get("recreated"):
                notes.setdefault(name, []).append(process.counters["recreated"])
            if process.alive and process.counters.get("broker_error"):
                state.cut_off += 1
                if not state.broker_error:  # newest first
                    state.broker_error = str(process.counters["broker_error"])
            elif process.alive:
                state.processes += 1
            elif silent:
                state.silent += 1
                silent_for[name] = min(
                    silent_for.get(name, process.age_seconds), process.age_seconds
                )
            if state.last_seen is None or process.last_seen > state.last_seen:
                state.last_seen = process.last_seen
                state.age_seconds = process.age_seconds
    for state in consumers.values():
        state.retired = state.retired and not state.processes  # else other code runs it
    if with_queues and consumers:
        delay_queues = {
            name: known[name].retry_queue_names() if on_amqp and name in known else []
            for name in consumers
        }
        depths = queue_depths(
            [queue for name in consumers for queue in queues[name]]
            + [queue for name in consumers for queue in delay_queues[name]]
        )
        for state in list(consumers.values()):
            found = [depths.get(queue, QueueDepth()) for queue in queues[state.name]]
            delayed = [depths.get(queue, QueueDepth()) for queue in delay_queues[state.name]]
            state.messages = _total(depth.messages for depth in found)
            if state.retired:  # what is left of it (a queue may be deleted already)
                state.messages = sum(depth.messages or 0 for depth in found)
            state.queue_consumers = _total(depth.consumers for depth in found)
            state.unacked = _total(depth.unacked for depth in found)
            state.unacked_error = next((d.unacked_error for d in found if d.unacked_error), "")
            state.retrying = _retrying(found[0], delayed)
            state.queue_error = next((d.error for d in (*found, *delayed) if d.error), "")
            if state.retired and gone(found):
                del consumers[state.name]  # removed with its queues: history only
    for state in consumers.values():
        state.problem = _problem(state, on_amqp)
        cls = known.get(state.name)
        own = topology_of(cls)["queues"] if cls is not None else queues[state.name]
        state.recreated = queue_loss.recent(notes.get(state.name, []), own)
        warnings = []
        if state.silent:
            warnings.append(_silent_warning(state, silent_for[state.name], cls, on_amqp))
        if state.recreated:
            warnings.append(queue_loss.warning(state.name, state.recreated))
        state.warning = "; ".join(warnings)
    return Liveness(
        processes=processes, consumers=list(consumers.values()), timeout_seconds=timeout
    )


def _retrying(depth: QueueDepth, delay_queues: list[QueueDepth]) -> int | None:
    """What waits for a later attempt: the ``db://`` queue's delayed rows, else the sum
    of the delay queues (``None`` when one of them could not be counted)."""
    if depth.delayed is not None:
        return depth.delayed
    counts = [queue.messages for queue in delay_queues]
    if not counts or None in counts:
        return None
    return sum(count for count in counts if count is not None)


def _problem(state: ConsumerLiveness, on_amqp: bool) -> str:
    if state.retired and state.messages is not None:
        if on_amqp:
            return (
                f"not in the code any more, but its queues are still bound and fill up "
                f"({state.messages} message(s) in {state.queue}): "
                f"`manage.py forget_consumer {state.name}` deletes them"
            )
        waiting = state.messages + (state.retrying or 0)
        return (
            f"not in the code any more; {waiting} message(s) left in {state.queue}: "
            f"`manage.py forget_consumer {state.name}` deletes them"
        )
    if state.messages and state.queue_consumers == 0:
        return f"{state.messages} message(s) waiting in {state.queue} and nobody consuming it"
    if not state.alive:
        if state.cut_off:
            return (
                f"{state.cut_off} process(es) running, but none reaches the broker: "
                f"{state.broker_error}"
            )
        if state.last_seen is None:
            return "never seen"
        return f"not seen for {state.age_seconds:.0f}s"
    return ""


def _silent_warning(
    state: ConsumerLiveness, age: float, cls: type[EventConsumer] | None, amqp: bool
) -> str:
    held = "its unacked messages"
    if state.unacked:  # BROKER_MANAGEMENT_URL: what the broker counts, live processes' too
        held += f" (the broker counts {state.unacked} now)"
    if cls is not None and cls.ordered:
        held += ", and its partitions," if amqp else ", and the whole queue,"
    until = (
        "the broker drops its connection: up to twice CONSUMER_HEARTBEAT"
        if amqp
        else "it resumes or is killed: its open transaction holds them"
    )
    return (
        f"{state.silent} process(es) stopped beating {age:.0f}s ago without a clean stop: "
        f"killed, frozen, or cut off from the database (a frozen one keeps {held} until "
        f"{until})"
    )
