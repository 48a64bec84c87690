"""Helpers of the producer-side tests: child processes on the test database, fast queue
reads with a plain AMQP client, URLs to a proxy or a closed port, and fault injection."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from django.db import connection

from reliable_events.broker import OutgoingMessage, Publisher, PublishResult
from reliable_events.broker.base import PublisherWrapper

ROOT = Path(__file__).resolve().parents[2]


# -- URLs ---------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def database_not_answering() -> Iterator[None]:
    """The default database pointed where nothing answers while the block runs (PostgreSQL:
    a port nothing listens on; SQLite: a file that cannot exist), then pointed back."""
    if connection.vendor == "sqlite" and getattr(connection, "is_in_memory_db", bool)():
        pytest.skip("an in-memory SQLite database cannot be cut off: closing it destroys it")
    saved = dict(connection.settings_dict)
    connection.close()
    if connection.vendor == "postgresql":
        connection.settings_dict["PORT"] = str(free_port())
    else:
        connection.settings_dict["NAME"] = "/nonexistent-directory/reliable_events.sqlite3"
    try:
        yield
    finally:
        connection.close()
        connection.settings_dict.update(saved)


def with_port(url: str, port: int, *, password: str | None = None) -> str:
    """``url`` pointed at ``127.0.0.1:port`` (and with ``password`` if given)."""
    parts = urlsplit(url)
    user = parts.username or "guest"
    secret = password if password is not None else (parts.password or "guest")
    return urlunsplit((parts.scheme, f"{user}:{secret}@127.0.0.1:{port}", parts.path, "", ""))


# -- child processes ----------------------------------------------------------------------
def child_env(**reliable_events: Any) -> dict[str, str]:
    """Environment of a ``manage.py`` child that sees this test's database and broker.

    ``reliable_events`` keys override the test's current ``RELIABLE_EVENTS``.
    """
    from django.conf import settings
    from django.db import connection

    env = dict(os.environ)
    env["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["RE_TEST_DATABASE"] = "sqlite" if connection.vendor == "sqlite" else "postgres"
    env["RE_TEST_PG_NAME"] = str(connection.settings_dict["NAME"])
    if connection.vendor == "postgresql":  # the same server (or pooler: tests/support/pgbouncer)
        env["RE_TEST_PG_HOST"] = str(connection.settings_dict["HOST"])
        env["RE_TEST_PG_PORT"] = str(connection.settings_dict["PORT"])
        env["RE_TEST_PG_POOLED"] = (
            "1" if connection.settings_dict.get("DISABLE_SERVER_SIDE_CURSORS") else ""
        )
    env["RE_TEST_RELIABLE_EVENTS"] = json.dumps({**settings.RELIABLE_EVENTS, **reliable_events})
    return env


class ManagedProcess(subprocess.Popen[str]):
    """A ``manage.py`` child whose stdout and stderr are read as they come.

    A daemon writes a line per run; were its pipe left unread until the end of the test,
    the pipe would fill (64 KiB) and the daemon block in a ``write`` (seen: a relay that
    stopped publishing under load).  :meth:`communicate` returns everything it wrote.
    """

    def __init__(self, argv: list[str], *, cwd: Path, env: dict[str, str]) -> None:
        super().__init__(
            argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self._out: list[str] = []
        self._err: list[str] = []
        self._readers = [
            threading.Thread(target=_pump, args=(stream, lines), daemon=True)
            for stream, lines in ((self.stdout, self._out), (self.stderr, self._err))
        ]
        for reader in self._readers:
            reader.start()

    def output(self) -> str:
        """What the child wrote to stdout so far."""
        return "".join(self._out)

    def wait_for_output(self, text: str, *, timeout: float) -> bool:
        """Whether ``text`` appears in the child's stdout within ``timeout`` seconds."""
        return wait_until(lambda: text in self.output(), timeout=timeout, interval=0.02)

    def communicate(
        self, input: str | None = None, timeout: float | None = None
    ) -> tuple[str, str]:
        if input is not None:
            raise ValueError("a ManagedProcess child reads no input")
        self.wait(timeout)
        for reader in self._readers:
            reader.join()
        return "".join(self._out), "".join(self._err)


def _pump(stream: IO[str] | None, lines: list[str]) -> None:
    if stream is None:
        return
    for line in stream:
        lines.append(line)
    stream.close()


def manage(*args: str, env: dict[str, str]) -> ManagedProcess:
    """Start ``python manage.py <args>`` in the repository root."""
    return ManagedProcess([sys.executable, str(ROOT / "manage.py"), *args], cwd=ROOT, env=env)


def stop_process(process: subprocess.Popen[str], sig: int = signal.SIGTERM) -> tuple[str, str]:
    """Send ``sig`` (if still running) and collect the output; kills after 30 s."""
    if process.poll() is None:
        process.send_signal(sig)
    try:
        return process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.communicate()


