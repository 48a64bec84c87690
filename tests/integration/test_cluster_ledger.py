"""The cluster ledger: 10,000 events through a 3-node RabbitMQ cluster that loses nodes.

* a private 3-node cluster (``rabbit_cluster``, :mod:`tests.support.rabbit_node`), never
  the machine's own broker; every process gets the node list as ``BROKER_URL`` and
  ``QUEUE_TYPE = "quorum"`` (the consumer's queue, its delay queue and the unrouted
  queue are quorum queues, replicated on the three nodes);
* 3 paced ``ledger_produce`` processes (on-commit publishing), 2 ``relay_outbox`` and one
  ``consume_events`` process (one, so that its order of application is the queue's
  order: the per-key sequence is checked on it);
* mid-stream, one after the other: (a) SIGKILL of the Erlang VM of the node relay 0 is
  connected to, restarted once publishing and consuming resumed; (b) SIGKILL of the VM
  of the node leading the consumer's quorum queue (declared through node 1, so another
  node than (a)'s at first), restarted likewise; (c) the node relay 0 is then connected
  to frozen with SIGSTOP for 30 s, then SIGCONT.  A kill whose aftermath (publishing and
  consuming resumed, the node restarted and back in the cluster) lasts longer than
  ``HOLD_AFTER`` holds the producers until it ends (``Fleet.held``; their pace shifts by
  the pause), so that a slow recovery on a loaded machine does not outlast their stream
  before the next fault.

Shipped defaults throughout (``TIME_SCALE`` from the tests' settings only): a frozen node
is left by a publisher after ``CONFIRM_TIMEOUT`` (30 s), by a consumer after two missed
``CONSUMER_HEARTBEAT`` s (60 s: longer than the freeze, so a consumer on the frozen
node waits for it).  Result: every committed id applied exactly once (the designed
permanent failures dead-lettered), per key in publish order at the consumer, and the
time until publishing and consuming resumed after each fault printed.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from django.db import connection

from reliable_events.models import DeadLetter, OutboxMessage, ProcessedMessage
from reliable_events.topology import declare_on_amqp_channel, full_topology
from tests.support.consumer_support import make_consumer
from tests.support.ledger_support import db, ledger_fleet, n_of
from tests.support.procfs import socket_inodes, tcp_sockets
from tests.support.producer_support import child_env
from tests.support.rabbit_node import RabbitCluster
from tests.support.service_control import wait_for
from tests.testapp.consumers import APPLIED_TWICE
from tests.testapp.management.commands.ledger_produce import designed_failure
from tests.testapp.models import Effect

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.postgres,
    pytest.mark.rabbitmq,
    pytest.mark.slow,
    pytest.mark.timeout(600),
]

EVENTS = 10_000
PRODUCERS = 3
PER_TRANSACTION = 5
#: Events per second of all producers together (at most): the stream lasts through the
#: faults (about 110 s on an idle machine).
RATE = 90.0
#: The consumer applies up to this many received messages in one transaction.
BATCH_SIZE = 20
#: Seconds between the end of one fault (its node back in the cluster) and the next.
BETWEEN_FAULTS = 5.0
RELAYS = 2
FREEZE_SECONDS = 30.0
MAX_RETRIES = 3
RETRY_DELAYS = [0.5]
#: The whole test stays within this (hangs included; a loaded machine is slow).
BUDGET_SECONDS = 560.0
#: A fault's aftermath longer than this holds the producers (``Fleet.held``) until it ends.
HOLD_AFTER = 10.0
#: A fault's effect is looked for this long at most.
RESUME_TIMEOUT = 90.0
SAMPLE_SECONDS = 0.1
#: A stall after a fault: no growth for this long, beginning within SETTLE s of it.
STALL = 0.5
SETTLE = 3.0


@dataclass
class Progress:
    """Sent outbox rows and applied events of the run, sampled every 0.1 s."""

    run: str
    consumer: str
    samples: list[tuple[float, int, int]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[BaseException] = field(default_factory=list)

    def sample_forever(self) -> None:
        try:
            while not self.stop.wait(SAMPLE_SECONDS):
                sent = db(
                    lambda: OutboxMessage.objects.filter(
                        message_id__startswith=self.run, status=OutboxMessage.Status.SENT
                    ).count()
                )
                applied = db(
                    lambda: ProcessedMessage.objects.filter(consumer=self.consumer).count()
                )
                self.samples.append((time.monotonic(), sent, applied))
        except BaseException as exc:  # reported by the test
            self.errors.append(exc)
        finally:
            connection.close()

    def resumed_after(self, fault: float, column: int) -> float | None:
        """Seconds from ``fault`` until ``column`` grew again after the stall it caused:
        the first run of at least ``STALL`` s without growth that begins within
        ``SETTLE`` s of the fault (work in flight may finish first).  ``0.0``: no such
        stall; ``None``: not known yet.  Resolution: the sampling interval plus the
        batching of the marks (a few tenths of a second)."""
        after = [s for s in self.samples if s[0] >= fault]
        still_since: float | None = None
        for previous, current in itertools.pairwise(after):
            if current[column] == previous[column]:
                if still_since is None:
                    still_since = previous[0]
                continue
            if still_since is not None and current[0] - still_since >= STALL:
                return current[0] - fault
            still_since = None
            if current[0] - fault > SETTLE:
                return 0.0
        return None

    def wait_resumed(self, fault: float, timeout: float) -> tuple[float | None, float | None]:
        """(publishing, consuming) resume times of the fault at ``fault``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            publish, consume = self.resumed_after(fault, 1), self.resumed_after(fault, 2)
            if publish is not None and consume is not None:
                return publish, consume
            time.sleep(0.2)
        return self.resumed_after(fault, 1), self.resumed_after(fault, 2)


