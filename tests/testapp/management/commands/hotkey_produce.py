"""``hotkey_produce``: a request-like producer process of the hot-key test
(``tests/integration/test_fast_path.py``).

Commits ``--rate`` transactions a second for ``--seconds``, each one event (message id
``<prefix>-<n>``) on one of ``--keys`` keys shared with the other producer processes.
Transactions of one key are serialised with a transaction-level advisory lock, the way
business code serialises an entity's changes (``select_for_update()``), so outbox id
order is commit order per key.  Prints one JSON line: each message id with the wall-clock
time its transaction committed (taken in an on-commit callback registered before
``publish_event``'s, so before the on-commit publish runs).
"""

from __future__ import annotations

import functools
import json
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.db import connection, transaction

from reliable_events import publish_event

TOPIC = "hot.event"
#: First key of the producers' per-key advisory locks (not the relay's lane namespace).
KEY_LOCK_NAMESPACE = 0x484B


def _stamp(committed: dict[str, float], message_id: str) -> None:
    committed[message_id] = time.time()


class Command(BaseCommand):
    help = "Commit events on a few hot keys at a steady rate; print commit times (tests)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--prefix", required=True, help="Message id prefix.")
        parser.add_argument("--keys", type=int, default=8, help="Shared ordering keys.")
        parser.add_argument("--rate", type=float, default=40.0, help="Transactions per second.")
        parser.add_argument("--seconds", type=float, default=20.0, help="How long to produce.")

    def handle(self, *args: Any, **options: Any) -> None:
        prefix: str = options["prefix"]
        keys = int(options["keys"])
        interval = 1.0 / float(options["rate"])
        started = time.monotonic()
        committed: dict[str, float] = {}
        n = 0
        while time.monotonic() - started < float(options["seconds"]):
            message_id = f"{prefix}-{n:06d}"
            key = f"hot-{n % keys}"
            with transaction.atomic():
                with connection.cursor() as cursor:
                    cursor.execute(
                        "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", [KEY_LOCK_NAMESPACE, key]
                    )
                transaction.on_commit(functools.partial(_stamp, committed, message_id))
                publish_event(TOPIC, {"n": n, "producer": prefix}, key=key, message_id=message_id)
            n += 1
            pause = started + n * interval - time.monotonic()
            if pause > 0:
                time.sleep(pause)
        self.stdout.write(json.dumps(committed))
