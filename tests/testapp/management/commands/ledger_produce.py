"""``ledger_produce``: a producer process of the ledger test (``tests/integration/test_ledger.py``).

Commits ``--count`` business changes, each an ``Order`` row and its event
(``publish_event`` in the same ``transaction.atomic()``; ``--per-transaction`` of them
share one transaction, like a request that changes a few rows), with message ids
``<prefix>-<n>``.  A transaction that fails because the database went away (restart) is
retried until it commits; it is idempotent (the order is created only if missing, the
event carries a fixed ``message_id``), so a commit whose outcome was unknown is never
doubled.  Payload ``fail`` designs consumer failures: ``"permanent"`` for
``n % 100 == 7``, ``"once"`` for ``n % 100 == 42``; ``"slow"`` (``n % 1000 == 77``) is
applied after a pause inside its transaction (a window for a test to kill the consumer).

Each ``publish_event`` runs inside a ``ledger.produce`` span (attribute
``ledger.message_id``): the span every trace of the event must lead back to.
``--crash-after-commit``: the process SIGKILLs itself right after its last transaction
commits, before the on-commit publish (a web process dying there): the relay's sweep
must send those events.  ``--hold-file``: no transaction begins while that file exists
(the pace resumes after it, shifted by the pause), so that a test's next fault still
finds the stream going however long a node took to come back.

Exit codes: 0 every event committed; 2 ``--max-seconds`` passed first.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError, InterfaceError, connection, transaction
from opentelemetry import trace

from reliable_events import publish_event
from tests.testapp.models import Order

TOPIC = "ledger.created"
EXIT_TOO_SLOW = 2


def held(hold: Path, deadline: float) -> float:
    """Seconds spent waiting for ``hold`` to disappear (not past ``deadline``)."""
    started = time.monotonic()
    while hold.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return time.monotonic() - started


def designed_failure(n: int) -> str | None:
    if n % 100 == 7:
        return "permanent"
    if n % 100 == 42:
        return "once"
    if n % 1000 == 77:
        return "slow"  # applied, after a pause inside the handler's transaction
    return None


class Command(BaseCommand):
    help = "Commit orders with their events, retrying through database restarts (tests)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--prefix", required=True, help="Message id prefix.")
        parser.add_argument("--count", type=int, required=True, help="Events to commit.")
        parser.add_argument("--keys", type=int, default=50, help="Distinct ordering keys.")
        parser.add_argument(
            "--per-transaction", type=int, default=1, help="Orders (and events) per transaction."
        )
        parser.add_argument("--max-seconds", type=float, default=240.0, help="Give up after.")
        parser.add_argument(
            "--rate", type=float, default=0.0, help="At most this many events/s (0: no limit)."
        )
        parser.add_argument(
            "--hold-file", default="", help="Pause while this file exists (the pace shifts)."
        )
        parser.add_argument(
            "--crash-after-commit",
            action="store_true",
            help="SIGKILL this process right after the last commit, before its on-commit publish.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        prefix: str = options["prefix"]
        count, keys = int(options["count"]), int(options["keys"])
        step = max(1, int(options["per_transaction"]))
        deadline = time.monotonic() + float(options["max_seconds"])
        retries = 0
        rate = float(options["rate"])
        began = time.monotonic()
        hold = Path(options["hold_file"]) if options["hold_file"] else None
        for first in range(0, count, step):
            if hold is not None:
                began += held(hold, deadline)
            if rate > 0:  # paced: event ``first`` not before first / rate seconds
                time.sleep(max(0.0, began + first / rate - time.monotonic()))
            numbers = range(first, min(count, first + step))
            failures = 0
            while True:
                if time.monotonic() > deadline:
                    raise CommandError(
                        f"ledger_produce: gave up at {first} after --max-seconds",
                        returncode=EXIT_TOO_SLOW,
                    )
                try:
                    with transaction.atomic():
                        if options["crash_after_commit"] and first + step >= count:
                            # Registered first, so it runs before publish_event's hook.
                            transaction.on_commit(lambda: os.kill(os.getpid(), signal.SIGKILL))
                        for n in numbers:
                            self.commit_one(prefix, n, keys)
                    break
                except (DatabaseError, InterfaceError) as exc:
                    failures += 1
                    retries += 1
                    self.stderr.write(f"ledger_produce: at {first}: {type(exc).__name__}")
                    with contextlib.suppress(DatabaseError, InterfaceError):
                        connection.close()
                    time.sleep(min(1.0, 0.05 * 2**failures))
            if first % 1000 < step:
                self.stdout.write(f"ledger_produce: {prefix} at {first}")
                self.stdout.flush()
        self.stdout.write(f"ledger_produce: done committed={count} retries={retries}")

    @staticmethod
    def commit_one(prefix: str, n: int, keys: int) -> None:
        """The order and its event (idempotent: a retried transaction doubles nothing)."""
        message_id = f"{prefix}-{n:05d}"
        if not Order.objects.filter(reference=message_id).exists():
            Order.objects.create(reference=message_id)
        tracer = trace.get_tracer("tests.ledger")
        with tracer.start_as_current_span(
            "ledger.produce", attributes={"ledger.message_id": message_id}
        ):
            publish_event(
                TOPIC,
                {"n": n, "fail": designed_failure(n), "producer": prefix},
                key=f"{prefix}-k{n % keys}",
                message_id=message_id,
            )