def connected_node(cluster: RabbitCluster, pid: int) -> int | None:
    """The cluster node process ``pid`` has an established AMQP connection to (read
    from ``/proc``: the process's socket inodes, then their peers in ``/proc/net/tcp``)."""
    inodes = socket_inodes(pid)
    ports = {node.port: i for i, node in enumerate(cluster.nodes)}
    for sock in tcp_sockets(pid):
        if sock.established and sock.inode in inodes and sock.remote_port in ports:
            return ports[sock.remote_port]
    return None


def test_cluster_ledger_node_kills_and_freeze_lose_nothing_apply_nothing_twice(
    rabbit_cluster: RabbitCluster,
    settings: Any,
    clean_registry: Any,
    tmp_path: Path,
    report_figures: Any,
) -> None:
    cluster = rabbit_cluster
    started = time.monotonic()
    deadline = started + BUDGET_SECONDS
    run = f"cluster-{uuid.uuid4().hex[:8]}"
    exchange = f"test-ev-{run}"
    name = f"{run}.apply"
    settings.RELIABLE_EVENTS = {
        **settings.RELIABLE_EVENTS,
        "BROKER_URL": cluster.urls,
        "EXCHANGE": exchange,
        "QUEUE_TYPE": "quorum",
    }
    twin = make_consumer(
        clean_registry,
        name=name,
        topics=["ledger.#"],
        max_retries=MAX_RETRIES,
        retry_delays=RETRY_DELAYS,
    )
    topology = full_topology(twin.queue_specs())
    from kombu import Connection

    # Declared through node 1: the consumer's quorum queue is led by node 1 at first
    # (client-local leader placement), the processes start on node 0.
    with Connection(cluster.urls[1], connect_timeout=10) as conn:
        declare_on_amqp_channel(conn.channel(), topology)
    assert cluster.leader(name) == 1

    fleet = ledger_fleet(
        env=child_env(),
        logs=tmp_path,
        run=run,
        events=EVENTS,
        producers=PRODUCERS,
        per_transaction=PER_TRANSACTION,
        budget_seconds=BUDGET_SECONDS,
        consumer={
            "name": name,
            "topics": ["ledger.#"],
            "max_retries": MAX_RETRIES,
            "retry_delays": RETRY_DELAYS,
            "batch_size": BATCH_SIZE,
        },
        rate=RATE,
        hold_file=tmp_path / "hold",
    )
    progress = Progress(run, name)
    sampler = threading.Thread(target=progress.sample_forever)
    faults: list[str] = []
    resumed: dict[str, tuple[float | None, float | None]] = {}

    def committed() -> int:
        return db(lambda: OutboxMessage.objects.filter(message_id__startswith=run).count())

    def producing() -> bool:
        return any(c.proc.poll() is None for c in fleet.producers())

    def relay_node() -> int:
        pid = fleet.children[("relay", 0)].proc.pid
        found: list[int] = []

        def connected() -> bool:
            index = connected_node(cluster, pid)
            if index is not None:
                found.append(index)
            return bool(found)

        assert wait_for(connected, timeout=60), "relay 0 has no connection to the cluster"
        return found[-1]

    def outstanding() -> bool:
        """Events committed but not yet sent, or sent but not yet applied."""
        sent = db(
            lambda: OutboxMessage.objects.filter(
                message_id__startswith=run, status=OutboxMessage.Status.SENT
            ).count()
        )
        settled = db(lambda: ProcessedMessage.objects.filter(consumer=name).count())
        return producing() or sent < committed() or settled < sent

    def fault(label: str, act: Callable[[], None], *, while_producing: bool = True) -> float:
        at = time.monotonic()
        when = f"at {at - started:.1f}s, after {faults or 'no fault'}"
        if while_producing:
            assert producing(), f"the producers were done before {label} ({when}): not mid-stream"
        else:
            assert outstanding(), f"nothing was left to publish or consume at {label} ({when})"
        act()
        fleet.note(label)
        faults.append(f"{label} at {at - started:.1f}s, {committed()} committed")
        return at

    try:
        with fleet.lock:
            fleet.start("consumer", 0)
            for i in range(RELAYS):
                fleet.start("relay", i)
            for i in range(PRODUCERS):
                fleet.start("producer", i)
        sampler.start()

        # (a) the node relay 0 publishes through
        assert wait_for(lambda: committed() >= 500, timeout=120)
        victim = relay_node()
        at = fault(f"SIGKILL node {victim} (relay 0's)", lambda: cluster.kill(victim))
        # The producers wait while the system resumes and the node comes back, past
        # HOLD_AFTER from the fault (on a loaded machine that can outlast their stream):
        # the next fault still finds them producing.
        with fleet.held(after=HOLD_AFTER):
            resumed[f"kill node {victim} (relay's)"] = progress.wait_resumed(at, RESUME_TIMEOUT)
            cluster.restart(victim)
            fleet.note(f"node {victim} restarted")
            cluster.wait_until_clustered()
            # one node's fault, not the quorum's
            cluster.wait_until_quorum_safe(cluster.leader(name))

        # (b) the node leading the consumer's quorum queue
        time.sleep(BETWEEN_FAULTS)
        leader = cluster.leader(name)
        at = fault(f"SIGKILL node {leader} (queue leader)", lambda: cluster.kill(leader))
        with fleet.held(after=HOLD_AFTER):
            resumed[f"kill node {leader} (leader)"] = progress.wait_resumed(at, RESUME_TIMEOUT)
            cluster.restart(leader)
            fleet.note(f"node {leader} restarted")
            cluster.wait_until_clustered()

        # (c) freeze the node relay 0 now publishes through
        time.sleep(BETWEEN_FAULTS)
        frozen = relay_node()
        with fleet.held(after=HOLD_AFTER):
            cluster.wait_until_quorum_safe(frozen)
        at = fault(
            f"SIGSTOP node {frozen} (relay 0's)",
            lambda: cluster.freeze(frozen),
            while_producing=False,
        )
        time.sleep(FREEZE_SECONDS)
        # The end of the freeze, not a fault of its own: the producers may be done by now
        # (they keep their pace through a freeze), what they committed may not.
        thawed = fault(
            f"SIGCONT node {frozen}", lambda: cluster.thaw(frozen), while_producing=False
        )
        resumed[f"freeze node {frozen} 30s"] = progress.wait_resumed(at, RESUME_TIMEOUT)
        cluster.wait_until_clustered()

        assert wait_for(
            lambda: all(c.proc.poll() is not None for c in fleet.producers()),
            timeout=max(0.0, deadline - time.monotonic() - 60),
        )
        codes = [c.proc.poll() for c in fleet.producers()]

        def converged() -> bool:
            pending = db(
                lambda: (
                    OutboxMessage.objects.filter(message_id__startswith=run)
                    .exclude(status=OutboxMessage.Status.SENT)
                    .count()
                )
            )
            settled = db(
                lambda: (
                    Effect.objects.filter(consumer=name).count()
                    + DeadLetter.objects.filter(consumer=name)
                    .values("message_id")
                    .distinct()
                    .count()
                )
            )
            return pending == 0 and settled >= committed()

        quiet = wait_for(converged, timeout=max(0.0, deadline - time.monotonic() - 15))
        time.sleep(2.0)  # a late duplicate would show now
        fleet.stop(("consumer", "relay"))
    finally:
        progress.stop.set()
        if sampler.is_alive():
            sampler.join(30)
        fleet.kill_all()
        (tmp_path / "timeline.log").write_text("\n".join(fleet.timeline) + "\n")
        (tmp_path / "progress.log").write_text(
            "".join(f"{t - started:.2f} sent={s} applied={a}\n" for t, s, a in progress.samples)
        )
        with contextlib.suppress(Exception), Connection(cluster.urls[2], connect_timeout=5) as c:
            channel: Any = c.channel()
            for queue in topology.queues:
                channel.queue_delete(queue.name)
            for ex in topology.exchanges:
                channel.exchange_delete(ex.name)
    wall = time.monotonic() - started
    del thawed

    # -- the ledger --------------------------------------------------------------------
    ids = set(
        OutboxMessage.objects.filter(message_id__startswith=run, queue="").values_list(
            "message_id", flat=True
        )
    )
    statuses = Counter(
        OutboxMessage.objects.filter(message_id__startswith=run).values_list("status", flat=True)
    )
    effects = list(
        Effect.objects.filter(consumer=name).order_by("id").values_list("message_id", "payload")
    )
    applied = Counter(message_id for message_id, _ in effects)
    dead = Counter(DeadLetter.objects.filter(consumer=name).values_list("message_id", flat=True))
    twice = DeadLetter.objects.filter(consumer=name, error_message__contains=APPLIED_TWICE)

    permanent = {i for i in ids if designed_failure(n_of(i)) == "permanent"}
    once = {i for i in ids if designed_failure(n_of(i)) == "once"}
    lost = ids - set(applied) - set(dead)
    # Per key, in the order the one consumer applied them (Effect ids ascend with it):
    # each key's numbers ascend.  Designed "once" failures come back later through the
    # delay queue by design and are left out.
    last: dict[str, int] = defaultdict(lambda: -1)
    out_of_order = 0
    for message_id, payload in effects:
        if message_id in once:
            continue
        event = payload["event"]
        key = f"{event['producer']}-k{event['n'] % 50}"
        if event["n"] <= last[key]:
            out_of_order += 1
        last[key] = event["n"]
    logs = fleet.text("relay") + fleet.text("consumer") + fleet.text("producer")
    failovers = logs.count("connected to broker node")

    def secs(value: float | None) -> str:
        return "never" if value is None else f"{value:.1f}s"

    report_figures(
        f"\ncluster ledger (3 nodes, quorum queues, node list): events={len(ids)} "
        f"applied={len(applied)} dead_letters={sum(dead.values())} (designed "
        f"{len(permanent)}) lost={len(lost)} "
        f"applied_twice={sum(1 for c in applied.values() if c > 1) + twice.count()} "
        f"per_key_out_of_order={out_of_order} failovers_logged={failovers}"
        f"\n  faults: {'; '.join(faults)}"
        + "".join(
            f"\n  {label}: publishing resumed after {secs(pub)}, consuming after {secs(con)}"
            for label, (pub, con) in resumed.items()
        )
        + f"\n  wall_time={wall:.1f}s outbox={dict(statuses)}"
    )

    assert not progress.errors, progress.errors
    assert codes == [0] * PRODUCERS, (codes, fleet.text("producer")[-3000:])
    assert len(ids) == EVENTS
    assert statuses == {OutboxMessage.Status.SENT: EVENTS}
    assert quiet, "the run did not converge"
    assert not lost, f"{len(lost)} committed events never applied: {sorted(lost)[:10]}"
    assert set(applied) == ids - permanent
    assert set(applied.values()) == {1}, "an event was applied twice"
    assert not twice.exists(), "an event was applied twice"
    assert set(dead) == permanent
    assert set(dead.values()) == {1}
    assert out_of_order == 0
    assert all(pub is not None and con is not None for pub, con in resumed.values()), resumed
    assert failovers > 0, "no process logged a failover: the faults proved nothing"
