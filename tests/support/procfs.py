"""This machine's TCP sockets and the processes holding them, read from ``/proc``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TcpSocket:
    local_port: int
    remote_port: int
    established: bool
    inode: str


def tcp_sockets(pid: int | str = "self") -> Iterator[TcpSocket]:
    """The TCP sockets (IPv4 and IPv6) of the network namespace of process ``pid``."""
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                yield TcpSocket(
                    local_port=int(fields[1].rsplit(":", 1)[1], 16),
                    remote_port=int(fields[2].rsplit(":", 1)[1], 16),
                    established=fields[3] == "01",
                    inode=fields[9],
                )


def socket_inodes(pid: int | str) -> set[str]:
    """The inodes of the sockets process ``pid`` holds open."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    return inodes


def holder_of(inodes: set[str]) -> int | None:
    """The pid of a process holding one of the sockets ``inodes``."""
    if inodes:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            if socket_inodes(pid) & inodes:
                return int(pid)
    return None


def command_line(pid: int) -> str:
    """Process ``pid``'s command line, one space between its words."""
    with contextlib.suppress(OSError):
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        return " ".join(raw.replace(b"\0", b" ").decode(errors="replace").split())
    return "(gone)"
