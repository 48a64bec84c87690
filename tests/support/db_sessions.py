"""Other sessions on the test database: waited for, named, ended.

The test database can only be dropped once no other session uses it.  A session left by
a child process (a relay, a consumer, a pooler's server connection) would make Django's
teardown fail with "is being accessed by other users", which pytest-django turns into a
warning and a database left behind.  :func:`end_lingering_sessions` runs before that
teardown (``tests/conftest.py``): it waits for such sessions to end on their own, and
names and ends those that do not, so that the leak shows as a warning that says whose
session it was.
"""

from __future__ import annotations

import time
from typing import Any

from tests.support.procfs import command_line, holder_of, tcp_sockets

_OTHERS = (
    "SELECT pid, application_name, client_port, state, backend_start, left(query, 80)"
    " FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
)


def other_sessions(cursor: Any) -> list[tuple[Any, ...]]:
    """The other sessions on ``cursor``'s database (a row of :data:`_OTHERS` each)."""
    cursor.execute(_OTHERS)
    return list(cursor.fetchall())


def wait_until_alone(cursor: Any, timeout: float) -> list[tuple[Any, ...]]:
    """Wait up to ``timeout`` s for the other sessions on ``cursor``'s database to end;
    those still there."""
    deadline = time.monotonic() + timeout
    while (others := other_sessions(cursor)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return others


def client_process(port: int | None) -> str:
    """The command line of this machine's process holding the TCP socket of local port
    ``port`` (``/proc``), or why it is not known."""
    if port is None or port < 0:
        return "a Unix-socket client"
    pid = holder_of({s.inode for s in tcp_sockets() if s.local_port == port})
    if pid is None:
        return f"no process here holds port {port} (gone, or outside this machine's view)"
    return f"pid {pid}: {command_line(pid)[:200]}"


def end_lingering_sessions(cursor: Any, timeout: float = 15.0) -> list[str]:
    """Wait up to ``timeout`` s for the other sessions on ``cursor``'s database to end,
    then end the rest (``pg_terminate_backend``, waiting up to 5 s for each to exit: it
    only signals the backend); a description of each one ended."""
    described = []
    for pid, application, port, state, started, query in wait_until_alone(cursor, timeout):
        described.append(
            f"backend {pid} ({application or 'no application_name'}, {state}, since "
            f"{started:%H:%M:%S}, last query {query!r}) of {client_process(port)}"
        )
        cursor.execute("SELECT pg_terminate_backend(%s, 5000)", [pid])
    return described
