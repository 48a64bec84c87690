"""RabbitMQ's management API client (``reliable_events.broker.management``), against a
stub HTTP server: what it asks, what it makes of each answer, and that no answer shows
the password."""

from __future__ import annotations

import base64
import json
import re
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import pytest
from django.core.checks import run_checks

from reliable_events.broker.management import queue_stats, url_problems, vhost_of

PASSWORD = "s3cr%2Fet"  # percent-encoded in the URL; "s3cr/et" decoded
SECRETS = ("s3cr%2Fet", "s3cr/et", "s3cr")


class Stub:
    """A management API that answers ``GET /api/queues/<vhost>`` as RabbitMQ does:
    paginated, filtered by ``name`` (a regex matched caselessly, anywhere in the name,
    with ``use_regex=true``), with the ``columns`` asked for.  ``queues`` maps a vhost to
    its queues' objects; ``answers`` maps a path to ``(status, body)`` answered instead
    (an error, a broken body)."""

    def __init__(self) -> None:
        self.queues: dict[str, dict[str, dict[str, Any]]] = {}
        self.answers: dict[str, tuple[int, Any]] = {}
        self.requests: list[tuple[str, dict[str, str], str]] = []  # path, query, auth
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                split = urlsplit(self.path)
                query = dict(parse_qsl(split.query))
                auth = self.headers.get("Authorization", "")
                stub.requests.append((split.path, query, auth))
                status, body = stub.answers.get(split.path) or stub.listing(split.path, query)
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

    def listing(self, path: str, query: dict[str, str]) -> tuple[int, Any]:
        prefix, _, vhost = path.rpartition("/")
        if not prefix.endswith("/api/queues") or unquote(vhost) not in self.queues:
            return 404, {"error": "Object Not Found", "reason": "Not Found"}
        queues = sorted(self.queues[unquote(vhost)].items())
        if query.get("use_regex") == "true" and "name" in query:
            pattern = re.compile(query["name"], re.IGNORECASE)
            queues = [(name, item) for name, item in queues if pattern.search(name)]
        columns = query.get("columns", "").split(",")
        page, size = int(query.get("page", 1)), int(query.get("page_size", 100))
        items = [
            {key: value for key, value in {"name": name, **item}.items() if key in columns}
            for name, item in queues[(page - 1) * size : page * size]
        ]
        return 200, {"items": items, "page": page, "page_count": -(-len(queues) // size) or 1}

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


def test_the_unacked_counts_are_read_in_one_request_with_the_decoded_credentials(
    stub: Stub,
) -> None:
    stub.queues["prod"] = {
        "orders.billing": {"messages_unacknowledged": 3, "messages": 9},
        "mail": {"messages_unacknowledged": 0},
        "orders_billing": {"messages_unacknowledged": 5},  # "." of the regex is literal
        "Mail": {"messages_unacknowledged": 8},  # matched caselessly: not ours
        "other": {"messages_unacknowledged": 1},
    }
    stats = queue_stats(stub.url(), "prod", ["orders.billing", "mail"], timeout=2)
    assert {name: (item.unacked, item.error) for name, item in stats.items()} == {
        "orders.billing": (3, ""),
        "mail": (0, ""),
    }
    assert len(stub.requests) == 1
    path, query, auth = stub.requests[0]
    assert path == "/api/queues/prod"
    assert query["columns"] == "name,messages_unacknowledged"
    assert query["name"] == r"^(orders\.billing|mail)$"
    assert auth == "Basic " + base64.b64encode(b"monitor:s3cr/et").decode()


def test_many_queues_take_a_few_requests_and_every_page(stub: Stub) -> None:
    names = [f"q{n}" for n in range(1200)]
    stub.queues["/"] = {name: {"messages_unacknowledged": n} for n, name in enumerate(names)}
    stub.queues["/"].update({name.upper(): {"messages_unacknowledged": -1} for name in names})
    stats = queue_stats(stub.url(), "/", names, timeout=2)
    assert {name: item.unacked for name, item in stats.items()} == {
        name: n for n, name in enumerate(names)
    }
    assert all(len(path) + len(urlencode(query)) < 4000 for path, query, _ in stub.requests)
    groups = {query["name"] for _, query, _ in stub.requests}
    assert len(groups) == 3
    # "Q1" matches "^(q1|...)$" too: each group's answer takes two pages
    assert sorted(query["page"] for _, query, _ in stub.requests) == ["1"] * 3 + ["2"] * 3


def test_a_vhost_and_a_path_prefix_are_kept_in_the_address(stub: Stub) -> None:
    stub.queues["/"] = {"q/1": {"messages_unacknowledged": 7}}
    stats = queue_stats(stub.url("/rabbit/"), "/", ["q/1"], timeout=2)
    assert stats["q/1"].unacked == 7
    assert stats["q/1"].error == ""
    assert [path for path, _, _ in stub.requests] == ["/rabbit/api/queues/%2F"]


def test_a_missing_queue_or_one_not_counted_yet_is_unknown_with_the_reason(stub: Stub) -> None:
    stub.queues["/"] = {"fresh": {}, "odd": {"messages_unacknowledged": True}}
    stats = queue_stats(stub.url(), "/", ["gone", "fresh", "odd"], timeout=2)
    assert stats["gone"].unacked is None
    assert stats["gone"].error == "no such queue"
    assert stats["fresh"].unacked is None
    assert stats["fresh"].error == "not counted by the broker yet"
    assert stats["odd"].unacked is None


def test_an_unknown_vhost_is_shown_for_every_queue(stub: Stub) -> None:
    stats = queue_stats(stub.url(), "nosuch", ["a", "b"], timeout=2)
    assert {item.error for item in stats.values()} == {
        "management API: HTTP 404 Not Found (is the virtual host, or the URL's path, right?)"
    }


def test_a_refusal_is_asked_once_and_shown_for_every_queue_without_the_password(
    stub: Stub,
) -> None:
    stub.answers["/api/queues/%2F"] = (401, {"error": "not_authorised"})
    names = [f"queue-{n:04d}-{'x' * 40}" for n in range(300)]  # more than one group
    stats = queue_stats(stub.url(), "/", names, timeout=2)
    assert len(stub.requests) == 1
    assert {item.unacked for item in stats.values()} == {None}
    assert {item.error for item in stats.values()} == {"management API: HTTP 401 Unauthorized"}
    _no_secret(stats)


def test_a_body_that_is_not_json_is_an_error_not_a_crash(stub: Stub) -> None:
    stub.answers["/api/queues/%2F"] = (200, b"<html>proxy login</html>")
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
