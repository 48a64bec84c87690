"""``outbox_status``: counts by status, oldest pending age, dead rows, open dead letters.

Exit codes: 0 healthy (or not asked to fail); 3 with ``--fail-on-dead`` when dead outbox
rows or open dead letters exist; 4 with ``--max-pending-age`` when the oldest pending
row is older than that many seconds.
"""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from reliable_events.status import outbox_status

EXIT_DEAD = 3
EXIT_STALE = 4


class Command(BaseCommand):
    help = "Show the outbox's health: counts by status, oldest pending age, dead letters."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="Print one JSON object.")
        parser.add_argument(
            "--fail-on-dead",
            action="store_true",
            help="Exit 3 when dead outbox rows or open dead letters exist.",
        )
        parser.add_argument(
            "--max-pending-age",
            type=float,
            default=None,
            help="Exit 4 when the oldest pending row is older than this many seconds.",
        )
        parser.add_argument("--database", default=None, help="Database alias.")

    def handle(self, *args: Any, **options: Any) -> None:
        status = outbox_status(using=options["database"])
        if options["json"]:
            self.stdout.write(json.dumps(status.as_dict(), sort_keys=True))
        else:
            age = status.oldest_pending_age_seconds
            self.stdout.write(f"pending: {status.pending}")
            self.stdout.write(f"sent: {status.sent}")
            self.stdout.write(f"dead: {status.dead}")
            self.stdout.write("oldest pending age: " + ("-" if age is None else f"{age:.1f}s"))
            self.stdout.write(f"open dead letters: {status.open_dead_letters}")
            for consumer, count in sorted(status.open_dead_letters_by_consumer.items()):
                self.stdout.write(f"  {consumer}: {count}")
        if options["fail_on_dead"] and (status.dead or status.open_dead_letters):
            raise CommandError(
                f"{status.dead} dead outbox row(s), {status.open_dead_letters} open dead letter(s)",
                returncode=EXIT_DEAD,
            )
        limit = options["max_pending_age"]
        age = status.oldest_pending_age_seconds
        if limit is not None and age is not None and age > limit:
            raise CommandError(
                f"oldest pending row is {age:.0f}s old (limit {limit:g}s)", returncode=EXIT_STALE
            )
