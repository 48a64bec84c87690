"""``reliable_events_health [--relay] [--consumers [NAME ...]] [--this-host]``: a probe.

Exit codes: 0 healthy; 1 bad arguments or an unknown consumer; 2 the database does not
answer; 3 ``--relay`` and no live relay daemon; 4 a named consumer is not alive (no
fresh heartbeat, or messages waiting in its queue with nobody consuming).  When several
apply, the first in this order wins.  ``--consumers`` without names checks every
registered consumer; ``--this-host`` counts only this host's processes (a pod's own
liveness probe).
"""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from reliable_events.exceptions import UnknownConsumer
from reliable_events.health import check_health
from reliable_events.liveness import relays_line
from reliable_events.management.arguments import BadArgumentsExit1


class Command(BadArgumentsExit1, BaseCommand):
    help = "Check that the relay and consumers are alive (exit codes for probes)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--relay", action="store_true", help="Require a live relay daemon.")
        parser.add_argument(
            "--consumers",
            nargs="*",
            default=None,
            metavar="NAME",
            help="Require these consumers alive (no names: every registered one; 'a b' or 'a,b').",
        )
        parser.add_argument(
            "--this-host", action="store_true", help="Count only this host's processes."
        )
        parser.add_argument("--json", action="store_true", help="Print one JSON object.")

    def handle(self, *args: Any, **options: Any) -> None:
        consumers = options["consumers"]
        if consumers is not None:  # "a b" or "a,b", as the endpoint's consumers=a,b
            consumers = [name for given in consumers for name in given.split(",") if name]
        try:
            report = check_health(
                relay=options["relay"],
                consumers=consumers,
                this_host=options["this_host"],
            )
        except UnknownConsumer as exc:
            raise CommandError(str(exc)) from exc
        if options["json"]:
            self.stdout.write(json.dumps(report.as_dict(), sort_keys=True))
        else:
            self.stdout.write(f"database: {'ok' if report.database else report.error}")
            if report.relay_required and report.database:
                self.stdout.write(
                    relays_line(
                        report.relays_alive, report.relays_failing, report.relay_broker_error
                    )
                )
            for name, problem in report.consumers.items():
                self.stdout.write(f"consumer {name}: {problem or 'alive'}")
        if report.exit_code:
            raise CommandError(
                "unhealthy: " + ", ".join(_reasons(report)), returncode=report.exit_code
            )


def _reasons(report: Any) -> list[str]:
    if not report.database:
        return ["the database does not answer"]  # nothing else could be checked
    reasons = []
    if not report.relay_ok:
        reasons.append(
            "no relay daemon reaches the broker"
            if report.relays_failing
            else "no live relay daemon"
        )
    reasons.extend(f"{name}: {problem}" for name, problem in report.consumers.items() if problem)
    return reasons
