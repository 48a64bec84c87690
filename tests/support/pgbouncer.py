"""A private PgBouncer in transaction pooling mode in front of the test PostgreSQL.

Each test run starts its own ``pgbouncer`` process (Debian's package; ``.ci/run`` installs
it) on a free port with a configuration written into a temporary directory: no system
service, nothing shared with other runs.  :func:`route_through` points a Django
connection at it with the settings a pooled connection needs (docs/relay.md, "PostgreSQL
behind PgBouncer"); :func:`tests.support.producer_support.child_env` passes the same to
child processes.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.support.db_sessions import wait_until_alone
from tests.support.producer_support import free_port

_CONFIG = """[databases]
* = host={host} port={port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen_port}
unix_socket_dir =
auth_type = trust
auth_file = {directory}/userlist.txt
pool_mode = transaction
max_client_conn = 500
default_pool_size = {pool_size}
ignore_startup_parameters = extra_float_digits
logfile = {directory}/pgbouncer.log
pidfile = {directory}/pgbouncer.pid
admin_users = postgres
stats_users = postgres
"""


def executable() -> str | None:
    """The ``pgbouncer`` program (Debian puts it in /usr/sbin)."""
    found = shutil.which("pgbouncer")
    if found is None and os.access("/usr/sbin/pgbouncer", os.X_OK):
        found = "/usr/sbin/pgbouncer"
    return found


def available() -> bool:
    return executable() is not None


class PgBouncer:
    """One ``pgbouncer`` process; :meth:`start`, then :meth:`stop`."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 5432, pool_size: int = 10) -> None:
        self.upstream = (host, port)
        self.pool_size = pool_size
        self.port = 0
        self.directory = Path(tempfile.mkdtemp(prefix="re-pgbouncer-"))
        self.process: subprocess.Popen[str] | None = None

    def start(self, user: str = "postgres") -> PgBouncer:
        self.port = free_port()
        host, port = self.upstream
        (self.directory / "pgbouncer.ini").write_text(
            _CONFIG.format(
                host=host,
                port=port,
                listen_port=self.port,
                pool_size=self.pool_size,
                directory=self.directory,
            )
        )
        (self.directory / "userlist.txt").write_text(f'"{user}" ""\n')
        command = [executable() or "pgbouncer", str(self.directory / "pgbouncer.ini")]
        if os.geteuid() == 0:  # pgbouncer refuses to run as root
            account = pwd.getpwnam("postgres")
            os.chown(self.directory, account.pw_uid, account.pw_gid)
            for path in self.directory.iterdir():
                os.chown(path, account.pw_uid, account.pw_gid)
            command[1:1] = ["-u", "postgres"]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"pgbouncer exited: {self.log()}")
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"pgbouncer did not listen on {self.port}: {self.log()}")

    def clients(self, database: str) -> int:
        """Client connections to ``database`` through this pooler now (admin console)."""
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=self.port, user="postgres", dbname="pgbouncer", autocommit=True
        ) as admin:
            result = admin.pgconn.exec_(b"SHOW CLIENTS")  # the console speaks simple queries
            names = [result.fname(i) for i in range(result.nfields)]
            column = names.index(b"database")
            return sum(
                1
                for row in range(result.ntuples)
                if (result.get_value(row, column) or b"").decode() == database
            )

    def log(self) -> str:
        path = self.directory / "pgbouncer.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # immediate shutdown
            try:
                self.process.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.communicate()
        shutil.rmtree(self.directory, ignore_errors=True)


def pooled_settings(settings_dict: dict[str, Any], port: int) -> dict[str, Any]:
    """``settings_dict`` (a ``DATABASES`` entry) pointed at a pooler on ``port``, with
    what transaction pooling needs: no prepared statements, no server-side cursors."""
    return {
        **settings_dict,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "OPTIONS": {**settings_dict.get("OPTIONS", {}), "prepare_threshold": None},
        "DISABLE_SERVER_SIDE_CURSORS": True,
    }


@contextlib.contextmanager
def route_through(bouncer: PgBouncer, alias: str = "default") -> Iterator[None]:
    """Every connection of ``alias`` in this process goes through ``bouncer`` meanwhile
    (and the children of :func:`~tests.support.producer_support.child_env`)."""
    from django.db import connections

    connection = connections[alias]
    original = dict(connection.settings_dict)
    connection.close()
    connection.settings_dict.update(pooled_settings(original, bouncer.port))
    try:
        yield
    finally:
        connection.close()
        connection.settings_dict.clear()
        connection.settings_dict.update(original)


def wait_for_server_connections_closed(alias: str = "default", timeout: float = 10.0) -> None:
    """Wait until no other session uses ``alias``'s database (a stopped pooler's server
    connections end a moment after it), so that the test database can be dropped."""
    from django.db import connections

    with connections[alias].cursor() as cursor:
        wait_until_alone(cursor, timeout)
