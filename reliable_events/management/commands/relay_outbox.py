"""``relay_outbox``: publish pending outbox rows to the broker.

Without ``--once`` it is the relay daemon: the pipelined relay (:meth:`Relay.run`), run
after run on one kept database connection; it holds its share of the lanes (leases)
while it has work, and gives them back to the on-commit hooks while it has none; idle,
it waits for a wake-up (PostgreSQL ``NOTIFY`` from the on-commit hook, unless its
connection goes through a pooler: ``RELAY_LISTEN``) or polls every
``RELAY_IDLE_SECONDS``; while the broker is unavailable it pauses at most
``RELAY_BROKER_RETRY_MAX`` between tries.

Exit codes: 0 done (or stopped by SIGTERM/SIGINT); 1 bad arguments or configuration;
3 with ``--once``, when some events could not be published (they stay pending).
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from reliable_events.conf import app_settings
from reliable_events.exceptions import ReliableEventsError
from reliable_events.heartbeats import HeartbeatWriter
from reliable_events.management.arguments import (
    BadArgumentsExit1,
    batch_size,
    database_alias,
    port_number,
)
from reliable_events.metrics_collector import serve_metrics
from reliable_events.relay import Relay, RelayReport
from reliable_events.runner import StopFlag, run_loop, stop_on_signals

EXIT_SOME_FAILED = 3


class Command(BadArgumentsExit1, BaseCommand):
    help = "Publish pending outbox events to the broker with publisher confirms."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--once", action="store_true", help="Publish everything due now, then exit."
        )
        parser.add_argument(
            "--batch-size",
            type=batch_size,
            default=None,
            help="Rows per batch (RELAY_BATCH_SIZE).",
        )
        parser.add_argument(
            "--database", type=database_alias, default=None, help="Database alias to relay from."
        )
        parser.add_argument(
            "--metrics-port",
            type=port_number,
            default=None,
            help="Serve Prometheus metrics on this port (METRICS_PORT).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            relay = Relay(using=options["database"], batch_size=options["batch_size"])
        except ReliableEventsError as exc:
            raise CommandError(str(exc)) from exc
        try:
            if options["once"]:
                self._once(relay)
            else:
                serve_metrics(options["metrics_port"])
                self._loop(relay)
        except ReliableEventsError as exc:  # e.g. the broker has a conflicting topology
            raise CommandError(str(exc)) from exc
        finally:
            relay.close()

    def _once(self, relay: Relay) -> None:
        report = relay.drain()
        self.stdout.write(f"relay_outbox: {report}")
        if not report.lanes and not report.broker_error:
            self.stdout.write(
                "relay_outbox: other relays held every lane the whole time: this run "
                "published nothing (they publish those events)"
            )
        if report.broker_error and not report.interrupted:
            self.stderr.write(f"  error: {report.broker_error}")
            raise CommandError(
                f"the broker is unavailable ({report.broker_error}): due events could not "
                "be published; they stay pending",
                returncode=EXIT_SOME_FAILED,
            )
        if report.failed or report.interrupted:
            for error in report.errors[:3]:
                self.stderr.write(f"  error: {error}")
            raise CommandError(
                f"{report.failed + report.interrupted} event(s) could not be published; "
                "they stay pending",
                returncode=EXIT_SOME_FAILED,
            )

    def _loop(self, relay: Relay) -> None:
        stop = StopFlag()
        total = RelayReport()
        heartbeat = HeartbeatWriter("relay", using=relay.alias)

        def step() -> bool:
            heartbeat.tick(total)
            report = relay.run()
            total.add(report)
            heartbeat.broker_state(report.broker_error)
            if report.claimed:
                self.stdout.write(f"relay_outbox: {report} lanes={report.lanes}")
            if report.broker_error:  # paused as a whole: wait for the breaker, not the idle
                relay.rest()
                stop.wait(relay.breaker.remaining())
                return True
            if report.claimed > 0 and (report.sent > 0 or report.interrupted > 0):
                return True
            # idle: until woken (rows handed over by the on-commit hook) or the next poll
            relay.wait_for_work(idle, stop.is_set)
            return True

        idle = app_settings.seconds("RELAY_IDLE_SECONDS")

        with stop_on_signals(stop):  # installed before "running": a signal after it stops cleanly
            self.stdout.write("relay_outbox: running (SIGTERM or Ctrl-C stops after the batch)")
            self.stdout.flush()
            run_loop(
                step,
                stop=stop,
                idle_seconds=idle,
                recycle_connections=False,
            )
        heartbeat.stop(total)
        self.stdout.write(
            f"relay_outbox: stopped ({stop.signal_name or 'done'}); "
            f"sent={total.sent} failed={total.failed} dead={total.dead} "
            f"interrupted={total.interrupted}"
        )
