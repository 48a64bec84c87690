"""The demo's child processes: started each in its own process group, stopped as a group.

Every child also gets SIGTERM if the supervisor dies, even by SIGKILL (Linux
``PR_SET_PDEATHSIG``), and at shutdown a child whose group outlives it (e.g. the beat
process of a Celery worker) has the rest of its group killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

STOP_GRACE = 20.0
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the child gets SIGTERM if the supervisor dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


@dataclass
class Child:
    name: str
    argv: list[str]
    log: Path
    process: subprocess.Popen[bytes] | None = None
    exit_code: int | None = None
    killed: bool = False
    #: Processes of its group still running after it exited (killed then).
    stragglers: bool = False

    def start(self, env: dict[str, str], cwd: Path) -> None:
        handle = self.log.open("ab")
        try:
            self.process = subprocess.Popen(
                self.argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: we stop the whole group
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        finally:
            handle.close()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def group_members(pgid: int) -> list[int] | None:
    """Live (non-zombie) processes of group ``pgid`` from /proc; ``None`` without /proc."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        return None
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may contain spaces, so split after ")".
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def group_empty(pgid: int, *, wait: float) -> bool:
    """Whether process group ``pgid`` has no live process left, waiting up to ``wait`` s."""
    deadline = time.monotonic() + wait
    while True:
        members = group_members(pgid)
        if members is None:  # no /proc: ask the kernel (zombies count as members there)
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
        elif not members:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def stop_children(children: list[Child], grace: float = STOP_GRACE) -> bool:
    """SIGTERM every process group, wait, SIGKILL what is left; True if none was killed."""
    started = [c for c in children if c.process is not None]
    for child in started:
        if child.alive():
            # The leader first: it stops its own children (e.g. Celery's beat) its way.
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in started:
        assert child.process is not None
        try:
            child.exit_code = child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.signal_group(signal.SIGKILL)
            child.killed = True
            child.exit_code = child.process.wait()
        # Grandchildren (e.g. the beat process of the Celery worker) share the group:
        # give them a moment to follow their parent, then kill what is left.
        if not group_empty(child.pid, wait=5.0):
            child.stragglers = True
            child.signal_group(signal.SIGKILL)
    return not any(c.killed or c.stragglers for c in started)
