"""``consume_events [NAME ...]``: run event consumers (all registered ones by default).

Manual acks after the handler's transaction commits, retries through delay queues,
dead letters for what cannot be processed; reconnects to the broker and waits for the
database on its own.  SIGTERM or Ctrl-C lets the current message finish and be acked.

Exit codes: 0 stopped by SIGTERM/SIGINT, idle for ``--until-idle`` seconds, or
``--max-messages`` reached; 1 bad arguments, unknown consumer, no consumers, or a
topology conflict on the broker; 3 with ``--until-idle``, when it expired while the
broker could not be reached.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from reliable_events.broker import safe_url
from reliable_events.consumer import registry
from reliable_events.consumer.worker import Worker
from reliable_events.exceptions import ReliableEventsError
from reliable_events.management.arguments import (
    BadArgumentsExit1,
    count,
    finite_float,
    port_number,
    prefetch_count,
)
from reliable_events.metrics_collector import serve_metrics
from reliable_events.runner import StopFlag, stop_on_signals

EXIT_BROKER_UNREACHABLE = 3


class Command(BadArgumentsExit1, BaseCommand):
    help = "Consume events: run the named consumers (default: every registered one)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("names", nargs="*", metavar="NAME", help="Consumer names.")
        parser.add_argument(
            "--until-idle",
            type=finite_float,
            default=None,
            metavar="SECONDS",
            help="Exit (code 0) after this many seconds without a message.",
        )
        parser.add_argument(
            "--max-messages", type=count, default=None, help="Exit after this many messages."
        )
        parser.add_argument(
            "--prefetch",
            type=prefetch_count,
            default=None,
            help="Unacked messages held (PREFETCH_COUNT).",
        )
        parser.add_argument(
            "--metrics-port",
            type=port_number,
            default=None,
            help="Serve Prometheus metrics on this port (METRICS_PORT).",
        )
        parser.add_argument(
            "--list", action="store_true", help="List the registered consumers and exit."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["list"]:
            for cls in registry.all():
                self.stdout.write(
                    f"{cls.name}: topics={', '.join(cls.topics)} "
                    f"max_retries={cls.get_max_retries()} "
                    f"retry_delays={cls.get_retry_delays()}" + (" ordered" if cls.ordered else "")
                )
            return
        for name in ("until_idle", "max_messages", "prefetch"):  # --metrics-port: its type
            value = options[name]
            if value is not None and value <= 0:
                raise CommandError(f"--{name.replace('_', '-')} must be positive")
        stop = StopFlag()

        def progress(text: str) -> None:
            self.stdout.write(f"consume_events: {text}")
            self.stdout.flush()

        try:
            worker = Worker(
                options["names"] or None, prefetch=options["prefetch"], stop=stop, progress=progress
            )
        except ReliableEventsError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(
            f"consume_events: running {', '.join(worker.consumers)} on {safe_url(worker.url)} "
            "(SIGTERM or Ctrl-C stops after the current message)"
        )
        self.stdout.flush()
        try:
            serve_metrics(options["metrics_port"])
        except ReliableEventsError as exc:
            worker.close()
            raise CommandError(str(exc)) from exc
        with stop_on_signals(stop):
            try:
                stats = worker.run(
                    until_idle=options["until_idle"], max_messages=options["max_messages"]
                )
            except ReliableEventsError as exc:
                raise CommandError(str(exc)) from exc
        if stop.signal_name:
            self.stdout.write(f"consume_events: stopped by {stop.signal_name}")
        if options["until_idle"] is not None and stats.disconnected and not stop.is_set():
            raise CommandError(
                "the broker could not be reached before --until-idle expired",
                returncode=EXIT_BROKER_UNREACHABLE,
            )
