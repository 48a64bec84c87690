"""Stop, restart and wait for the shared RabbitMQ and PostgreSQL (disruptive tests).

Every helper leaves the service running when it returns, or raises.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable

from django.db import connection

from tests.support.producer_support import wait_until


def _run(argv: list[str], timeout: float) -> None:
    subprocess.run(argv, check=True, timeout=timeout, capture_output=True)


def amqp_answers(url: str) -> bool:
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=0)
    except Exception:
        return False
    return True


def postgres_answers() -> bool:
    import psycopg

    params = connection.settings_dict
    try:
        with psycopg.connect(
            host=params["HOST"] or "127.0.0.1",
            port=int(params["PORT"] or 5432),
            user=params["USER"],
            password=params["PASSWORD"] or None,
            dbname=str(params["NAME"]),
            connect_timeout=2,
        ) as conn:
            conn.execute("SELECT 1")
    except Exception:
        return False
    return True


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.5) -> bool:
    """:func:`wait_until` polling every half second (services take seconds to change)."""
    return wait_until(predicate, timeout=timeout, interval=interval)


def pg_cluster() -> list[str]:
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    return ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main"]


def stop_rabbitmq() -> None:
    """Stop RabbitMQ's app: every connection closes, new ones are refused."""
    _run(["rabbitmqctl", "-q", "stop_app"], timeout=90)


def restart_rabbitmq(url: str, down_seconds: float = 2.0) -> None:
    try:
        stop_rabbitmq()
        time.sleep(down_seconds)
    finally:
        ensure_rabbitmq(url)


def ensure_rabbitmq(url: str) -> None:
    """RabbitMQ's app is running and accepts AMQP connections (or this raises)."""
    if amqp_answers(url):
        return
    _run(["rabbitmqctl", "-q", "start_app"], timeout=120)
    if not wait_for(lambda: amqp_answers(url), timeout=90):
        raise AssertionError("RabbitMQ does not accept connections after start_app")


def restart_postgres() -> None:
    try:
        _run([*pg_cluster(), "restart"], timeout=90)
    finally:
        ensure_postgres()


def ensure_postgres() -> None:
    """PostgreSQL runs and accepts connections (or this raises)."""
    if postgres_answers():
        return
    with contextlib.suppress(subprocess.CalledProcessError):  # already running: restart
        _run([*pg_cluster(), "start"], timeout=90)
    if not wait_for(postgres_answers, timeout=90):
        raise AssertionError("PostgreSQL does not accept connections after start")
