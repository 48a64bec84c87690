"""``republish_unrouted``: send the events in ``<EXCHANGE>.unrouted`` to the events
exchange again, once their consumers' bindings are back (on ``db://``: move them to the
rows of the queues now bound to their topic, a chunk per transaction).

First the whole topology is declared (``declare_topology``: the exchange and every
registered consumer's queue and bindings) unless ``--no-declare``.  Then each message is
re-published with its routing key, body, message id and headers, with a publisher
confirm, and its unrouted copy is acked only after that confirm (a crash in between
leaves a duplicate, which consumers absorb, never a loss).  A message that is still
unroutable goes back to the unrouted queue through the alternate exchange; the command
stops after as many messages as the queue held when it started (or ``--limit``).

Exit codes: 0 done (also when nothing was there); 1 broker unreachable or neither AMQP
nor ``db://``;
5 events are still in the unrouted queue afterwards (no binding for their topic).
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from reliable_events.exceptions import ReliableEventsError
from reliable_events.management.arguments import BadArgumentsExit1, count
from reliable_events.topology import unrouted_name
from reliable_events.topology_service import declare_all, has_topology, republish
from reliable_events.unrouted import describe_topics

EXIT_LEFT = 5


class Command(BadArgumentsExit1, BaseCommand):
    help = "Re-publish the events the broker kept in <EXCHANGE>.unrouted (with confirms)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--dry-run", action="store_true", help="Only count them.")
        parser.add_argument(
            "--limit", type=count, default=None, help="Re-publish at most this many."
        )
        parser.add_argument(
            "--no-declare",
            action="store_true",
            help="Do not declare the topology (exchange, consumer queues, bindings) first.",
        )
        parser.add_argument(
            "--progress-every", type=count, default=1000, help="A progress line every N events."
        )
        parser.add_argument("--url", default=None, help="Broker URL (default BROKER_URL).")

    def handle(self, *args: Any, **options: Any) -> None:
        limit = options["limit"]
        every = max(1, int(options["progress_every"]))
        dry_run = options["dry_run"]

        def progress(done: int, total: int, topic: str) -> None:
            if done % every == 0 or done == total:
                self.stdout.write(f"  {done}/{total} re-published (last topic {topic})")

        try:
            if not (dry_run or options["no_declare"]):
                topology = declare_all(url=options["url"])
                if has_topology(options["url"]):
                    self.stdout.write(
                        f"declared {len(topology.exchanges)} exchange(s), "
                        f"{len(topology.queues)} queue(s)"
                    )
            report = republish(options["url"], dry_run=dry_run, limit=limit, progress=progress)
        except ReliableEventsError as exc:
            raise CommandError(str(exc)) from exc
        if dry_run:
            self.stdout.write(
                f"{report.at_start} event(s) in {report.queue!r} (dry run: nothing moved)"
            )
            return
        self.stdout.write(
            f"republish_unrouted: {report.republished} of {report.at_start} event(s) "
            f"re-published from {report.queue!r}"
            + (f" (topics: {describe_topics(report.topics)})" if report.topics else "")
        )
        left = report.at_end or 0
        if left:
            raise CommandError(
                f"{left} event(s) are still in {unrouted_name()!r}: no queue is bound for their "
                "topic (or they arrived meanwhile)",
                returncode=EXIT_LEFT,
            )
