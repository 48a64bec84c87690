"""A small threaded TCP proxy for fault tests: stop it, start it again, or freeze it.

``stop()`` closes the listening socket and every connection through it, like a broker
that died (new connections are refused).  ``start()`` listens again on the same port.
``freeze()`` keeps every connection open but forwards nothing (and parks new ones), like
a broker or network that stopped answering; ``thaw()`` resumes forwarding.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from types import TracebackType


class TcpProxy:
    def __init__(self, target_host: str = "127.0.0.1", target_port: int = 5672) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.accepted = 0
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._frozen = threading.Event()
        self._peers: dict[socket.socket, socket.socket] = {}
        self._parked: list[socket.socket] = []

    # -- control -------------------------------------------------------------------
    def start(self) -> TcpProxy:
        if self._thread is not None:
            return self
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.setblocking(False)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"tcp-proxy-{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Refuse new connections and cut every open one."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping.set()
        thread.join(timeout=5)
        for sock in [*self._peers, *self._parked]:
            _close(sock)
        self._peers.clear()
        self._parked.clear()
        if self._listener is not None:
            _close(self._listener)
            self._listener = None

    def freeze(self) -> None:
        """Keep connections open but forward nothing (a hung broker or a black hole)."""
        self._frozen.set()

    def thaw(self) -> None:
        self._frozen.clear()

    @property
    def running(self) -> bool:
        return self._thread is not None

    def url(self, user: str = "guest", password: str = "guest") -> str:
        return f"amqp://{user}:{password}@127.0.0.1:{self.port}//"

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- the pump ------------------------------------------------------------------
    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, OSError):
                return
            self.accepted += 1
            if self._frozen.is_set():
                self._parked.append(client)
                continue
            self._connect(client)

    def _connect(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            _close(client)
            return
        client.setblocking(True)
        upstream.settimeout(None)
        self._peers[client] = upstream
        self._peers[upstream] = client

    def _drop(self, sock: socket.socket) -> None:
        other = self._peers.pop(sock, None)
        _close(sock)
        if other is not None:
            self._peers.pop(other, None)
            _close(other)

    def _run(self) -> None:
        assert self._listener is not None
        listener = self._listener
        while not self._stopping.is_set():
            if self._frozen.is_set():
                self._accept()
                self._stopping.wait(0.02)
                continue
            while self._parked:
                self._connect(self._parked.pop())
            try:
                readable, _, _ = select.select([listener, *self._peers], [], [], 0.05)
            except (OSError, ValueError):  # a socket closed under us: rebuild the list
                for sock in [s for s in self._peers if s.fileno() < 0]:
                    self._drop(sock)
                continue
            for sock in readable:
                if sock is listener:
                    self._accept()
                    continue
                if sock not in self._peers or self._frozen.is_set():
                    continue
                try:
                    data = sock.recv(65536)
                    if not data:
                        raise ConnectionResetError
                    self._peers[sock].sendall(data)
                except OSError:
                    self._drop(sock)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
