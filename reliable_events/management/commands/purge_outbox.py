"""``purge_outbox``: delete sent outbox rows and processed records past retention.

Exit codes: 0 done; 1 bad arguments.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from reliable_events.maintenance import purge
from reliable_events.management.arguments import BadArgumentsExit1, batch_size, database_alias
from reliable_events.utils import parse_duration


class Command(BadArgumentsExit1, BaseCommand):
    help = "Delete sent outbox rows and processed-message records older than their retention."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--older-than",
            default=None,
            help="Age of sent rows to delete, e.g. 7d, 12h, 30m (default OUTBOX_RETENTION_DAYS).",
        )
        parser.add_argument(
            "--processed-older-than",
            default=None,
            help="Age of processed records to delete (default PROCESSED_RETENTION_DAYS).",
        )
        parser.add_argument(
            "--batch-size", type=batch_size, default=None, help="Rows per statement."
        )
        parser.add_argument("--database", type=database_alias, default=None, help="Database alias.")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            older = parse_duration(options["older_than"]) if options["older_than"] else None
            processed = (
                parse_duration(options["processed_older_than"])
                if options["processed_older_than"]
                else None
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        verbosity = options["verbosity"]

        def progress(deleted: int) -> None:
            if verbosity >= 1:
                self.stdout.write(f"  deleted {deleted} rows so far")

        report = purge(
            older_than=older,
            processed_older_than=processed,
            batch_size=options["batch_size"],
            using=options["database"],
            progress=progress,
        )
        self.stdout.write(f"purge_outbox: {report}")
