"""``declare_topology``: declare the exchange, the unrouted queue and every consumer's queues.

Idempotent; on ``db://`` it only checks that the queue table exists.  Exit codes: 0
declared; 1 broker unreachable, topology conflict or (``db://``) no table.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from reliable_events.exceptions import ReliableEventsError
from reliable_events.management.arguments import BadArgumentsExit1
from reliable_events.topology_service import declare_all, has_topology


class Command(BadArgumentsExit1, BaseCommand):
    help = "Declare the durable exchange, unrouted queue and consumer queues on the broker."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--url", default=None, help="Broker URL (default BROKER_URL).")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            topology = declare_all(url=options["url"])
        except ReliableEventsError as exc:
            raise CommandError(str(exc)) from exc
        if not has_topology(options["url"]):
            self.stdout.write(
                "declare_topology: nothing to declare on db:// (its queues are rows of a table, "
                "routed by the registered consumers' topics); the table exists"
            )
            return
        for exchange in topology.exchanges:
            self.stdout.write(f"exchange {exchange.name} ({exchange.type})")
        for queue in topology.queues:
            keys = ", ".join(f"{ex or '(default)'}:{key or '-'}" for ex, key in queue.bindings)
            self.stdout.write(f"queue {queue.name}" + (f" <- {keys}" if keys else ""))
        self.stdout.write(
            f"declare_topology: {len(topology.exchanges)} exchange(s), "
            f"{len(topology.queues)} queue(s)"
        )
