"""The demo's safety settings, its accepted hosts and its seeding verdict (fast; the
running demo is tested in ``tests/acceptance/test_demo.py``)."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from demo_project import supervisor
from demo_project.hosts import allowed_hosts, local_url_host, machine_names

ROOT = Path(__file__).resolve().parents[2]
CANARY = "Zk4-demo-canary-pw"

#: Run under the demo's own settings, in a child process: the settings it reports, the
#: system check ids, and what a request with a bad Host header gets back.
PROBE = """
import json, django
from django.conf import settings
django.setup()
from django.core.checks import run_checks
from django.test import Client
response = Client(raise_request_exception=False).get("/admin/login/", HTTP_HOST="evil.example")
print(json.dumps({
    "debug": settings.DEBUG,
    "middleware": settings.MIDDLEWARE,
    "x_frame_options": settings.X_FRAME_OPTIONS,
    "filter": settings.DEFAULT_EXCEPTION_REPORTER_FILTER,
    "secret_key": settings.SECRET_KEY,
    "allowed_hosts": settings.ALLOWED_HOSTS,
    "checks": [m.id for m in run_checks()],
    "status": response.status_code,
    "page": response.content.decode(),
}))
"""


def probe_demo_settings(tmp_path: Path, **env: str) -> dict[str, Any]:
    environ = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DEMO_", "DJANGO_", "RE_TEST_"))
    }
    environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "demo_project.settings",
            "DEMO_VAR_DIR": str(tmp_path / "var"),
            "PYTHONPATH": str(ROOT),
            **env,
        }
    )
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return data


def test_the_demo_is_safe_by_default(tmp_path):
    data = probe_demo_settings(tmp_path, DEMO_BROKER_URL=f"amqp://demo:{CANARY}@127.0.0.1:1//")
    assert data["debug"] is False
    assert "django.middleware.clickjacking.XFrameOptionsMiddleware" in data["middleware"]
    assert "django.middleware.security.SecurityMiddleware" in data["middleware"]
    assert data["x_frame_options"] == "DENY"
    assert data["filter"] == "reliable_events.debug.SafeExceptionReporterFilter"
    assert data["secret_key"] != "demo-only-not-secret"
    assert len(data["secret_key"]) >= 50
    assert data["allowed_hosts"] == ["localhost", "127.0.0.1", "[::1]"]
    assert data["status"] == 400
    assert CANARY not in data["page"]
    assert "DisallowedHost" not in data["page"]  # no debug page at all
    # The key is kept: every process of one demo shares it, a new var dir gets another.
    again = probe_demo_settings(tmp_path)
    assert again["secret_key"] == data["secret_key"]
    other = tmp_path / "other"
    other.mkdir()
    assert probe_demo_settings(other)["secret_key"] != data["secret_key"]


def test_debug_opt_in_masks_the_broker_password(tmp_path):
    data = probe_demo_settings(
        tmp_path, DJANGO_DEBUG="1", DEMO_BROKER_URL=f"amqp://demo:{CANARY}@127.0.0.1:1//"
    )
    assert data["debug"] is True
    assert data["status"] == 400
    page = data["page"]
    assert "DisallowedHost" in page  # Django's debug page, settings and environment
    assert "amqp://demo:***@127.0.0.1:1//" in page
    assert CANARY not in page
    assert "reliable_events.W003" not in data["checks"]


def test_allowed_hosts_follow_the_bind_address():
    assert allowed_hosts("127.0.0.1") == ["localhost", "127.0.0.1", "[::1]"]
    assert allowed_hosts("192.168.7.9") == ["localhost", "127.0.0.1", "[::1]", "192.168.7.9"]
    assert allowed_hosts("::1", "demo.example, other.example") == [
        "localhost",
        "127.0.0.1",
        "[::1]",
        "demo.example",
        "other.example",
    ]
    everywhere = allowed_hosts("0.0.0.0")
    assert "*" not in everywhere
    assert everywhere[:4] == ["localhost", "127.0.0.1", "[::1]", "0.0.0.0"]
    assert socket.gethostname() in everywhere
    assert set(machine_names()) <= set(everywhere)
    assert local_url_host("0.0.0.0") == "127.0.0.1"
    assert local_url_host("192.168.7.9") == "192.168.7.9"


class RefusingHandler(http.server.BaseHTTPRequestHandler):
    """What the web process answered for every request of ``--host 0.0.0.0`` before."""

    def do_GET(self) -> None:
        self.send_response(400)
        self.end_headers()
        self.wfile.write(b"Bad Request (400)")

    do_POST = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def refusing_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RefusingHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_seeding_that_places_nothing_is_a_failure(refusing_server):
    seeder = supervisor.Seeder(refusing_server, "pw")
    assert supervisor.seed(seeder, 5) == supervisor.EXIT_SEED_FAILED
    assert seeder.placed == 0
    assert "400" in seeder.errors[0]
