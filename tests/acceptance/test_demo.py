"""The README's demo command, from a fresh copy of the repository, bounded in time.

``scripts/demo --seconds N`` must set everything up (migrations, users), run web, relay
and consumers as separate processes, get orders through both consumers (some after
retries), leave dead letters behind, and stop every process it started: on the embedded
default (SQLite + ``db://``, relayed by the ``relay_outbox`` daemon, no Celery and no
kombu ``filesystem://``; at least 300 events, bound to ``0.0.0.0``) and on PostgreSQL +
RabbitMQ (a database of its own, removed afterwards, and a private RabbitMQ node with a
vhost and a user of its own; with ``DJANGO_DEBUG=1``; relayed by a Celery worker with
beat).  While it runs, a request with a
bad ``Host:`` header must get a 400 without any password in it, and every order must
end with its reservation and either a notification or a dead letter.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.support import rabbit_node
from tests.support.optional import needs_beat

pytestmark = [pytest.mark.slow, pytest.mark.demo]

ROOT = Path(__file__).resolve().parents[2]
RUN_SECONDS = 45
#: The embedded run: 300 orders at once, then one every 0.5 s (each order is an event for
#: two consumers), for this long once seeded.
EMBEDDED_SECONDS = 60
EMBEDDED_ORDERS = 300
SKIP_DIRS = {".git", ".venv", "var", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"}


def fresh_copy(target: Path) -> Path:
    """What a clone has: tracked and untracked-but-not-ignored files (git), else the tree."""
    repo = target / "repo"
    git = shutil.which("git")  # none in the Django 6 lanes' trixie root
    listed = (
        subprocess.run(
            [git, "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=False,
        )
        if git
        else None
    )
    if listed is not None and listed.returncode == 0 and listed.stdout:
        for name in filter(None, listed.stdout.decode().split("\0")):
            source = ROOT / name
            if source.is_file():
                (repo / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, repo / name)
    else:
        shutil.copytree(ROOT, repo, ignore=lambda d, names: [n for n in names if n in SKIP_DIRS])
    return repo


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def processes_with_env(text: str) -> list[str]:
    """Live processes whose environment mentions ``text`` (the demo's var dir)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text.encode() in environ:
            found.append(f"{proc.name}: {cmdline}")
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: str


def http_get(port: int, host: str | None = None, path: str = "/admin/login/") -> Answer:
    """``curl [-H 'Host: <host>'] http://127.0.0.1:<port><path>``."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if host is not None:
        request.add_header("Host", host)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return Answer(response.status, dict(response.headers), response.read().decode())
    except urllib.error.HTTPError as exc:
        return Answer(exc.code, dict(exc.headers), exc.read().decode(errors="replace"))


@dataclass
class Probe:
    """Requests made against the running demo, from a thread of the test."""

    port: int
    check: Callable[[int], dict[str, Answer]]
    answers: dict[str, Answer] = field(default_factory=dict)
    error: str = ""

    def run(self, process: subprocess.Popen[str]) -> None:
        deadline = time.monotonic() + 150
        while process.poll() is None and time.monotonic() < deadline:
            try:
                if http_get(self.port).status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            self.error = "the demo's web server never answered"
            return
        try:
            self.answers = self.check(self.port)
        except Exception as exc:  # reported by the test
            self.error = f"{type(exc).__name__}: {exc}"


@dataclass
class DemoRun:
    output: str
    var_dir: Path
    summary: dict[str, Any]
    elapsed: float
    answers: dict[str, Answer]
    seconds: int


def run_demo(
    tmp_path: Path,
    extra_env: dict[str, str],
    *,
    args: tuple[str, ...] = (),
    seconds: int = RUN_SECONDS,
    check: Callable[[int], dict[str, Answer]] | None = None,
) -> DemoRun:
    repo = fresh_copy(tmp_path)
    assert (repo / "scripts" / "demo").exists()
    var_dir = tmp_path / "var"
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DEMO_", "COVERAGE_", "DJANGO_", "RE_TEST_"))
        and key not in {"PYTHONPATH"}
    }
    # This interpreter's environment as it is: no download, and on a lane without the
    # `beat` extra (Django 6.1) no install of requirements.txt that would move its Django.
    env.update({"VENV": sys.prefix, "DEMO_INSTALL": "0", "DEMO_VAR_DIR": str(var_dir), **extra_env})
    port = free_port()
    started = time.monotonic()
    process = subprocess.Popen(
        [str(repo / "scripts" / "demo"), "--seconds", str(seconds), "--port", str(port), *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    probe = Probe(port, check or (lambda port: {}))
    prober = threading.Thread(target=probe.run, args=(process,), daemon=True)
    prober.start()
    try:
        output, _ = process.communicate(timeout=seconds + 180)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    prober.join(30)
    elapsed = time.monotonic() - started
    logs = "\n".join(
        f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}"
        for log in sorted((var_dir / "logs").glob("*.log"))
    )
    assert process.returncode == 0, output + logs
    assert probe.error == "", probe.error + "\n" + output
    summary = json.loads((var_dir / "summary.json").read_text())
    return DemoRun(
        output=output,
        var_dir=var_dir,
        summary=summary,
        elapsed=elapsed,
        answers=probe.answers,
        seconds=seconds,
    )


def safety_requests(*, good_host: str | None = None) -> Callable[[int], dict[str, Answer]]:
    """A bad ``Host:`` header (what gave away the broker password on the debug page), the
    login page's security headers, and a host the demo printed."""

    def check(port: int) -> dict[str, Answer]:
        answers = {"evil": http_get(port, "evil.example"), "login": http_get(port)}
        if good_host is not None:
            answers["good_host"] = http_get(port, f"{good_host}:{port}")
        return answers

    return check


def check_safety(run: DemoRun, password: str) -> None:
    evil, login = run.answers["evil"], run.answers["login"]
    assert evil.status == 400
    assert password not in evil.body
    assert login.status == 200
    assert login.headers.get("X-Frame-Options") == "DENY"
    assert login.headers.get("X-Content-Type-Options") == "nosniff"
    assert password not in run.output


def check_run(run: DemoRun, relay: str) -> None:
    """What every demo run must show, whatever it runs on; ``relay`` is the name of the
    relay's process (``relay``: the ``relay_outbox`` daemon, ``worker``: Celery)."""
    assert "log in as     admin / " in run.output
    assert "/admin/reliable_events/deadletter/overview/" in run.output
    assert run.elapsed < run.seconds + 120, f"took {run.elapsed:.0f}s"
    summary = run.summary
    assert summary["killed"] == [], summary
    assert summary["relay"] == relay
    # Each child ended on the supervisor's SIGTERM, none had to be killed: the relay and the
    # consumers stop by themselves (exit 0); runserver has no handler, the signal ends it.
    assert summary["exit_codes"] == {"web": -signal.SIGTERM, relay: 0, "consumers": 0}, summary
    assert summary["seed_errors"] == []
    # Every order reached inventory; notifications too, except the failing domains.
    assert summary["orders"] >= 24
    assert summary["orders_without_reservation"] == 0, summary
    assert summary["processed"]["inventory.reserve-stock"] == summary["orders"]
    assert summary["notifications_after_retries"] >= 1  # flaky.example: retried, then sent
    assert summary["processed"]["notifications.send-confirmation"] == summary["notifications"]
    assert summary["dead_letters_open"]["notifications.send-confirmation"] >= 2
    assert summary["dead_letters_by_reason"].get("permanent-error", 0) >= 1  # bounce.example
    assert summary["dead_letters_by_reason"].get("retries-exhausted", 0) >= 1  # down.example
    assert summary["outbox"]["dead"] == 0
    assert summary["outbox"]["pending"] == 0
    assert summary["outbox"]["sent"] >= summary["orders"]  # one orders.created each
    # Nothing it started is left running (web, relay or worker and beat, consumers).
    assert [name for name, pid in summary["pids"].items() if alive(pid)] == []
    assert processes_with_env(f"DEMO_VAR_DIR={run.var_dir}") == []


#: Orders whose notification neither was sent nor is a dead letter of that consumer
#: (``{order_id}`` is the dialect's expression for the dead letter's payload order id).
_UNACCOUNTED = (
    "SELECT COUNT(*) FROM orders_order o WHERE NOT EXISTS "
    "(SELECT 1 FROM notifications_notification n WHERE n.order_id = o.id) AND NOT EXISTS "
    "(SELECT 1 FROM reliable_events_deadletter d WHERE "
    "d.consumer = 'notifications.send-confirmation' AND {order_id} = o.id)"
)


def database_checks(order_id: str) -> tuple[str, ...]:
    return (
        "SELECT COUNT(*) FROM orders_order",
        "SELECT COUNT(*) FROM orders_order o JOIN inventory_reservation r ON r.order_id = o.id",
        "SELECT COUNT(*) FROM reliable_events_deadletter WHERE status = 'open'",
        "SELECT COUNT(*) FROM notifications_notification WHERE email LIKE '%@bounce.example'",
        _UNACCOUNTED.format(order_id=order_id),
        "SELECT COUNT(*) FROM reliable_events_deadletter WHERE reason = 'undecodable'",
    )


SQLITE_CHECKS = database_checks("CAST(json_extract(d.payload, '$.order_id') AS INTEGER)")
POSTGRES_CHECKS = database_checks("(d.payload->>'order_id')::bigint")


def check_database(summary: dict[str, Any], figures: list[int]) -> None:
    orders, reserved, open_letters, bounced, unaccounted, undecodable = figures
    assert orders == reserved == summary["orders"]  # every order has its reservation
    assert open_letters >= 2
    assert bounced == 0
    assert unaccounted == 0  # ... and a notification or a dead letter
    assert undecodable == 0  # no message was mangled on its way


def test_demo_on_the_embedded_default(tmp_path: Path) -> None:
    """The documented ``--host 0.0.0.0``, with a password in the environment that must
    show nowhere."""
    canary = secrets.token_urlsafe(12)
    run = run_demo(
        tmp_path,
        {"DEMO_CANARY_URL": f"amqp://demo:{canary}@127.0.0.1:1//"},
        args=("--host", "0.0.0.0", "--orders", str(EMBEDDED_ORDERS), "--trickle", "0.5"),
        seconds=EMBEDDED_SECONDS,
        check=safety_requests(good_host=socket.gethostname()),
    )
    assert "broker:   db://" in run.output
    assert "database: sqlite3" in run.output
    assert "relay:    relay_outbox daemon" in run.output
    assert "celery" not in (run.var_dir / "logs" / "relay.log").read_text().lower()
    assert not (run.var_dir / "logs" / "worker.log").exists()  # no Celery worker ran
    assert not (run.var_dir / "broker").exists()  # nor anything on kombu's filesystem://
    assert "http://127.0.0.1:" in run.output  # printed: a URL that works locally
    assert f"placed {EMBEDDED_ORDERS} orders through the API (0 errors)" in run.output
    check_run(run, "relay")
    check_safety(run, canary)
    assert "DisallowedHost" not in run.answers["evil"].body  # DEBUG is off by default
    assert run.answers["good_host"].status == 200  # the machine's name, printed as well
    assert run.summary["orders"] >= EMBEDDED_ORDERS  # >= 300 events through the default
    with sqlite3.connect(run.var_dir / "demo.sqlite3") as db:
        figures = [db.execute(query).fetchone()[0] for query in SQLITE_CHECKS]
    check_database(run.summary, figures)


@pytest.mark.postgres
@pytest.mark.rabbitmq
@needs_beat  # the demo's relay on RabbitMQ is Celery beat on the DatabaseScheduler
@pytest.mark.skipif(not rabbit_node.available(), reason="RabbitMQ server scripts not installed")
def test_demo_on_postgres_and_rabbitmq(tmp_path: Path, settings: Any) -> None:
    import psycopg
    from psycopg import sql

    suffix = uuid.uuid4().hex[:10]
    vhost, database = f"re-demo-{suffix}", f"re_demo_{suffix}"
    # A broker user of its own, so that the password the page must not show is known.
    user, password = f"re-demo-{suffix}", secrets.token_urlsafe(12)
    pg = settings.DATABASES["default"]
    pg_env = {
        "DEMO_PG_NAME": database,
        "DEMO_PG_HOST": str(pg["HOST"]),
        "DEMO_PG_PORT": str(pg["PORT"]),
        "DEMO_PG_USER": str(pg["USER"]),
        "DEMO_PG_PASSWORD": str(pg["PASSWORD"]),
    }

    def connect(dbname: str) -> psycopg.Connection[Any]:
        return psycopg.connect(
            host=pg_env["DEMO_PG_HOST"],
            port=pg_env["DEMO_PG_PORT"],
            user=pg_env["DEMO_PG_USER"],
            password=pg_env["DEMO_PG_PASSWORD"],
            dbname=dbname,
            autocommit=True,
        )

    # A private RabbitMQ node (tests/support/rabbit_node.py) with the vhost and user, made
    # by its own rabbitmqctl: in every lane (the Django 6 lanes' root cannot administer the
    # shared node), and gone with it.
    with rabbit_node.private_rabbit_node() as broker:
        broker_url = f"amqp://{user}:{password}@127.0.0.1:{broker.port}/{quote(vhost, safe='')}"
        broker.ctl("add_vhost", vhost)
        broker.ctl("add_user", user, password)
        broker.ctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        try:
            run = run_demo(
                tmp_path,
                # DEBUG on (opt-in): the debug page lists the settings, masked by the filter.
                {**pg_env, "DEMO_BROKER_URL": broker_url, "DJANGO_DEBUG": "1"},
                check=safety_requests(),
            )
            assert "broker:   amqp://" in run.output
            assert f"database: postgresql {database}" in run.output
            assert "relay:    Celery worker with beat" in run.output
            assert "relay_outbox" in (run.var_dir / "logs" / "worker.log").read_text()
            check_run(run, "worker")
            check_safety(run, password)
            evil = run.answers["evil"].body
            assert "DisallowedHost" in evil  # Django's debug page, with settings and environment
            assert f"amqp://{user}:***@" in evil  # BROKER_URL and friends, masked
            with connect(database) as conn:
                rows = [conn.execute(query).fetchone() for query in POSTGRES_CHECKS]
            check_database(run.summary, [row[0] if row else -1 for row in rows])
        finally:
            with connect("postgres") as conn:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(database)
                    )
                )
