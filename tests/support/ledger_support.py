"""Pieces of the ledger tests (``tests/integration/test_ledger*.py``): the relay, consumer
and producer child processes, the chaos threads that SIGKILL them (at random, and aimed
inside a handler), and database reads that survive a PostgreSQL restart."""

from __future__ import annotations

import contextlib
import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

from django.db import DatabaseError, InterfaceError, connection

from tests.support.producer_support import ROOT
from tests.testapp.consumers import APPLYING, LEDGER_CONSUMER_ENV
from tests.testapp.management.commands.ledger_produce import designed_failure

T = TypeVar("T")

#: What ``relay_outbox`` and ``consume_events`` print once started (Django set up, the
#: command's loop about to begin).
RUNNING = b": running"


def db(query: Callable[[], T], timeout: float = 60.0) -> T:
    """``query()`` on this process's connection, reconnecting across a PostgreSQL restart."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return query()
        except (DatabaseError, InterfaceError):
            with contextlib.suppress(DatabaseError, InterfaceError):
                connection.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


# -- child processes --------------------------------------------------------------------
@dataclass
class Child:
    kind: str
    index: int
    generation: int
    proc: subprocess.Popen[bytes]
    log: Path
    out: IO[bytes]


#: What makes a Python child start coverage (``coverage.process_startup``).
COVERAGE_VARIABLES = frozenset({"COVERAGE_PROCESS_CONFIG", "COVERAGE_PROCESS_START"})


@dataclass
class Fleet:
    """The relay, consumer and producer processes, their restarts and their logs."""

    env: dict[str, str]
    logs: Path
    consumer: str
    run: str
    #: Events the producers commit in all, ``producer_count`` processes, orders per transaction.
    events: int
    producer_count: int
    per_transaction: int
    #: The producers give up after this many seconds.
    max_seconds: float
    #: Events per second all producers commit at most together (0: as fast as they can).
    rate: float = 0.0
    #: Events of the "crasher" producer (SIGKILLs itself after its commit, before the
    #: on-commit publish: the relay's sweep sends them).
    crash_events: int = 0
    #: While this file exists the producers begin no transaction (:meth:`held`).
    hold_file: Path | None = None
    children: dict[tuple[str, int], Child] = field(default_factory=dict)
    retired: list[Child] = field(default_factory=list)
    kills: int = 0
    #: What happened when (wall clock, like the children's log lines): timeline.log.
    timeline: list[str] = field(default_factory=list)
    unexpected_exits: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        # Not measured by coverage (scripts/test runs the suite under `coverage run`, whose
        # subprocess patch would trace every child): a SIGKILLed child never writes its
        # data, and the tracer slows the restarts and the event stream the ledger times.
        self.env = {k: v for k, v in self.env.items() if k not in COVERAGE_VARIABLES}

    def argv(self, kind: str, index: int) -> list[str]:
        manage = [sys.executable, str(ROOT / "manage.py")]
        if kind == "relay":
            return [*manage, "relay_outbox"]
        if kind == "consumer":
            return [*manage, "consume_events", self.consumer]
        if kind == "crasher":
            return [
                *manage,
                "ledger_produce",
                f"--prefix={self.run}-crash",
                f"--count={self.crash_events}",
                f"--per-transaction={self.crash_events}",
                "--crash-after-commit",
            ]
        count = self.events // self.producer_count + (
            1 if index < self.events % self.producer_count else 0
        )
        return [
            *manage,
            "ledger_produce",
            f"--prefix={self.run}-p{index}",
            f"--count={count}",
            f"--per-transaction={self.per_transaction}",
            f"--max-seconds={self.max_seconds:.0f}",
            f"--rate={self.rate / self.producer_count:.3f}",
            *([f"--hold-file={self.hold_file}"] if self.hold_file else []),
        ]

    @contextlib.contextmanager
    def held(self, after: float = 0.0) -> Iterator[None]:
        """The producers paused once the block has run ``after`` s, until it ends (their
        pace shifts by the pause): a slow recovery between two faults does not use up
        the stream the next fault needs; a quick one costs no time."""
        assert self.hold_file is not None, "a fleet without hold_file cannot hold"
        hold = self.hold_file

        def begin() -> None:
            hold.touch()
            self.note("producers held")

        timer = threading.Timer(after, begin)
        timer.start()
        try:
            yield
        finally:
            timer.cancel()
            timer.join()
            if hold.exists():
                hold.unlink()
                self.note("producers released")

    def start(self, kind: str, index: int) -> Child:
        previous = self.children.get((kind, index))
        generation = previous.generation + 1 if previous else 0
        log = self.logs / f"{kind}-{index}-{generation}.log"
        out = log.open("wb")
        proc = subprocess.Popen(
            self.argv(kind, index), cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT
        )
        child = Child(kind, index, generation, proc, log, out)
        if previous is not None:
            self.retired.append(previous)
        self.children[(kind, index)] = child
        self.note(f"started {log.stem} pid={proc.pid}")
        return child

    def targets(self) -> list[tuple[str, int]]:
        return [key for key in self.children if key[0] in ("relay", "consumer")]

    def running(self) -> list[tuple[str, int]]:
        """The relays and consumers past their start-up (they printed that they run)."""
        with self.lock:
            return [key for key in self.targets() if _has_started(self.children[key])]

    def kill_and_restart(self, key: tuple[str, int]) -> None:
        with self.lock:
            child = self.children[key]
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGKILL)
                child.proc.wait(30)
                self.kills += 1
                self.note(f"SIGKILLed {child.log.stem} pid={child.proc.pid}")
            self.start(*key)

    def revive(self) -> None:
        """Restart relays and consumers that exited on their own (and remember them)."""
        with self.lock:
            for key in self.targets():
                child = self.children[key]
                code = child.proc.poll()
                if code is not None and code != -signal.SIGKILL:
                    self.unexpected_exits.append(f"{child.log.name}: exit {code}")
                    self.start(*key)

    def producers(self) -> list[Child]:
        return [c for k, c in self.children.items() if k[0] == "producer"]

    def stop(self, kinds: tuple[str, ...], timeout: float = 20.0) -> None:
        """SIGTERM the children of ``kinds``, SIGKILL what has not exited in ``timeout``."""
        with self.lock:
            chosen = [c for k, c in self.children.items() if k[0] in kinds]
            for child in chosen:
                if child.proc.poll() is None:
                    child.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for child in chosen:
                try:
                    child.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    child.proc.kill()
                    child.proc.wait(30)

    def kill_all(self) -> None:
        for child in [*self.children.values(), *self.retired]:
            if child.proc.poll() is None:
                child.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.proc.wait(30)
            child.out.close()

    def note(self, text: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S") + f",{int(time.time() * 1000) % 1000:03d}"
        self.timeline.append(f"{stamp} {text}")

    def text(self, kind: str) -> str:
        every = [*self.retired, *self.children.values()]
        return "".join(
            c.log.read_text(errors="replace")
            for c in sorted(every, key=lambda c: c.log.name)
            if c.kind == kind
        )


def _has_started(child: Child) -> bool:
    if child.proc.poll() is not None:
        return False
    with child.log.open("rb") as log:
        return RUNNING in log.read(65536)


def chaos(fleet: Fleet, stop: threading.Event, errors: list[BaseException]) -> None:
    """Every 1-3 s, SIGKILL a random relay or consumer that is running and start it again
    at once.  One still starting is left alone: on a loaded machine Django's start-up
    alone can outlast the interval, and killing processes that never ran tests nothing."""
    rng = random.Random()
    try:
        while not stop.wait(rng.uniform(1.0, 3.0)):
            running = fleet.running()
            if running:
                fleet.kill_and_restart(rng.choice(running))
            fleet.revive()
    except BaseException as exc:  # reported by the test
        errors.append(exc)


def n_of(message_id: str) -> int:
    """The producer's sequence number in a ledger message id (``<run>-<producer>-<n>``)."""
    return int(message_id.rsplit("-", 1)[1])


