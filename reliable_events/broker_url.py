"""Which broker does a URL name, and how is it shown without its password?

``BROKER_URL`` may name several nodes of one RabbitMQ cluster: kombu's form
``"amqp://h1//;amqp://h2//"`` or a list of URLs.  :func:`node_urls` splits either into
the list of node URLs, :func:`join_nodes` writes the one string every connection opener
takes, and :func:`node_list_problems` says what is wrong with a malformed list.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

AMQP_SCHEMES = frozenset({"amqp", "amqps", "pyamqp"})
#: The database transport's scheme (``db://`` or ``db://<alias>``).
DATABASE_SCHEME = "db"

#: Separator of the nodes in a one-string node list (kombu's failover form).
NODE_SEPARATOR = ";"


#: This package's own transports by URL scheme: (publisher, consumer transport) classes
#: by dotted path, imported when used (as kombu does with its transport aliases).
OWN_TRANSPORTS: dict[str, tuple[str, str]] = {
    DATABASE_SCHEME: (
        "reliable_events.broker.database.DatabasePublisher",
        "reliable_events.broker.database.DatabaseTransport",
    ),
}


def node_urls(url: str | Sequence[str]) -> list[str]:
    """The node URLs of ``url``: one, or several separated by ``;``, or a list."""
    parts = [url] if isinstance(url, str) else [str(item) for item in url]
    return [node.strip() for part in parts for node in part.split(NODE_SEPARATOR) if node.strip()]


def join_nodes(url: str | Sequence[str]) -> str:
    """``url`` as one string (``"amqp://h1//;amqp://h2//"`` for several nodes)."""
    return NODE_SEPARATOR.join(node_urls(url))


def node_list_problems(url: str | Sequence[str]) -> list[str]:
    """What is wrong with a list of several nodes (empty when it is usable)."""
    parts = [url] if isinstance(url, str) else list(url)
    if not isinstance(url, str) and not all(isinstance(part, str) for part in parts):
        return ["every node of the list must be a URL string"]
    raw = [node.strip() for part in parts for node in str(part).split(NODE_SEPARATOR)]
    nodes = [node for node in raw if node]
    if len(raw) <= 1 and isinstance(url, str):
        return []
    problems = []
    if len(nodes) != len(raw):
        problems.append("the node list has an empty entry")
    if not nodes:
        return problems or ["the node list is empty"]
    schemes = set()
    for number, node in enumerate(nodes, 1):
        try:
            split = urlsplit(node)
            split.port  # noqa: B018 - raises ValueError for a malformed port
        except ValueError:
            problems.append(f"node {number} is not a URL (bad port or host)")
            continue
        if not split.scheme or not split.hostname:
            problems.append(f"node {number} names no scheme or host")
        schemes.add(split.scheme.lower())
    if len(nodes) > 1 and not schemes <= AMQP_SCHEMES:
        problems.append("several nodes need amqp:// or amqps:// URLs (RabbitMQ cluster nodes)")
    elif len(schemes) > 1:
        problems.append("the nodes mix schemes (" + ", ".join(sorted(schemes)) + ")")
    if len(set(nodes)) != len(nodes):
        problems.append("a node is listed twice")
    return problems


def is_amqp_url(url: str) -> bool:
    return urlsplit(url).scheme.lower() in AMQP_SCHEMES


def is_database_url(url: str) -> bool:
    return urlsplit(url).scheme.lower() == DATABASE_SCHEME


def own_transport(url: str) -> tuple[str, str] | None:
    """The (publisher, transport) class paths of one of this package's transports."""
    return OWN_TRANSPORTS.get(urlsplit(url).scheme.lower())


def userinfo_password(url: str) -> str:
    """The password in ``url`` as written, also when a character of it that should be
    percent-encoded (``/``, ``?``, ``#``, ``@``) keeps ``urlsplit`` from finding it: the
    user information runs from ``://`` to the last ``@``."""
    _, sep, rest = url.partition("://")
    at = rest.rfind("@")
    if not sep or at < 0:
        return ""
    _, colon, password = rest[:at].partition(":")
    return password if colon else ""


def _masked(url: str, mask: str = "**") -> str:
    """``url`` with everything between the user name and the last ``@`` masked."""
    scheme, _, rest = url.partition("://")
    at = rest.rfind("@")
    user = rest[:at].partition(":")[0]
    return f"{scheme}://{user}:{mask}@{rest[at + 1 :]}" if userinfo_password(url) else url


def safe_url(url: str) -> str:
    """``url`` (every node of it) without its password, for logs and errors."""
    from kombu.utils.url import maybe_sanitize_url

    if own_transport(url) is not None:
        return url  # db://[alias] carries no credentials (kombu would print "db:///")

    def one(node: str) -> str:
        try:
            if (urlsplit(node).password or "") == userinfo_password(node):
                return str(maybe_sanitize_url(node))
        except ValueError:  # a port that is not a number: a password with a raw "/" in it
            pass
        return _masked(node)  # a password the URL parser would cut (a raw "/", "#", "@")

    return NODE_SEPARATOR.join(one(node) for node in node_urls(url) or [url])
