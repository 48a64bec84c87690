"""Is this deployment healthy?  One check (:func:`check_health`) behind the
``reliable_events_health`` command (exit codes for Kubernetes probes) and the health
endpoint (JSON, 200 or 503).

It asks for what the caller names: a live relay daemon, live consumers (by name, or
every registered one), optionally only processes of this host (a pod's own liveness
probe).  A consumer counts as live when a fresh heartbeat names it and its queue is not
left with messages and no consumer (:mod:`reliable_events.liveness`).  The output holds
names, counts and ages only: no broker URL, no payload.
"""

from __future__ import annotations

import json
import logging
import socket
from dataclasses import dataclass, field
from typing import Any

from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_safe

from reliable_events.consumer.base import registry
from reliable_events.exceptions import UnknownConsumer
from reliable_events.liveness import Liveness, liveness
from reliable_events.models import Heartbeat
from reliable_events.sanitize import describe_error

logger = logging.getLogger(__name__)

#: Exit codes of ``reliable_events_health`` (1 is a usage error, as for every command).
EXIT_DATABASE = 2
EXIT_RELAY = 3
EXIT_CONSUMERS = 4


@dataclass
class HealthReport:
    database: bool = True
    relay_required: bool = False
    relays_alive: int = 0
    #: Of those, relays that cannot reach the broker, and why.
    relays_failing: int = 0
    relay_broker_error: str = ""
    #: name -> "" (alive) or why not.
    consumers: dict[str, str] = field(default_factory=dict)
    #: Why the database did not answer (redacted; it may name hosts and roles).
    error: str = ""
    #: The class of that error (what the unauthenticated endpoint shows).
    error_type: str = ""

    @property
    def relay_ok(self) -> bool:
        return not self.relay_required or self.relays_alive > self.relays_failing

    @property
    def consumers_ok(self) -> bool:
        return not any(self.consumers.values())

    @property
    def healthy(self) -> bool:
        return self.database and self.relay_ok and self.consumers_ok

    @property
    def exit_code(self) -> int:
        if not self.database:
            return EXIT_DATABASE
        if not self.relay_ok:
            return EXIT_RELAY
        if not self.consumers_ok:
            return EXIT_CONSUMERS
        return 0

    def as_dict(self, *, public: bool = False) -> dict[str, Any]:
        """The report as JSON; ``public``: the database's error by its class only (its
        message names hosts, ports and roles), for the unauthenticated endpoint.  With
        the database down, what it holds is unknown: ``alive`` is ``null``."""
        known = self.database
        error = self.error
        if public and error:
            error = f"the database does not answer ({self.error_type}); the details are logged"
        return {
            "status": "ok" if self.healthy else "fail",
            "database": self.database,
            "relay": {
                "required": self.relay_required,
                "alive": self.relays_alive if known else None,
                "failing": self.relays_failing if known else None,
                "broker_error": self.relay_broker_error,
            },
            "consumers": {
                name: {"alive": not problem if known else None, "problem": problem}
                for name, problem in self.consumers.items()
            },
            "error": error,
        }


def check_health(
    *, relay: bool = False, consumers: list[str] | None = None, this_host: bool = False
) -> HealthReport:
    """Check what is asked; ``consumers=[]`` means every registered consumer, ``None``
    none.  Raises :class:`UnknownConsumer` for a name that is not registered."""
    names = registry.names() if consumers == [] else list(consumers or [])
    for name in names:
        registry.get(name)
    report = HealthReport(relay_required=relay)
    try:
        state = liveness(with_queues=bool(names))
    except DatabaseError as exc:
        report.database = False
        report.error = describe_error(exc)[:300]
        report.error_type = type(exc).__name__
        report.consumers = dict.fromkeys(names, "unknown: the database does not answer")
        return report
    if this_host:
        _only_this_host(state)
    report.relays_alive = state.relays_alive
    report.relays_failing = state.relays_failing
    report.relay_broker_error = state.relay_broker_error
    for name in names:
        consumer = state.consumer(name)
        report.consumers[name] = consumer.problem if consumer is not None else "never seen"
    return report


def _only_this_host(state: Liveness) -> None:
    """Keep the processes of this host; recount the consumers' live processes."""
    host = socket.gethostname()[:255]
    state.processes = [p for p in state.processes if p.host == host]
    for consumer in state.consumers:
        consumer.processes = sum(
            1
            for p in state.processes
            if p.alive and p.kind == Heartbeat.Kind.CONSUMER and consumer.name in p.consumers
        )
        if not consumer.processes and not consumer.problem:
            consumer.problem = "no live process on this host"


#: The query parameters of :func:`health_view`.
HEALTH_PARAMETERS = frozenset({"relay", "consumers"})


@require_safe
def health_view(request: HttpRequest) -> HttpResponse:
    """``GET ?relay=1&consumers=a,b`` (``consumers=all``: every registered one):
    JSON, 200 when healthy, 503 when not, 400 for a bad query (an unknown parameter
    too: a probe's typo must not pass as healthy)."""
    unknown = sorted(set(request.GET) - HEALTH_PARAMETERS)
    if unknown:
        names = ", ".join(repr(name[:40]) for name in unknown[:5])
        return JsonResponse(
            {"error": f"unknown parameter(s) {names}: use relay and consumers"}, status=400
        )
    repeated = sorted(name for name in HEALTH_PARAMETERS if len(request.GET.getlist(name)) > 1)
    if repeated:
        return JsonResponse(
            {"error": f"{repeated[0]} given more than once: which one is meant?"}, status=400
        )
    relay = request.GET.get("relay", "0")
    if relay not in ("0", "1", "true", "false"):
        return JsonResponse({"error": "relay must be 0 or 1"}, status=400)
    wanted = request.GET.get("consumers")
    consumers: list[str] | None = None
    if wanted is not None:
        consumers = [] if wanted == "all" else [n for n in wanted.split(",") if n][:200]
        if not consumers and wanted != "all":
            return JsonResponse(
                {"error": "consumers is empty: name them (consumers=a,b) or consumers=all"},
                status=400,
            )
    try:
        report = check_health(relay=relay in ("1", "true"), consumers=consumers)
    except UnknownConsumer as exc:
        return JsonResponse({"error": str(exc)[:300]}, status=400)
    if report.error:
        logger.warning("reliable_events: health check: %s", report.error)
    return HttpResponse(
        json.dumps(report.as_dict(public=True), sort_keys=True),
        status=200 if report.healthy else 503,
        content_type="application/json",
    )
