"""A private RabbitMQ node for fault tests: start, SIGKILL its Erlang VM, restart, stop.

Fault tests must not touch the shared broker on 5672 (other work uses it).  This starts
an extra node on this machine beside it, as RabbitMQ's "several nodes on one host" guide
describes: its own node name (``re-fault-<random>@localhost``), AMQP port, distribution
port, Erlang cookie (``HOME`` is a temporary directory) and data/log directories, and
its own empty ``rabbitmq-env.conf`` / ``rabbitmq.conf`` / enabled-plugins file, so the
machine's configuration (which names the shared node and its port) is never read.

``RabbitNode(...).start()`` waits until the node answers AMQP.  ``kill()`` sends SIGKILL
to the node's Erlang VM (``beam.smp``; its pid from the node's pid file, checked against
``/proc``): no shutdown, connections just die, like a crashed host.  ``restart()`` starts
it again on the same data directory, so durable queues and persistent messages survive.
``stop()`` shuts it down (SIGTERM, then SIGKILL after a timeout) and removes the
directory; :func:`private_rabbit_node` is a context manager that always does so.

:class:`RabbitCluster` starts three such nodes with one shared Erlang cookie and joins
them into one cluster (``stop_app``/``join_cluster``/``start_app``), each on its own
ports: ``kill(i)`` SIGKILLs one node's VM, ``freeze(i)``/``thaw(i)`` send it
SIGSTOP/SIGCONT, ``restart(i)`` starts it again (it rejoins from its data directory),
``leader(queue)`` names the node leading a quorum queue.  ``scripts/rabbit-cluster``
starts one by hand; the ``rabbit_cluster`` fixture (``tests/conftest.py``) once per
test session.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

RABBITMQ_BIN = Path(os.environ.get("RE_TEST_RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))
#: Ports of the shared node (AMQP, management, distribution, its CLI tools' range):
#: never used by a private node.
SHARED_PORTS = frozenset({5672, 15672, 25672, *range(35672, 35683)})
#: Private nodes still running (stopped at exit even if a test run is interrupted).
_RUNNING: set[RabbitNode] = set()


def _free_port(exclude: set[int]) -> int:
    """A TCP port nothing listens on (and not in ``exclude`` or the shared node's)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        # below 45000: the node's CLI tools use its distribution port + 10000 and up
        if port not in exclude and port not in SHARED_PORTS and port < 45000:
            return port


@atexit.register
def _stop_all() -> None:
    for node in list(_RUNNING):
        node.stop()


def available() -> bool:
    """Whether this machine can run a private node (RabbitMQ's scripts are installed)."""
    return (RABBITMQ_BIN / "rabbitmq-server").exists() and shutil.which("erl") is not None


class RabbitNodeError(RuntimeError):
    pass


class RabbitNode:
    """One private RabbitMQ node.  Not the shared one: its ports are picked free."""

    def __init__(
        self,
        *,
        name: str | None = None,
        base_dir: Path | None = None,
        cookie: str | None = None,
        start_timeout: float = 90.0,
        management: bool = False,
    ) -> None:
        self.short_name = name or f"re-fault-{secrets.token_hex(4)}"
        self.nodename = f"{self.short_name}@localhost"
        self._own_dir = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix=f"{self.short_name}-"))
        self.cookie = cookie or secrets.token_hex(16)
        self.start_timeout = start_timeout
        self.port = _free_port(set())
        self.dist_port = _free_port({self.port})
        #: The management plugin's HTTP port (``management=True``), else ``None``.
        self.management_port = _free_port({self.port, self.dist_port}) if management else None
        self.process: subprocess.Popen[bytes] | None = None
        self._prepare()

    # -- files and environment ---------------------------------------------------------
    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    @property
    def management_url(self) -> str:
        """The management API (``management=True``), as ``BROKER_MANAGEMENT_URL``."""
        if self.management_port is None:
            raise RabbitNodeError(f"node {self.nodename} runs without the management plugin")
        return f"http://guest:guest@127.0.0.1:{self.management_port}/"

    @property
    def pid_file(self) -> Path:
        return self.base_dir / "node.pid"

    @property
    def log_dir(self) -> Path:
        return self.base_dir / "log"

    def _prepare(self) -> None:
        (self.base_dir / "mnesia").mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        cookie = self.base_dir / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(self.cookie)
            cookie.chmod(0o400)
        (self.base_dir / "rabbitmq-env.conf").write_text("# private test node: no settings\n")
        (self.base_dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
            "loopback_users.guest = true\n"
            # keep the alarms out of the tests' way on a busy machine
            "disk_free_limit.absolute = 50MB\n"
            "vm_memory_high_watermark.relative = 0.6\n"
            + (
                f"management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {self.management_port}\n"
                # the queues' figures refreshed every 0.5 s, not 5 s
                "collect_statistics_interval = 500\n"
                if self.management_port is not None
                else ""
            )
        )
        plugins = "rabbitmq_management" if self.management_port is not None else ""
        (self.base_dir / "enabled_plugins").write_text(f"[{plugins}].\n")
        # docs/cluster.md, "Broker settings": a retry whose hop from its delay queue meets a
        # failing queue leader is sent again after 10 s, not the broker's 180 s (older
        # RabbitMQ versions read the key without "_ms", newer ones with it).
        (self.base_dir / "advanced.config").write_text(
            "[{rabbit, [{dead_letter_worker_publisher_confirm_timeout, 10000},\n"
            "           {dead_letter_worker_publisher_confirm_timeout_ms, 10000}]}].\n"
        )

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            {
                "HOME": str(self.base_dir),  # the Erlang cookie of this node (and its CLI)
                "RABBITMQ_NODENAME": self.nodename,
                "RABBITMQ_USE_LONGNAME": "false",
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODE_PORT": str(self.port),
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_CONF_ENV_FILE": str(self.base_dir / "rabbitmq-env.conf"),
                "RABBITMQ_CONFIG_FILE": str(self.base_dir / "rabbitmq.conf"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.base_dir / "advanced.config"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base_dir / "enabled_plugins"),
                "RABBITMQ_MNESIA_BASE": str(self.base_dir / "mnesia"),
                "RABBITMQ_LOG_BASE": str(self.log_dir),
                "RABBITMQ_PID_FILE": str(self.pid_file),
                "RABBITMQ_ALLOW_INPUT": "",
                "ERL_EPMD_ADDRESS": "127.0.0.1",
            }
        )
        return env

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> RabbitNode:
        """Start the node and wait until it accepts AMQP connections."""
        if self.running:
            return self
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()
        _RUNNING.add(self)
        output = open(self.log_dir / "console.log", "ab")  # noqa: SIM115 - kept for the child
        try:
            self.process = subprocess.Popen(
                [str(RABBITMQ_BIN / "rabbitmq-server")],
                cwd=self.base_dir,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # never in the test's process group
            )
        finally:
            output.close()
        try:
            self.wait_until_ready(self.start_timeout)
        except BaseException:
            self._terminate(timeout=10)
            raise
        return self

    def wait_until_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RabbitNodeError(
                    f"node {self.nodename} exited with {self.process.returncode}; "
                    f"see {self.log_dir}: {self.console_tail()}"
                )
            try:
                self._amqp_handshake(timeout=2.0)
                return
            except Exception as exc:  # not up yet
                last = exc
                time.sleep(0.25)
        raise RabbitNodeError(
            f"node {self.nodename} did not answer AMQP on {self.port} within {timeout:.0f}s "
            f"({last!r}): {self.console_tail()}"
        )

    def _amqp_handshake(self, timeout: float) -> None:
        import amqp

        conn = amqp.Connection(
            f"127.0.0.1:{self.port}", userid="guest", password="guest", connect_timeout=timeout
        )
        try:
            conn.connect()
        finally:
            with contextlib.suppress(Exception):
                conn.close()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def beam_pid(self) -> int:
        """The pid of this node's Erlang VM (``beam.smp``), checked in ``/proc``."""
        deadline = time.monotonic() + 10
        while True:
            pid = self._pid_from_file()
            if pid is None and self.process is not None:
                pid = self.process.pid  # the scripts exec erl -> erlexec -> beam.smp
            if pid is not None and self._is_our_beam(pid):
                return pid
            if time.monotonic() > deadline:
                raise RabbitNodeError(f"cannot find the Erlang VM of {self.nodename}")
            time.sleep(0.1)

    def _pid_from_file(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def _is_our_beam(self, pid: int) -> bool:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return b"beam" in Path(cmdline[0].decode()).name.encode() and any(
            self.short_name.encode() in part for part in cmdline
        )

    def kill(self) -> None:
        """SIGKILL the node's Erlang VM: no shutdown, every connection dies at once."""
        pid = self.beam_pid()
        os.kill(pid, signal.SIGKILL)
        if self.process is not None:
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired as exc:
                raise RabbitNodeError(f"{self.nodename} survived SIGKILL") from exc
        deadline = time.monotonic() + 10
        while self._is_our_beam(pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def freeze(self) -> None:
        """SIGSTOP the node's Erlang VM: its sockets stay open, nothing answers."""
        os.kill(self.beam_pid(), signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT after :meth:`freeze`."""
        os.kill(self.beam_pid(), signal.SIGCONT)

    def restart(self) -> RabbitNode:
        """Start again on the same data directory (durable state survives)."""
        if self.running:
            self._terminate(timeout=30)
        return self.start()

    def ctl(self, *args: str, timeout: float = 60.0, tool: str = "rabbitmqctl") -> str:
        """``rabbitmqctl -n <this node> args...`` (with this node's cookie); ``tool``: another
        of RabbitMQ's command-line tools (``rabbitmq-queues``)."""
        result = subprocess.run(
            [str(RABBITMQ_BIN / tool), "-n", self.nodename, *args],
            env=self.env(),
            cwd=self.base_dir,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise RabbitNodeError(f"{tool} {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def _terminate(self, timeout: float) -> None:
        """SIGTERM (a clean shutdown), then SIGKILL of the node's process group."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)

    def stop(self) -> None:
        """Shut the node down and delete its directory."""
        try:
            self._terminate(timeout=30)
        finally:
            self.process = None
            _RUNNING.discard(self)
            if self._own_dir:
                shutil.rmtree(self.base_dir, ignore_errors=True)

    def console_tail(self, lines: int = 15) -> str:
        try:
            text = (self.log_dir / "console.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def private_rabbit_node(
    *,
    name: str | None = None,
    cookie: str | None = None,
    start_timeout: float = 90.0,
    management: bool = False,
) -> Iterator[RabbitNode]:
    """A started :class:`RabbitNode`, stopped and removed afterwards whatever happens."""
    node = RabbitNode(name=name, cookie=cookie, start_timeout=start_timeout, management=management)
    try:
        node.start()
        yield node
    finally:
        node.stop()


class RabbitCluster:
    """Three private nodes with one Erlang cookie, joined into one RabbitMQ cluster."""

    def __init__(self, size: int = 3, *, prefix: str | None = None) -> None:
        prefix = prefix or f"re-cluster-{secrets.token_hex(3)}"
        cookie = secrets.token_hex(16)
        self.base_dir = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
        self.nodes: list[RabbitNode] = []
        used: set[int] = set()
        for index in range(size):
            node = RabbitNode(
                name=f"{prefix}-{index}",
                # named after the node: how its VM is recognised in /proc (beam_pid)
                base_dir=self.base_dir / f"{prefix}-{index}",
                cookie=cookie,
            )
            while node.port in used or node.dist_port in used:  # three picks, no clash
                node.port, node.dist_port = _free_port(used), _free_port(used | {node.port})
                node._prepare()
            used |= {node.port, node.dist_port}
            self.nodes.append(node)

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """The node list as one ``BROKER_URL`` string (``"amqp://...;amqp://..."``)."""
        return ";".join(self.urls)

    def start(self) -> RabbitCluster:
        """Start every node, join the others to the first, wait until all three run."""
        try:
            for node in self.nodes:
                node.start()
            seed = self.nodes[0].nodename
            for node in self.nodes[1:]:
                node.ctl("stop_app")
                node.ctl("join_cluster", seed)
                node.ctl("start_app")
                node.wait_until_ready(node.start_timeout)
            self.wait_until_clustered()
        except BaseException:
            self.stop()
            raise
        return self

    def running_nodes(self, via: int = 0) -> set[str]:
        """Names of the cluster's running nodes, as node ``via`` sees them."""
        import json

        status = json.loads(self.nodes[via].ctl("cluster_status", "--formatter", "json"))
        return set(status.get("running_nodes", []))

    def wait_until_clustered(self, timeout: float = 120.0) -> None:
        """Until every node runs and sees every other one running."""
        names = {node.nodename for node in self.nodes}
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                if all(self.running_nodes(i) == names for i in range(len(self.nodes))):
                    return
            except RabbitNodeError as exc:
                last = str(exc)
            time.sleep(0.5)
        raise RabbitNodeError(f"the cluster did not form within {timeout:.0f}s {last}")

    def wait_until_quorum_safe(self, index: int, timeout: float = 180.0) -> None:
        """Until stopping node ``index`` would leave every quorum queue its quorum
        (``rabbitmq-queues check_if_node_is_quorum_critical``): a node that rejoined the
        cluster may still be catching its queue members up, longer on a loaded machine,
        and a fault meant for one node would then take the quorum away."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                self.nodes[index].ctl(
                    "check_if_node_is_quorum_critical", tool="rabbitmq-queues", timeout=30
                )
                return
            except (RabbitNodeError, subprocess.TimeoutExpired) as exc:
                last = str(exc)
            time.sleep(1.0)
        raise RabbitNodeError(f"node {index} stayed quorum-critical for {timeout:.0f}s: {last}")

    def index_of(self, port: int) -> int:
        """The node whose AMQP port is ``port``."""
        return next(i for i, node in enumerate(self.nodes) if node.port == port)

    def leader(self, queue: str, *, via: int | None = None, timeout: float = 180.0) -> int:
        """The node leading the quorum queue ``queue`` (asked of the running nodes in
        turn until one answers: a node that rejoined may keep ``list_queues`` waiting
        while its queue members catch up, longer on a loaded machine)."""
        import json

        candidates = [via] if via is not None else list(range(len(self.nodes)))
        deadline = time.monotonic() + timeout
        while True:
            for index in candidates:
                node = self.nodes[index]
                if not node.running:
                    continue
                try:
                    rows = json.loads(
                        node.ctl(
                            "list_queues",
                            "name",
                            "leader",
                            "--formatter",
                            "json",
                            "-q",
                            timeout=min(30.0, max(1.0, deadline - time.monotonic())),
                        )
                    )
                except (RabbitNodeError, ValueError, subprocess.TimeoutExpired):
                    continue
                for row in rows:
                    if row.get("name") == queue:
                        leader = str(row.get("leader"))
                        return next(i for i, n in enumerate(self.nodes) if n.nodename == leader)
            if time.monotonic() >= deadline:
                raise RabbitNodeError(f"no running node named the leader of {queue!r}")
            time.sleep(1.0)

    def kill(self, index: int) -> None:
        """SIGKILL node ``index``'s Erlang VM."""
        self.nodes[index].kill()

    def freeze(self, index: int) -> None:
        self.nodes[index].freeze()

    def thaw(self, index: int) -> None:
        self.nodes[index].thaw()

    def restart(self, index: int) -> None:
        """Start node ``index`` again; it rejoins the cluster from its data directory."""
        self.nodes[index].restart()

    def stop(self) -> None:
        """SIGKILL every node (its data is thrown away) and delete the directories."""
        for node in self.nodes:
            if node.running:
                with contextlib.suppress(RabbitNodeError, OSError):
                    node.kill()
            node.stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)


@contextlib.contextmanager
def private_rabbit_cluster(size: int = 3) -> Iterator[RabbitCluster]:
    """A started :class:`RabbitCluster`, stopped and removed afterwards whatever happens."""
    cluster = RabbitCluster(size)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
