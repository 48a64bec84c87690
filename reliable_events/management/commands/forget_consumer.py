"""``forget_consumer NAME``: delete what a consumer removed from the code left on the
broker (:func:`reliable_events.retired.forget_consumer`): its queues (delay queues, an
ordered consumer's partitions) and partitioning exchange, as its last heartbeat recorded
them, or the rows of its ``db://`` queue; then it is taken out of the heartbeats.

Refused while the consumer is registered in this code or a live process runs it, and
when its queues hold messages, unless ``--force`` (they are lost).  ``--dry-run`` lists
what would be deleted.

Exit codes: 0 done; 1 refused (the message says why) or bad arguments.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from reliable_events.exceptions import ReliableEventsError
from reliable_events.management.arguments import BadArgumentsExit1
from reliable_events.retired import ForgetReport, forget_consumer


class Command(BadArgumentsExit1, BaseCommand):
    help = "Delete the queues a consumer removed from the code left behind (they keep filling)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="The consumer's name, as outbox_status shows it.")
        parser.add_argument(
            "--force", action="store_true", help="Delete its queues even with messages in them."
        )
        parser.add_argument("--dry-run", action="store_true", help="Only list what it left.")
        parser.add_argument("--url", default=None, help="Broker URL (default BROKER_URL).")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            report = forget_consumer(
                options["name"],
                force=options["force"],
                dry_run=options["dry_run"],
                url=options["url"],
            )
        except ReliableEventsError as exc:
            raise CommandError(str(exc)) from exc
        for line in _lines(report):
            self.stdout.write(line)


def _lines(report: ForgetReport) -> list[str]:
    verb = "would delete" if report.dry_run else "deleted"
    lines = [
        f"  {verb} queue {queue}: " + ("not there" if held is None else f"{held} message(s)")
        for queue, held in report.queues.items()
    ]
    lines += [f"  {verb} exchange {exchange}" for exchange in report.exchanges]
    if report.dry_run:
        return [f"forget_consumer {report.consumer} (dry run: nothing deleted)", *lines]
    return [
        *lines,
        f"forget_consumer {report.consumer}: {len(report.queues)} queue(s) with "
        f"{report.messages} message(s) and {len(report.exchanges)} exchange(s) deleted; "
        f"taken out of {report.heartbeats} heartbeat(s)",
    ]
