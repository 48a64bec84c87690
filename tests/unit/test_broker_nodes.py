"""``BROKER_URL`` as a list of RabbitMQ cluster nodes: parsing, the ``E011`` check, no
password shown, and :class:`BrokerNodes` trying the nodes in turn (a connection lost
with its node goes to the next one first)."""

from __future__ import annotations

import logging
import socket

import pytest

from reliable_events.broker_nodes import BrokerNodes
from reliable_events.broker_url import join_nodes, node_list_problems, node_urls, safe_url
from reliable_events.checks import reliable_events_checks
from reliable_events.conf import app_settings
from reliable_events.exceptions import ConfigurationError
from reliable_events.sanitize import describe_error, redact

A = "amqp://u:alpha-secret@h1:5672//"
B = "amqp://u:beta-secret@h2:5673//"
C = "amqp://u:gamma-secret@h3:5674//"


def test_node_urls_from_kombu_string_and_list():
    assert node_urls(f"{A};{B}") == [A, B]
    assert node_urls(f" {A} ; {B} ") == [A, B]
    assert node_urls([A, B, C]) == [A, B, C]
    assert node_urls(A) == [A]
    assert join_nodes([A, B]) == f"{A};{B}"
    assert join_nodes(A) == A


def test_a_list_setting_reads_back_as_the_joined_string(re_settings):
    re_settings(BROKER_URL=[A, B, C])
    assert str(app_settings.BROKER_URL) == f"{A};{B};{C}"
    re_settings(BROKER_URL=(A, B))
    assert str(app_settings.BROKER_URL) == f"{A};{B}"


@pytest.mark.parametrize(
    ("url", "words"),
    [
        (f"{A};;{B}", "empty entry"),
        ([A, ""], "empty entry"),
        ([], "empty"),
        ([A, A], "listed twice"),
        ([A, "db://"], "need amqp://"),
        ([A, "memory://"], "need amqp://"),
        ([A, "amqp://u:p@h:notaport//"], "node 2 is not a URL"),
        ([A, "amqp:///"], "node 2 names no scheme or host"),
        ([A, 5], "must be a URL string"),
    ],
)
def test_e011_malformed_node_list(re_settings, url, words):
    re_settings(BROKER_URL=url)
    messages = [m for m in reliable_events_checks() if m.id == "reliable_events.E011"]
    assert len(messages) == 1, reliable_events_checks()
    assert words in messages[0].msg
    for secret in ("alpha-secret", "beta-secret"):
        assert secret not in messages[0].msg


@pytest.mark.parametrize("url", [[A, B, C], f"{A};{B}", [A], "amqps://u:p@h1//;amqps://u:p@h2//"])
def test_well_formed_node_lists_pass(re_settings, url):
    re_settings(BROKER_URL=url)
    assert reliable_events_checks() == []
    assert node_list_problems(url) == []


def test_no_password_of_any_node_is_shown():
    url = f"{A};{B};{C}"
    shown = safe_url(url)
    error = describe_error(OSError(f"refused by {url}"), url)
    with_default = redact("alpha-secret beta-secret gamma-secret", url)
    for secret in ("alpha-secret", "beta-secret", "gamma-secret"):
        assert secret not in shown
        assert secret not in error
        assert secret not in with_default
    assert shown.count("@h") == 3


class Opened:
    """What ``open_node`` returns: which node it was."""

    def __init__(self, url: str) -> None:
        self.url = url


def test_connect_goes_to_the_next_node_and_each_new_connection_starts_after_the_last():
    dead: set[str] = {A}
    tried: list[str] = []

    def open_node(url: str) -> Opened:
        tried.append(url)
        if url in dead:
            raise ConnectionRefusedError(f"refused {url}")
        return Opened(url)

    nodes = BrokerNodes(f"{A};{B};{C}", start=0)
    assert nodes.connect(open_node, role="test").url == B
    assert tried == [A, B]
    # the connection on B is lost: the next one starts with C, not with B again
    tried.clear()
    assert nodes.connect(open_node, role="test").url == C
    assert tried == [C]
    dead.update({B, C})
    tried.clear()
    with pytest.raises(ConnectionRefusedError):
        nodes.connect(open_node, role="test")
    assert tried == [A, B, C]
    dead.clear()
    assert nodes.connect(open_node, role="test").url == A


def test_a_refused_topology_is_not_retried_on_other_nodes():
    tried: list[str] = []

    def open_node(url: str) -> Opened:
        tried.append(url)
        raise ConfigurationError("inequivalent arg")

    with pytest.raises(ConfigurationError):
        BrokerNodes([A, B], start=0).connect(open_node, role="test")
    assert tried == [A]


def test_failover_log_lines_carry_no_password(caplog):
    def open_node(url: str) -> Opened:
        if url != C:
            raise OSError(f"cannot reach {url}")
        return Opened(url)

    nodes = BrokerNodes(f"{A};{B};{C}", start=0)
    with caplog.at_level(logging.INFO):
        nodes.connect(open_node, role="publisher")
    text = caplog.text
    assert "trying the next node" in text
    for secret in ("alpha-secret", "beta-secret", "gamma-secret"):
        assert secret not in text


def test_processes_start_at_random_nodes_and_try_every_node():
    starts = {BrokerNodes([A, B, C]).order()[0] for _ in range(200)}
    assert starts == {A, B, C}
    assert sorted(BrokerNodes([A, B, C]).order()) == sorted([A, B, C])


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.rabbitmq
def test_publisher_and_unrouted_count_fail_over_to_a_live_node(
    amqp_url, rabbit, exchange_name, re_settings, caplog
):
    """The first node tried refuses (nothing listens there): the real broker, listed
    second, takes the connection; a single try of each, no sleep in between.  The
    unrouted count (a fresh node list, random start) gets through either way."""
    from reliable_events.broker import AmqpPublisher, open_publisher
    from reliable_events.unrouted import count_unrouted

    dead = f"amqp://guest:dead-secret@127.0.0.1:{_closed_port()}//"
    re_settings(BROKER_URL=[dead, amqp_url], EXCHANGE=exchange_name)
    rabbit.exchanges.append(exchange_name)  # deleted after the test
    publisher = open_publisher()
    assert isinstance(publisher, AmqpPublisher)
    publisher.nodes = BrokerNodes([dead, amqp_url], start=0)  # the dead node first
    with caplog.at_level(logging.WARNING):
        publisher.connect()
    try:
        assert publisher.connected
        assert publisher.nodes.current == amqp_url
    finally:
        publisher.close()
    count = count_unrouted()
    assert not count.error, count
    assert count.count == 0
    assert "dead-secret" not in caplog.text
    assert "trying the next node" in caplog.text