def kill_in_handler(
    fleet: Fleet,
    stop: threading.Event,
    errors: list[BaseException],
    record: list[str],
    *,
    kills: int,
) -> None:
    """SIGKILL the consumer that just printed it is applying a ``"slow"`` event: it is
    inside the handler, its transaction open and the message unacknowledged (the random
    kills may or may not land there).  Each slow event once, at most ``kills`` times;
    the ids go to ``record``."""
    offsets: dict[Path, int] = {}
    seen: set[str] = set()
    try:
        while len(record) < kills and not stop.wait(0.05):
            for key in [k for k in fleet.targets() if k[0] == "consumer"]:
                if len(record) >= kills:  # two consumers may apply a slow event in one pass
                    break
                log = fleet.children[key].log
                with log.open("rb") as handle:
                    handle.seek(offsets.get(log, 0))
                    chunk = handle.read()
                complete = chunk[: chunk.rfind(b"\n") + 1]
                offsets[log] = offsets.get(log, 0) + len(complete)
                slow = [
                    line.split()[-1]
                    for line in complete.decode(errors="replace").splitlines()
                    if line.startswith(APPLYING)
                    and designed_failure(n_of(line.split()[-1])) == "slow"
                    and line.split()[-1] not in seen
                ]
                if slow:
                    seen.update(slow)
                    fleet.kill_and_restart(key)
                    fleet.note(f"killed {key[0]}-{key[1]} inside the handler of {slow[-1]}")
                    record.append(slow[-1])
    except BaseException as exc:  # reported by the test
        errors.append(exc)


def ledger_fleet(
    *,
    env: dict[str, str],
    logs: Path,
    run: str,
    events: int,
    producers: int,
    per_transaction: int,
    budget_seconds: float,
    consumer: dict[str, Any],
    **options: Any,
) -> Fleet:
    """The fleet of one ledger run: children logging at INFO, unbuffered, without
    coverage, each consumer child building the consumer ``consumer`` describes (its
    ``name``, topics, retries: what ``LEDGER_CONSUMER_ENV`` carries); the producers give
    up a minute before ``budget_seconds``.  ``options``: further :class:`Fleet` fields."""
    child = {
        **env,
        "PYTHONUNBUFFERED": "1",
        "RE_TEST_LOG_LEVEL": "INFO",
        LEDGER_CONSUMER_ENV: json.dumps(consumer),
    }
    child.pop("COVERAGE_PROCESS_START", None)
    return Fleet(
        env=child,
        logs=logs,
        consumer=consumer["name"],
        run=run,
        events=events,
        producer_count=producers,
        per_transaction=per_transaction,
        max_seconds=budget_seconds - 60,
        **options,
    )
