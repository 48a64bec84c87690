"""Which ``Host:`` names the demo answers, for the address it is bound to.

Not ``*``: a server that answers any host name can be reached through DNS rebinding (a
web page the user visits points its own name at the demo's address, and the browser
then talks to the demo, whose admin password is printed on the terminal).  The demo
accepts the loopback names, the address it was bound to, and, when bound to every
interface (``0.0.0.0``), this machine's own names and addresses; ``DEMO_ALLOWED_HOSTS``
(comma-separated) adds more, e.g. the name of a proxy in front of it.
"""

from __future__ import annotations

import contextlib
import socket

LOOPBACK = ["localhost", "127.0.0.1", "[::1]"]
WILDCARD_BINDS = frozenset({"0.0.0.0", "::", "[::]", ""})


def machine_names() -> list[str]:
    """This machine's host name, FQDN and the addresses they and its default route use."""
    names = {socket.gethostname(), socket.getfqdn()}
    with contextlib.suppress(OSError):
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            names.add(str(info[4][0]))
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("192.0.2.1", 9))  # UDP: no packet is sent; picks the outgoing address
        names.add(str(sock.getsockname()[0]))
    return sorted(name for name in names if name and name not in WILDCARD_BINDS)


def allowed_hosts(bind: str, extra: str = "") -> list[str]:
    """``ALLOWED_HOSTS`` for a demo bound to ``bind`` (``--host``)."""
    hosts = list(LOOPBACK)
    if bind in WILDCARD_BINDS:
        # "0.0.0.0" as a destination is this machine (browsers send it as the Host).
        hosts += ["0.0.0.0", *machine_names()]
    else:
        hosts.append(f"[{bind}]" if ":" in bind and not bind.startswith("[") else bind)
    hosts += [name.strip() for name in extra.split(",") if name.strip()]
    return list(dict.fromkeys(hosts))


def local_url_host(bind: str) -> str:
    """The host the demo itself uses (and prints first) to reach a server bound to ``bind``."""
    return "127.0.0.1" if bind in WILDCARD_BINDS else bind
