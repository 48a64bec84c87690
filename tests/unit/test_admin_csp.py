"""Every admin page of ours works under a strict Content Security Policy.

Each page is rendered with data on it and parsed: no inline ``<script>`` (a JSON data
block excepted: it does not run), no ``<style>`` element, no ``style=`` attribute, no
``on*=`` event handler, no ``javascript:`` URL; every script and stylesheet comes from our
own origin. On Django 6 the pages are also served through Django's
``ContentSecurityPolicyMiddleware`` with the suite's strict policy (``STRICT_CSP``), and
the response must carry it.
"""

from __future__ import annotations

from html.parser import HTMLParser
from typing import Any
from urllib.parse import urlsplit

import django
import pytest
from django.conf import settings
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from reliable_events.models import DeadLetter, ProcessedMessage, QueuedMessage
from tests.support.deadletter_factory import dead_letter, many_dead_letters, outbox_row

pytestmark = pytest.mark.django_db

HAS_CSP_MIDDLEWARE = django.VERSION >= (6, 0)


class InlineCode(HTMLParser):
    """Collects what a strict policy would block, and the scripts/styles a page loads."""

    def __init__(self) -> None:
        super().__init__()
        self.blocked: list[str] = []
        self.scripts: list[str] = []
        self.stylesheets: list[str] = []
        self._inline_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        for name, value in attrs:
            script_url = (value or "").strip().lower().startswith("javascript:")
            if name == "style" or name.startswith("on") or script_url:
                self.blocked.append(f"<{tag} {name}={value!r}>")
        if tag == "style":
            self.blocked.append("<style> element")
        elif tag == "script":
            if values.get("src"):
                self.scripts.append(str(values["src"]))
            elif values.get("type") != "application/json":
                self._inline_script = True
        elif tag == "link" and values.get("rel") == "stylesheet":
            self.stylesheets.append(str(values.get("href")))

    def handle_data(self, data: str) -> None:
        if self._inline_script and data.strip():
            self.blocked.append(f"inline <script>: {data.strip()[:80]!r}")

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._inline_script = False


def expected_header() -> str:
    return "; ".join(f"{name} {' '.join(values)}" for name, values in settings.STRICT_CSP.items())


@pytest.fixture
def strict_csp(settings: Any) -> None:
    if HAS_CSP_MIDDLEWARE:
        if settings.CSP_MIDDLEWARE not in settings.MIDDLEWARE:
            settings.MIDDLEWARE = [
                settings.MIDDLEWARE[0],
                settings.CSP_MIDDLEWARE,
                *settings.MIDDLEWARE[1:],
            ]
        settings.SECURE_CSP = settings.STRICT_CSP


def our_admin_pages() -> list[tuple[str, str, dict[str, Any] | None]]:
    """(name, url, POST data or None) of every admin page the app renders, with data on it."""
    now = timezone.now()
    sent = outbox_row(status="sent", sent_at=now, attempts=2, last_error="nack")
    outbox_row(status="dead", attempts=9, last_error="broker refused")
    letter = dead_letter(message_id=sent.message_id)
    many_dead_letters(6)
    processed = ProcessedMessage.objects.create(consumer="mail.send", message_id=sent.message_id)
    queued = QueuedMessage.objects.create(
        queue="mail.send", message_id="q-1", topic="orders.created", body=b'{"order_id": 1}'
    )
    app = "admin:reliable_events"
    change = "admin:reliable_events_{}_change"
    return [
        ("admin index", reverse("admin:index"), None),
        ("app index", reverse("admin:app_list", args=["reliable_events"]), None),
        ("overview", reverse(f"{app}_overview"), None),
        ("dead letters", reverse(f"{app}_deadletter_changelist"), None),
        (
            "dead letters, payload search",
            reverse(f"{app}_deadletter_changelist") + "?payload=order_id%3D42&status=all",
            None,
        ),
        ("dead letter", reverse(change.format("deadletter"), args=[letter.pk]), None),
        ("failure groups", reverse(f"{app}_deadletter_groups"), None),
        ("timeline", reverse(f"{app}_timeline") + f"?message_id={sent.message_id}", None),
        ("timeline search", reverse(f"{app}_timeline"), None),
        ("edit and retry", reverse(f"{app}_deadletter_edit", args=[letter.pk]), None),
        ("history", reverse(f"{app}_deadletter_history", args=[letter.pk]), None),
        (
            "discard confirmation",
            reverse(f"{app}_deadletter_changelist"),
            {"action": "discard_selected", "_selected_action": [str(letter.pk)], "index": "0"},
        ),
        ("outbox", reverse(f"{app}_outboxmessage_changelist"), None),
        ("outbox, dead rows", reverse(f"{app}_outboxmessage_changelist") + "?status=dead", None),
        ("outbox row", reverse(change.format("outboxmessage"), args=[sent.pk]), None),
        ("processed", reverse(f"{app}_processedmessage_changelist"), None),
        ("processed row", reverse(change.format("processedmessage"), args=[processed.pk]), None),
        ("queued", reverse(f"{app}_queuedmessage_changelist"), None),
        ("queued row", reverse(change.format("queuedmessage"), args=[queued.pk]), None),
    ]


def test_every_admin_page_renders_under_a_strict_csp(admin_client: Client, strict_csp: None):
    pages = our_admin_pages()
    assert DeadLetter.objects.filter(status=DeadLetter.Status.OPEN).count() == 7
    problems: dict[str, list[str]] = {}
    for name, url, data in pages:
        response = admin_client.post(url, data) if data else admin_client.get(url)
        assert response.status_code == 200, (name, url, response.status_code)
        if HAS_CSP_MIDDLEWARE:
            assert response["Content-Security-Policy"] == expected_header(), name
        page = InlineCode()
        page.feed(response.content.decode())
        page.close()
        assert page.scripts, f"{name}: loads no script (not the admin's base template?)"
        foreign = [
            src
            for src in page.scripts + page.stylesheets
            if urlsplit(src).scheme or urlsplit(src).netloc
        ]
        if page.blocked or foreign:
            problems[name] = page.blocked + [f"not from our origin: {src}" for src in foreign]
    assert problems == {}


def test_the_checker_finds_inline_code() -> None:
    page = InlineCode()
    page.feed(
        '<script>alert(1)</script><script type="application/json">{"a": 1}</script>'
        '<style>p {}</style><p style="color: red" onclick="go()">'
        '<a href="javascript:go()">x</a><script src="/static/a.js"></script>'
    )
    assert page.blocked == [
        "inline <script>: 'alert(1)'",
        "<style> element",
        "<p style='color: red'>",
        "<p onclick='go()'>",
        "<a href='javascript:go()'>",
    ]
    assert page.scripts == ["/static/a.js"]
