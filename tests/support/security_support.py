"""Helpers of the security tests: every place a broker failure can surface, exercised.

:func:`broker_failure_surfaces` runs the library against a broker URL that fails (a
closed port, or the real RabbitMQ with a wrong password) and returns the text of each
surface an operator can see: errors and their causes, ``OutboxMessage.last_error``,
command output and exit codes, admin pages and API responses.  The callers assert the
password is in none of them, nor in the captured logs.
"""

from __future__ import annotations

import pickle
import traceback
from io import StringIO
from pathlib import Path
from typing import Any

from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import transaction
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from reliable_events import publish_event
from reliable_events.broker import AmqpPublisher
from reliable_events.consumer import EventConsumer
from reliable_events.exceptions import BrokerError
from reliable_events.models import DeadLetter, OutboxMessage
from reliable_events.relay import dispatcher, relay_once
from tests.support.deadletter_factory import dead_letter

#: The password of the failing URLs: distinctive, so that any copy of it is found.
SECRET = "s3cr3t-PASSWORD"


def run_command(*args: str) -> tuple[int, str]:
    """``call_command(*args)``: its exit code and everything it wrote (and raised)."""
    out, err = StringIO(), StringIO()
    code = 0
    text = ""
    try:
        call_command(*args, stdout=out, stderr=err)
    except CommandError as exc:
        code = exc.returncode
        text = f"CommandError: {exc}\n" + "".join(traceback.format_exception(exc))
    return code, out.getvalue() + err.getvalue() + text


def exception_text(exc: BaseException) -> str:
    """``str``, ``repr`` and the whole formatted chain (causes included) of ``exc``."""
    return f"{exc}\n{exc!r}\n" + "".join(traceback.format_exception(exc))


def broker_failure_surfaces(
    url: str, consumer: type[EventConsumer], admin: Client, api: APIClient
) -> dict[str, str]:
    """Run every broker-facing path with ``BROKER_URL = url`` (which must fail), and
    return ``{surface: text}``.  Asserts that each path did fail (else it proves nothing).
    """
    surfaces: dict[str, str] = {}

    # An AmqpPublisher that cannot connect: the exception and its chain.
    publisher = AmqpPublisher(url, connect_timeout=3)
    try:
        publisher.connect()
    except BrokerError as exc:
        surfaces["BrokerError"] = exception_text(exc)
    else:  # pragma: no cover - the URL must fail
        raise AssertionError(f"connecting to the failing URL succeeded: {publisher.url}")
    finally:
        publisher.close()

    # publish_event: the on-commit publish fails (logged), the relay records the error.
    dispatcher.reset()
    with transaction.atomic():
        row = publish_event("orders.created", {"order": 1})
    OutboxMessage.objects.filter(pk=row.pk).update(next_attempt_at=timezone.now())
    report = relay_once()
    surfaces["relay report"] = f"{report}\n{report.errors!r}\n{report.broker_error}"
    row.refresh_from_db()
    assert report.broker_error, "the relay never tried"
    assert row.last_error, "the failure was not recorded"
    surfaces["OutboxMessage.last_error"] = row.last_error

    # Commands.
    OutboxMessage.objects.filter(pk=row.pk).update(next_attempt_at=timezone.now())
    code, text = run_command("relay_outbox", "--once")
    assert code == 3, text
    surfaces["relay_outbox --once"] = text
    code, text = run_command("consume_events", consumer.name, "--until-idle", "1")
    assert code == 3, text
    surfaces["consume_events"] = text
    code, text = run_command("declare_topology")
    assert code == 1, text
    surfaces["declare_topology"] = text
    code, text = run_command("outbox_status")
    surfaces["outbox_status"] = text
    code, text = run_command("check")
    surfaces["check"] = text
    letter = dead_letter(consumer=consumer.name, queue=consumer.name)
    code, text = run_command("retry_dead_letters", "--id", str(letter.pk))
    assert "could not declare" in text, text
    surfaces["retry_dead_letters"] = text

    # Admin pages (a superuser sees everything) and the API.
    retried = dead_letter(consumer=consumer.name, queue=consumer.name)
    changelist = reverse("admin:reliable_events_deadletter_changelist")
    response = admin.post(
        changelist, {"action": "retry_selected", "_selected_action": [retried.pk]}, follow=True
    )
    surfaces["admin retry action"] = response.content.decode()
    for name, args in (
        ("admin:reliable_events_outboxmessage_changelist", []),
        ("admin:reliable_events_outboxmessage_change", [row.pk]),
        ("admin:reliable_events_overview", []),
        ("admin:reliable_events_deadletter_changelist", []),
        ("admin:reliable_events_deadletter_change", [letter.pk]),
    ):
        page = admin.get(reverse(name, args=args) + ("?status=all" if not args else ""))
        assert page.status_code == 200, name
        surfaces[name] = page.content.decode()
    assert row.last_error[:40] in surfaces["admin:reliable_events_outboxmessage_change"]
    third = dead_letter(consumer=consumer.name, queue=consumer.name)
    for method, path in (
        ("post", f"/api/events/dead-letters/{third.pk}/retry/"),
        ("get", "/api/events/outbox/stats/"),
        ("get", f"/api/events/dead-letters/{letter.pk}/"),
    ):
        response = getattr(api, method)(path, {}, format="json")
        assert response.status_code < 400, (path, response.content)
        surfaces[f"API {method} {path}"] = response.content.decode()
    surfaces["OutboxMessage rows"] = "\n".join(
        f"{r.status} {r.last_error}" for r in OutboxMessage.objects.all()
    )
    surfaces["DeadLetter rows"] = "\n".join(
        f"{d.error_message} {d.traceback} {d.history} {d.note}" for d in DeadLetter.objects.all()
    )
    return surfaces


def leaks(secret: str, surfaces: dict[str, str], logs: str) -> list[str]:
    """The surfaces (and ``"logs"``) whose text contains ``secret``."""
    found = [name for name, text in surfaces.items() if secret in text]
    if secret in logs:
        found.append("logs")
    return found


def consumer_class(registry: Any) -> type[EventConsumer]:
    """A registered consumer for the commands to run (it never receives anything)."""
    from tests.support.consumer_support import make_consumer

    return make_consumer(registry, topics=["orders.*"])


class Unpickled:
    """Unpickling this writes a marker file: proof that someone ran ``pickle.loads``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_write_marker, (str(self.marker),))


def _write_marker(path: str) -> None:
    Path(path).write_text("unpickled!")


def pickled_body(marker: Path) -> bytes:
    """A pickle whose loading has a visible side effect (checked here once)."""
    body = pickle.dumps(Unpickled(marker))
    pickle.loads(body)  # the side effect is real...
    assert marker.exists()
    marker.unlink()  # ...and the consumer must not trigger it again
    return body
