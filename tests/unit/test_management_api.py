"""RabbitMQ's management API client (``reliable_events.broker.management``), against a
stub HTTP server: what it asks, what it makes of each answer, and that no answer shows
the password."""

from __future__ import annotations

import base64
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from django.core.checks import run_checks

from reliable_events.broker.management import queue_stats, url_problems, vhost_of

PASSWORD = "s3cr%2Fet"  # percent-encoded in the URL; "s3cr/et" decoded
SECRETS = ("s3cr%2Fet", "s3cr/et", "s3cr")


class Stub:
    """A management API: ``answers`` maps a request path to ``(status, body)``."""

    def __init__(self) -> None:
        self.answers: dict[str, tuple[int, Any]] = {}
        self.requests: list[tuple[str, str]] = []  # (path, Authorization header)
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                stub.requests.append((self.path, self.headers.get("Authorization", "")))
                status, body = stub.answers.get(self.path, (404, {"error": "Object Not Found"}))
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str = "/") -> str:
        return f"http://monitor:{PASSWORD}@127.0.0.1:{self.port}{path}"


@pytest.fixture
def stub() -> Iterator[Stub]:
    server = Stub()
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


def _no_secret(stats: dict[str, Any]) -> None:
    for item in stats.values():
        for secret in SECRETS:
            assert secret not in item.error


@pytest.mark.parametrize(
    ("url", "vhost"),
    [
        ("amqp://guest:guest@127.0.0.1:5672//", "/"),
        ("amqp://h:5672/", "/"),
        ("amqp://h", "/"),
        ("amqp://h/prod", "prod"),
        ("amqp://h/%2Fprod", "/prod"),
        ("amqp://a:5672/prod;amqp://b:5672/prod", "prod"),
    ],
)
def test_the_vhost_is_read_from_the_broker_url_as_kombu_reads_it(url: str, vhost: str) -> None:
    assert vhost_of(url) == vhost


def test_the_unacked_count_of_each_queue_is_read_with_the_decoded_credentials(
    stub: Stub,
) -> None:
    stub.answers["/api/queues/prod/orders.billing"] = (200, {"messages_unacknowledged": 3})
    stub.answers["/api/queues/prod/mail"] = (200, {"messages_unacknowledged": 0})
    stats = queue_stats(stub.url(), "prod", ["orders.billing", "mail"], timeout=2)
    assert {name: (item.unacked, item.error) for name, item in stats.items()} == {
        "orders.billing": (3, ""),
        "mail": (0, ""),
    }
    paths = [path for path, _ in stub.requests]
    assert paths == ["/api/queues/prod/orders.billing", "/api/queues/prod/mail"]
    expected = "Basic " + base64.b64encode(b"monitor:s3cr/et").decode()
    assert {auth for _, auth in stub.requests} == {expected}


def test_a_vhost_and_a_path_prefix_are_kept_in_the_address(stub: Stub) -> None:
    stub.answers["/rabbit/api/queues/%2F/q%2F1"] = (200, {"messages_unacknowledged": 7})
    stats = queue_stats(stub.url("/rabbit/"), "/", ["q/1"], timeout=2)
    assert stats["q/1"].unacked == 7
    assert stats["q/1"].error == ""


def test_a_missing_queue_or_one_not_counted_yet_is_unknown_with_the_reason(stub: Stub) -> None:
    stub.answers["/api/queues/%2F/fresh"] = (200, {"name": "fresh"})
    stub.answers["/api/queues/%2F/odd"] = (200, {"messages_unacknowledged": True})
    stats = queue_stats(stub.url(), "/", ["gone", "fresh", "odd"], timeout=2)
    assert stats["gone"].unacked is None
    assert stats["gone"].error == "no such queue"
    assert stats["fresh"].unacked is None
    assert stats["fresh"].error == "not counted by the broker yet"
    assert stats["odd"].unacked is None
    assert len(stub.requests) == 3  # a 404 is about one queue: the others are still asked


def test_a_refusal_is_asked_once_and_shown_for_every_queue_without_the_password(
    stub: Stub,
) -> None:
    stub.answers["/api/queues/%2F/a"] = (401, {"error": "not_authorised"})
    stats = queue_stats(stub.url(), "/", ["a", "b", "c"], timeout=2)
    assert len(stub.requests) == 1
    assert {item.unacked for item in stats.values()} == {None}
    assert {item.error for item in stats.values()} == {"management API: HTTP 401 Unauthorized"}
    _no_secret(stats)


def test_a_body_that_is_not_json_is_an_error_not_a_crash(stub: Stub) -> None:
    stub.answers["/api/queues/%2F/a"] = (200, b"<html>proxy login</html>")
    stats = queue_stats(stub.url(), "/", ["a"], timeout=2)
    assert stats["a"].unacked is None
    assert stats["a"].error.startswith("management API: JSONDecodeError")


def test_an_unreachable_api_is_an_error_without_the_password() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends: nothing listens
    url = f"http://monitor:{PASSWORD}@127.0.0.1:{port}/"
    stats = queue_stats(url, "/", ["a", "b"], timeout=2)
    assert {item.unacked for item in stats.values()} == {None}
    assert all(item.error.startswith("management API: URLError") for item in stats.values())
    _no_secret(stats)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("amqp://guest:guest@h:15672/", "its scheme must be http or https, not 'amqp'"),
        ("http:///api", "it names no host"),
        ("http://h:15672/?x=1", "it must not have a query or a fragment"),
        ("http://h:port/", "it does not parse"),
    ],
)
def test_a_management_url_that_cannot_work_is_refused_by_e015(
    url: str, problem: str, re_settings: Any
) -> None:
    assert any(found.startswith(problem) for found in url_problems(url))
    stats = queue_stats(url, "/", ["a"], timeout=2)
    assert stats["a"].error.startswith("BROKER_MANAGEMENT_URL: ")
    re_settings(BROKER_MANAGEMENT_URL=url)
    errors = [m for m in run_checks() if m.id == "reliable_events.E015"]
    assert len(errors) == 1
    assert problem in errors[0].msg


@pytest.mark.parametrize("url", [None, "http://monitor:pw@rabbit:15672/", "https://rabbit/mgmt/"])
def test_no_e015_for_none_or_a_usable_url(url: str | None, re_settings: Any) -> None:
    assert url is None or url_problems(url) == []
    re_settings(BROKER_MANAGEMENT_URL=url)
    assert [m for m in run_checks() if m.id == "reliable_events.E015"] == []


def test_e015_for_a_value_that_is_not_a_string(re_settings: Any) -> None:
    re_settings(BROKER_MANAGEMENT_URL=15672)
    errors = [m for m in run_checks() if m.id == "reliable_events.E015"]
    assert [e.msg for e in errors] == [
        "RELIABLE_EVENTS['BROKER_MANAGEMENT_URL']: it must be a URL string."
    ]


def test_w003_counts_the_management_url_password(re_settings: Any, settings: Any) -> None:
    settings.DEBUG = True
    settings.DEFAULT_EXCEPTION_REPORTER_FILTER = "django.views.debug.SafeExceptionReporterFilter"
    re_settings(BROKER_URL="memory://", BROKER_MANAGEMENT_URL="http://monitor:pw@rabbit:15672/")
    assert [m.id for m in run_checks() if m.id == "reliable_events.W003"] == [
        "reliable_events.W003"
    ]
