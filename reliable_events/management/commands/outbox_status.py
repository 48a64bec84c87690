"""``outbox_status``: counts by status, oldest pending age, dead rows, open dead letters,
and the events the broker diverted to ``<EXCHANGE>.unrouted``.

Exit codes: 0 healthy (or not asked to fail); 2 the database does not answer (one line,
no traceback: a monitoring probe reads it); 3 with ``--fail-on-dead`` when dead outbox
rows or open dead letters exist; 4 with ``--max-pending-age`` when the oldest overdue
pending row is older than that many seconds; 5 with ``--fail-on-unrouted`` when the
unrouted queue holds events (or cannot be counted).  When several apply, the first in
this order wins.
"""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError

from reliable_events.health import EXIT_DATABASE
from reliable_events.liveness import liveness, relays_line
from reliable_events.management.arguments import BadArgumentsExit1, database_alias, seconds_ago
from reliable_events.sanitize import describe_error
from reliable_events.status import outbox_status
from reliable_events.unrouted import UnroutedCount, count_unrouted

EXIT_DEAD = 3
EXIT_STALE = 4
EXIT_UNROUTED = 5


class Command(BadArgumentsExit1, BaseCommand):
    help = (
        "Show the outbox's health: counts by status, oldest pending age, dead letters, "
        "events in the unrouted queue."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="Print one JSON object.")
        parser.add_argument(
            "--fail-on-dead",
            action="store_true",
            help="Exit 3 when dead outbox rows or open dead letters exist.",
        )
        parser.add_argument(
            "--max-pending-age",
            type=seconds_ago,
            default=None,
            help="Exit 4 when the oldest overdue pending row is older than this many seconds "
            "(a delay= event counts from when it became due).",
        )
        parser.add_argument(
            "--fail-on-unrouted",
            action="store_true",
            help="Exit 5 when the broker's unrouted queue holds events, or cannot be counted.",
        )
        parser.add_argument(
            "--skip-broker",
            action="store_true",
            help="Do not ask the broker for the unrouted count (database figures only).",
        )
        parser.add_argument("--database", type=database_alias, default=None, help="Database alias.")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["skip_broker"] and options["fail_on_unrouted"]:
            raise CommandError("--fail-on-unrouted needs the broker: drop --skip-broker")
        try:
            status = outbox_status(using=options["database"])
            state = liveness(using=options["database"], with_queues=not options["skip_broker"])
        except DatabaseError as exc:
            raise CommandError(
                f"the database does not answer ({describe_error(exc)[:300]}): nothing could "
                "be counted",
                returncode=EXIT_DATABASE,
            ) from exc
        unrouted = None if options["skip_broker"] else count_unrouted()
        if options["json"]:
            data = status.as_dict()
            if unrouted is not None:
                data["unrouted"] = unrouted.count
                data["unrouted_error"] = unrouted.error
            data["liveness"] = state.as_dict()
            self.stdout.write(json.dumps(data, sort_keys=True))
        else:
            age = status.oldest_pending_age_seconds
            self.stdout.write(f"pending: {status.pending}")
            self.stdout.write(f"sent: {status.sent}")
            self.stdout.write(f"dead: {status.dead}")
            self.stdout.write("oldest pending age: " + ("-" if age is None else f"{age:.1f}s"))
            self.stdout.write(f"open dead letters: {status.open_dead_letters}")
            for consumer, count in sorted(status.open_dead_letters_by_consumer.items()):
                self.stdout.write(f"  {consumer}: {count}")
            self.stdout.write(f"scheduled (delay=, not due yet): {status.scheduled}")
            self.stdout.write(
                f"held keys (ordered consumers): {status.held_keys}, "
                f"parked events: {status.parked_events}"
            )
            if unrouted is not None:
                self.stdout.write(_unrouted_line(unrouted))
            if state.processes or state.consumers:
                self.stdout.write(
                    relays_line(state.relays_alive, state.relays_failing, state.relay_broker_error)
                )
            for live in state.consumers:
                depth = [
                    f"{live.messages} waiting in {live.queue}" if live.messages is not None else "",
                    f"{live.unacked} unacked" if live.unacked is not None else "",
                    f"{live.retrying} retrying" if live.retrying is not None else "",
                ]
                shown = ", ".join(part for part in depth if part)
                warning = f"; {live.warning}" if live.warning else ""
                self.stdout.write(
                    f"consumer {live.name}: {live.problem or 'alive'}"
                    + (f" ({shown})" if shown else "")
                    + warning
                )
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
        if options["fail_on_unrouted"] and unrouted is not None and unrouted.count != 0:
            raise CommandError(
                f"{unrouted.count} event(s) in {unrouted.queue!r}: run republish_unrouted once "
                "their consumers are bound"
                if unrouted.known
                else f"unrouted queue {unrouted.queue!r}: {unrouted.error}",
                returncode=EXIT_UNROUTED,
            )


def _unrouted_line(unrouted: UnroutedCount) -> str:
    if not unrouted.known:
        return f"unrouted ({unrouted.queue}): unknown, {unrouted.error}"
    note = " (no queue was bound for them: see republish_unrouted)" if unrouted.count else ""
    return f"unrouted ({unrouted.queue}): {unrouted.count}{note}"
