"""Shared fixtures: a real RabbitMQ per test (unique exchange), a plain AMQP client."""

from __future__ import annotations

import time
import uuid
import warnings
from collections.abc import Iterator
from typing import Any

import amqp
import pytest
from django.conf import settings as django_settings
from django.db import connection, connections

from reliable_events.consumer import registry
from reliable_events.relay import dispatcher
from tests.support.consumer_support import make_consumer
from tests.support.db_sessions import end_lingering_sessions


class RabbitClient:
    """A plain py-amqp client for inspecting the broker the way an outsider would."""

    def __init__(self, url: str) -> None:
        from kombu import Connection

        self._kombu = Connection(url)
        self._kombu.connect()
        self.connection: amqp.Connection = self._kombu.connection
        self.channel = self.connection.channel()
        self.exchanges: list[str] = []
        self.queues: list[str] = []

    def bind_queue(self, exchange: str, binding: str = "#", name: str | None = None) -> str:
        """Declare a durable queue bound to ``exchange`` (declaring the exchange too)."""
        name = name or f"test-q-{uuid.uuid4().hex[:10]}"
        self.channel.exchange_declare(
            f"{exchange}.unrouted", "fanout", durable=True, auto_delete=False
        )
        self.channel.exchange_declare(
            exchange,
            "topic",
            durable=True,
            auto_delete=False,
            arguments={"alternate-exchange": f"{exchange}.unrouted"},
        )
        self.channel.queue_declare(name, durable=True, auto_delete=False)
        self.channel.queue_bind(name, exchange, binding)
        self.queues.append(name)
        return name

    def full_queue(self, exchange: str, binding: str) -> str:
        """A queue bound to ``exchange`` that holds nothing and rejects every publish
        routed to it (``x-max-length: 0``, ``reject-publish``): the broker nacks it."""
        name = f"test-full-{exchange}"
        self.bind_queue(exchange, binding, name=name)  # declares the exchange
        self.channel.queue_delete(name)
        self.channel.queue_declare(
            name,
            durable=True,
            auto_delete=False,
            arguments={"x-max-length": 0, "x-overflow": "reject-publish"},
        )
        self.channel.queue_bind(name, exchange, binding)
        return name

    def get_all(self, queue: str, *, expect: int | None = None, timeout: float = 10.0) -> list[Any]:
        """Read (and ack) every message in ``queue``; wait until ``expect`` arrived."""
        messages: list[Any] = []
        deadline = time.monotonic() + timeout
        while True:
            message = self.channel.basic_get(queue, no_ack=False)
            if message is not None:
                self.channel.basic_ack(message.delivery_tag)
                messages.append(message)
                continue
            if expect is None or len(messages) >= expect or time.monotonic() > deadline:
                return messages
            time.sleep(0.05)

    def count(self, queue: str) -> int:
        return int(self.channel.queue_declare(queue, passive=True).message_count)

    def cleanup(self) -> None:
        """Delete every queue and exchange the test made, then disconnect."""
        from kombu import Connection

        with Connection(self._kombu.as_uri(include_password=True)) as conn:
            channel: Any = conn.channel()
            for queue in self.queues:
                channel.queue_delete(queue)
            for exchange in self.exchanges:
                channel.queue_delete(f"{exchange}.unrouted")
                channel.exchange_delete(exchange)
                channel.exchange_delete(f"{exchange}.unrouted")
        self._kombu.release()


#: Figures printed by the fault tests (ledger, outage), shown after the test run.
_FIGURES: list[str] = []


@pytest.fixture
def report_figures() -> Any:
    """``report_figures(text)``: show ``text`` in the "figures" section of the run's
    summary, even when the test passes (pytest hides passing tests' output)."""
    return _FIGURES.append


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _FIGURES:
        terminalreporter.section("figures")
        for text in _FIGURES:
            terminalreporter.write_line(text.strip("\n"))


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup: None, django_db_blocker: Any) -> Iterator[None]:
    """pytest-django's test databases; before they are dropped (PostgreSQL), once every
    test and fixture that used them is torn down, the other sessions still on them are
    waited for, then ended and named in a warning: a process or thread that leaked a
    connection shows, and the database does not stay behind."""
    yield
    database = connection.settings_dict
    if connection.vendor != "postgresql" or database["NAME"] != database["TEST"].get("NAME"):
        return  # not PostgreSQL, or its test database was not set up in this run
    with django_db_blocker.unblock(), connection.cursor() as cursor:
        ended = end_lingering_sessions(cursor)
    if ended:
        warnings.warn(
            pytest.PytestWarning(
                "sessions left on the test database, ended before its teardown: " + "; ".join(ended)
            ),
            stacklevel=1,
        )


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """Tests that stop or restart the shared services run only when asked to.

    ``scripts/test`` (and so CI) sets ``RE_DISRUPTIVE_TESTS=1``; a developer running a
    subset next to other work on the same services does not kill their broker.
    """
    import os

    if os.environ.get("RE_DISRUPTIVE_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="restarts shared services: set RE_DISRUPTIVE_TESTS=1")
    for item in items:
        if item.get_closest_marker("disruptive") is not None:
            item.add_marker(skip)


@pytest.fixture
def amqp_url() -> str:
    return str(django_settings.AMQP_URL)


@pytest.fixture
def rabbit(amqp_url: str) -> Iterator[RabbitClient]:
    client = RabbitClient(amqp_url)
    yield client
    client.cleanup()


@pytest.fixture
def exchange_name() -> str:
    return f"test-ev-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def broker(
    settings: Any, amqp_url: str, exchange_name: str, rabbit: RabbitClient
) -> Iterator[dict[str, Any]]:
    """Point reliable_events at the real RabbitMQ with a fresh exchange for this test."""
    config = dict(settings.RELIABLE_EVENTS)
    config.update({"BROKER_URL": amqp_url, "EXCHANGE": exchange_name})
    settings.RELIABLE_EVENTS = config
    rabbit.exchanges.append(exchange_name)
    dispatcher.reset()
    yield config
    dispatcher.reset()


