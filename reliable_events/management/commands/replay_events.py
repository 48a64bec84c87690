"""``replay_events NAME --since 2h``: give one consumer the sent events of a time window
again (:func:`reliable_events.replay.replay`): each becomes a re-delivery to its queue
alone; it applies those it never applied and skips the rest as duplicates.

For a consumer whose queue lost messages (deleted with messages in it, or while retries
were on their way back), or a new consumer that should see the recent past.  The window
must lie within ``PROCESSED_RETENTION_DAYS`` unless ``--force``.

Exit codes: 0 done; 1 refused (the message says why) or bad arguments.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from reliable_events.exceptions import ReliableEventsError
from reliable_events.management.arguments import BadArgumentsExit1, count, database_alias
from reliable_events.replay import ReplayReport, replay
from reliable_events.unrouted import describe_topics
from reliable_events.utils import parse_duration


class Command(BadArgumentsExit1, BaseCommand):
    help = "Re-deliver the sent events of a time window to one consumer (duplicates are skipped)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="The consumer.")
        parser.add_argument(
            "--since", required=True, help="How far back the window starts, e.g. 2h, 30m, 1d."
        )
        parser.add_argument(
            "--until", default="0", help="How long ago it ends (default: now), e.g. 1h."
        )
        parser.add_argument(
            "--topic", default=None, help="Only topics matching this pattern (AMQP: *, #)."
        )
        parser.add_argument("--limit", type=count, default=None, help="At most this many.")
        parser.add_argument("--dry-run", action="store_true", help="Only count them.")
        parser.add_argument(
            "--force",
            action="store_true",
            help="Allow a window older than PROCESSED_RETENTION_DAYS (may apply events twice).",
        )
        parser.add_argument("--database", type=database_alias, default=None, help="Database alias.")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            since = parse_duration(options["since"])
            until = parse_duration(options["until"])
        except ValueError as exc:
            raise CommandError(str(exc)) from exc

        def progress(report: ReplayReport) -> None:
            self.stdout.write(f"  {report.queued} event(s) so far")

        try:
            report = replay(
                options["name"],
                since=since,
                until=until,
                topic=options["topic"],
                dry_run=options["dry_run"],
                force=options["force"],
                limit=options["limit"],
                using=options["database"],
                progress=progress,
            )
        except ReliableEventsError as exc:
            raise CommandError(str(exc)) from exc
        for warning in report.warnings:
            self.stderr.write(f"  warning: {warning}")
        verb = "would re-deliver" if report.dry_run else "re-delivering"
        topics = f" (topics: {describe_topics(report.topics)})" if report.topics else ""
        self.stdout.write(
            f"replay_events: {verb} {report.queued} event(s) to {report.queue}{topics}"
            + ("" if report.dry_run or not report.queued else "; duplicates will be skipped")
        )