def wait_until(predicate: Callable[[], bool], *, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def lanes_by_relay() -> dict[str, int]:
    """Lanes held per live relay (its owner id) in the test database, from the lease
    tables: unexpired presence rows and the unexpired leases of each."""
    from django.db import connection

    from reliable_events.models import LaneLease, RelayPresence

    with connection.cursor() as cursor:
        cursor.execute(
            f"""SELECT p.owner, count(l.lane) FROM {RelayPresence._meta.db_table} p
            LEFT JOIN {LaneLease._meta.db_table} l ON l.owner = p.owner
                AND l.expires_at > statement_timestamp()
            WHERE p.expires_at > statement_timestamp()
            GROUP BY p.owner"""
        )
        return {str(owner): int(count) for owner, count in cursor.fetchall()}


# -- reading queues -----------------------------------------------------------------------
def drain_queue(
    channel: Any, queue: str, *, expect: int, timeout: float = 30.0, linger: float = 0.3
) -> list[Any]:
    """Consume (with manual acks) until ``expect`` messages arrived, then ``linger``
    seconds more so that duplicates are counted too.  Returns the messages in queue order."""
    messages: list[Any] = []

    def on_message(message: Any) -> None:
        messages.append(message)
        if len(messages) % 200 == 0:
            channel.basic_ack(message.delivery_tag, multiple=True)

    channel.basic_qos(0, 1000, False)
    tag = channel.basic_consume(queue, callback=on_message, no_ack=False)
    deadline = time.monotonic() + timeout
    quiet_until: float | None = None
    try:
        while True:
            now = time.monotonic()
            if len(messages) >= expect:
                quiet_until = quiet_until or now + linger
                if now >= quiet_until:
                    break
            elif now >= deadline:
                break
            before = len(messages)
            with contextlib.suppress(TimeoutError):
                channel.connection.drain_events(timeout=0.1)
            if len(messages) != before and quiet_until is not None:
                quiet_until = time.monotonic() + linger
    finally:
        channel.basic_cancel(tag)
        if messages:
            channel.basic_ack(messages[-1].delivery_tag, multiple=True)
    return messages


def message_ids(messages: Iterable[Any]) -> list[str]:
    return [str(m.properties["message_id"]) for m in messages]


# -- fault injection ----------------------------------------------------------------------
class WrappingPublisher(PublisherWrapper):
    """A publisher around a real one: everything but ``publish`` goes to ``inner``."""


class FailingPublisher(WrappingPublisher):
    """Wraps a real publisher; the messages whose id is in ``fail_ids`` fail like a
    ``basic.nack`` (they never reach the broker), the others are published for real."""

    def __init__(self, inner: Publisher, fail_ids: Iterable[str] = ()) -> None:
        super().__init__(inner)
        self.fail_ids = set(fail_ids)
        self.batches: list[list[str]] = []

    def publish(
        self, messages: Sequence[OutgoingMessage], *, timeout: float, wait: bool = True
    ) -> PublishResult:
        self.batches.append([m.message_id for m in messages])
        failing = [m for m in messages if m.message_id in self.fail_ids]
        passing = [m for m in messages if m.message_id not in self.fail_ids]
        result = self.inner.publish(passing, timeout=timeout) if passing else PublishResult()
        result.fail([m.ref for m in failing], "injected failure (like basic.nack)")
        return result


class CutAtPublisher(WrappingPublisher):
    """Wraps a real publisher; from the first message whose id is in ``cut_ids`` on, the
    batch is interrupted like a lost connection (what comes before it is published for
    real)."""

    def __init__(self, inner: Publisher, cut_ids: Iterable[str] = ()) -> None:
        super().__init__(inner)
        self.cut_ids = set(cut_ids)

    def publish(
        self, messages: Sequence[OutgoingMessage], *, timeout: float, wait: bool = True
    ) -> PublishResult:
        cut = next((i for i, m in enumerate(messages) if m.message_id in self.cut_ids), None)
        head = list(messages if cut is None else messages[:cut])
        result = self.inner.publish(head, timeout=timeout) if head else PublishResult()
        if cut is not None:
            refs: list[Hashable] = [m.ref for m in messages[cut:]]
            result.interrupt(refs, "injected connection loss")
        return result


class LateNackPublisher(FailingPublisher):
    """Like :class:`FailingPublisher`, but a failure is reported late, with the outcome of
    the next call (as a ``basic.nack`` that arrives while later batches go out)."""

    def __init__(self, inner: Publisher, fail_ids: Iterable[str] = ()) -> None:
        super().__init__(inner, fail_ids)
        self._late: list[Hashable] = []

    def publish(
        self, messages: Sequence[OutgoingMessage], *, timeout: float, wait: bool = True
    ) -> PublishResult:
        self.batches.append([m.message_id for m in messages])
        passing = [m for m in messages if m.message_id not in self.fail_ids]
        result = self.inner.publish(passing, timeout=timeout) if passing else PublishResult()
        result.fail(self._late, "injected late failure (like a late basic.nack)")
        self._late = [m.ref for m in messages if m.message_id in self.fail_ids]
        if wait:
            result.fail(self._late, "injected late failure (like a late basic.nack)")
            self._late = []
        return result

    def flush(self, *, timeout: float) -> PublishResult:
        result = self.inner.flush(timeout=timeout)
        result.fail(self._late, "injected late failure (like a late basic.nack)")
        self._late = []
        return result