@pytest.fixture(autouse=True)
def _reset_dispatcher() -> Iterator[None]:
    dispatcher.reset()
    yield
    dispatcher.reset()


@pytest.fixture
def clean_registry() -> Iterator[Any]:
    """An empty consumer registry for the test; the previous one is restored after."""
    saved = dict(registry._consumers)
    discovered = registry._discovered
    registry._consumers.clear()
    registry._discovered = True
    yield registry
    registry._consumers.clear()
    registry._consumers.update(saved)
    registry._discovered = discovered


#: The consumers ``tests.support.deadletter_factory`` and the triage tests name.
TRIAGED_CONSUMERS = ("billing.charge", "mail.send", "a", "b")


@pytest.fixture
def triage_consumers(clean_registry: Any) -> Any:
    """The consumers the triage tests' dead letters belong to, registered as the web
    process of an application registers its own: their retries are not skipped as
    "not registered here"."""
    for name in TRIAGED_CONSUMERS:
        make_consumer(clean_registry, name=name, topics=["orders.*", "users.*"])
    return clean_registry


@pytest.fixture
def re_settings(settings: Any) -> Any:
    """``re_settings(KEY=value, ...)`` overrides RELIABLE_EVENTS keys for the test."""

    def configure(**overrides: Any) -> dict[str, Any]:
        config = dict(settings.RELIABLE_EVENTS)
        config.update(overrides)
        settings.RELIABLE_EVENTS = config
        return config

    return configure


@pytest.fixture
def project_isolation() -> Iterator[Any]:
    """A setter of the project's ``OPTIONS["isolation_level"]`` (a name such as
    ``"SERIALIZABLE"``, or ``None`` for none), applied to the connections opened after
    it; restored, and this thread's connections closed, at the end (PostgreSQL only)."""
    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL's isolation levels")
    from django.db.backends.postgresql.psycopg_any import (  # type: ignore[import-untyped]
        IsolationLevel,
    )

    options = connection.settings_dict.setdefault("OPTIONS", {})
    saved = dict(options)

    def apply(name: str | None) -> None:
        options.pop("isolation_level", None)
        if name is not None:
            options["isolation_level"] = IsolationLevel[name]
        connections.close_all()

    try:
        yield apply
    finally:
        options.clear()
        options.update(saved)
        connections.close_all()


@pytest.fixture(params=[True, False], ids=["aware", "naive"])
def use_tz(request: Any, settings: Any) -> bool:
    """The test runs twice: under ``USE_TZ = True`` (Django's default) and ``False`` (a
    project keeping naive datetimes in ``TIME_ZONE``)."""
    settings.USE_TZ = request.param
    return bool(request.param)


@pytest.fixture
def tcp_proxy() -> Iterator[Any]:
    """A started :class:`tests.support.tcp_proxy.TcpProxy` in front of the real RabbitMQ."""
    from urllib.parse import urlsplit

    from tests.support.tcp_proxy import TcpProxy

    target = urlsplit(str(django_settings.AMQP_URL))
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 5672).start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="session")
def rabbit_cluster() -> Iterator[Any]:
    """A private 3-node RabbitMQ cluster (:class:`tests.support.rabbit_node.RabbitCluster`),
    started once per test session (about 40 s) and torn down at its end; never the
    machine's own node on 5672."""
    from tests.support.rabbit_node import available, private_rabbit_cluster

    if not available():
        pytest.skip("RabbitMQ server scripts not installed")
    with private_rabbit_cluster() as cluster:
        yield cluster


@pytest.fixture
def pgbouncer() -> Iterator[Any]:
    """A private PgBouncer (transaction pooling) in front of the test PostgreSQL."""
    from tests.support.pgbouncer import PgBouncer, available

    if not available():
        pytest.fail("pgbouncer is not installed (.ci/run installs Debian's package)")
    database: dict[str, Any] = dict(django_settings.DATABASES["default"])
    bouncer = PgBouncer(
        host=str(database.get("HOST") or "127.0.0.1"), port=int(database.get("PORT") or 5432)
    ).start()
    yield bouncer
    bouncer.stop()


@pytest.fixture
def through_pgbouncer(django_db_setup: Any, pgbouncer: Any) -> Iterator[Any]:
    """This test's Django connections (and its child processes) go through ``pgbouncer``;
    afterwards, the pooler's server connections are gone too."""
    from tests.support.pgbouncer import route_through, wait_for_server_connections_closed

    with route_through(pgbouncer):
        yield pgbouncer
    pgbouncer.stop()
    wait_for_server_connections_closed()
