"""The README's demo command, from a fresh copy of the repository, bounded in time.

``scripts/demo --seconds N`` must set everything up (migrations, users), run web, relay
and consumers as separate processes, get orders through both consumers (some after
retries), leave dead letters behind, and stop every process it started: on the embedded
default (SQLite + ``db://``) and on PostgreSQL + RabbitMQ (a database and a
vhost of its own, removed afterwards).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RUN_SECONDS = 45
SKIP_DIRS = {".git", ".venv", "var", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"}


def fresh_copy(target: Path) -> Path:
    """What a clone has: tracked and untracked-but-not-ignored files (git), else the tree."""
    repo = target / "repo"
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=False,
    )
    if listed.returncode == 0 and listed.stdout:
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
class DemoRun:
    output: str
    var_dir: Path
    summary: dict[str, Any]
    elapsed: float


def run_demo(tmp_path: Path, extra_env: dict[str, str]) -> DemoRun:
    repo = fresh_copy(tmp_path)
    assert (repo / "scripts" / "demo").exists()
    var_dir = tmp_path / "var"
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DEMO_", "COVERAGE_", "DJANGO_", "RE_TEST_"))
        and key not in {"PYTHONPATH"}
    }
    # Reuse this interpreter's environment instead of downloading the requirements again.
    env.update({"VENV": sys.prefix, "DEMO_VAR_DIR": str(var_dir), **extra_env})
    started = time.monotonic()
    result = subprocess.run(
        [str(repo / "scripts" / "demo"), "--seconds", str(RUN_SECONDS), "--port", str(free_port())],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_SECONDS + 180,
        check=False,
    )
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    logs = "\n".join(
        f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}"
        for log in sorted((var_dir / "logs").glob("*.log"))
    )
    assert result.returncode == 0, output + logs
    summary = json.loads((var_dir / "summary.json").read_text())
    return DemoRun(output=output, var_dir=var_dir, summary=summary, elapsed=elapsed)


def check_run(run: DemoRun) -> None:
    """What every demo run must show, whatever it runs on."""
    assert "log in as     admin / " in run.output
    assert "/admin/reliable_events/deadletter/overview/" in run.output
    assert run.elapsed < RUN_SECONDS + 120, f"took {run.elapsed:.0f}s"
    summary = run.summary
    assert summary["killed"] == [], summary
    assert summary["exit_codes"]["consumers"] == 0
    assert summary["exit_codes"]["worker"] == 0
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
    # Nothing it started is left running (web, worker, beat, consumers).
    assert [name for name, pid in summary["pids"].items() if alive(pid)] == []
    assert processes_with_env(f"DEMO_VAR_DIR={run.var_dir}") == []


DATABASE_CHECKS = (
    "SELECT COUNT(*) FROM orders_order",
    "SELECT COUNT(*) FROM orders_order o JOIN inventory_reservation r ON r.order_id = o.id",
    "SELECT COUNT(*) FROM reliable_events_deadletter WHERE status = 'open'",
    "SELECT COUNT(*) FROM notifications_notification WHERE email LIKE '%@bounce.example'",
)


def check_database(summary: dict[str, Any], figures: list[int]) -> None:
    orders, reserved, open_letters, bounced = figures
    assert orders == reserved == summary["orders"]
    assert open_letters >= 2
    assert bounced == 0


def test_demo_on_the_embedded_default(tmp_path: Path) -> None:
    run = run_demo(tmp_path, {})
    assert "broker:   db://" in run.output
    assert "database: sqlite3" in run.output
    check_run(run)
    with sqlite3.connect(run.var_dir / "demo.sqlite3") as db:
        figures = [db.execute(query).fetchone()[0] for query in DATABASE_CHECKS]
    check_database(run.summary, figures)


def _rabbitmqctl(*args: str) -> None:
    tool = shutil.which("rabbitmqctl")
    if tool is None:
        pytest.fail("rabbitmqctl is needed to give the demo its own vhost on the test broker")
    subprocess.run([tool, "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.mark.postgres
@pytest.mark.rabbitmq
def test_demo_on_postgres_and_rabbitmq(tmp_path: Path, settings: Any) -> None:
    import psycopg
    from psycopg import sql

    suffix = uuid.uuid4().hex[:10]
    vhost, database = f"re-demo-{suffix}", f"re_demo_{suffix}"
    amqp = urlsplit(str(settings.AMQP_URL))
    broker_url = urlunsplit(amqp._replace(path="/" + quote(vhost, safe="")))
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

    _rabbitmqctl("add_vhost", vhost)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, amqp.username or "guest", ".*", ".*", ".*")
        run = run_demo(tmp_path, {**pg_env, "DEMO_BROKER_URL": broker_url})
        assert "broker:   amqp://" in run.output
        assert f"database: postgresql {database}" in run.output
        check_run(run)
        with connect(database) as conn:
            rows = [conn.execute(query).fetchone() for query in DATABASE_CHECKS]
        check_database(run.summary, [row[0] if row else -1 for row in rows])
    finally:
        _rabbitmqctl("delete_vhost", vhost)
        with connect("postgres") as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database))
            )
