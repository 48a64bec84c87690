"""Which broker does a URL name, and how is it shown without its password?"""

from __future__ import annotations

from urllib.parse import urlsplit

AMQP_SCHEMES = frozenset({"amqp", "amqps", "pyamqp"})
#: The database transport's scheme (``db://`` or ``db://<alias>``).
DATABASE_SCHEME = "db"


#: This package's own transports by URL scheme: (publisher, consumer transport) classes
#: by dotted path, imported when used (as kombu does with its transport aliases).
OWN_TRANSPORTS: dict[str, tuple[str, str]] = {
    DATABASE_SCHEME: (
        "reliable_events.broker.database.DatabasePublisher",
        "reliable_events.broker.database.DatabaseTransport",
    ),
}


def is_amqp_url(url: str) -> bool:
    return urlsplit(url).scheme.lower() in AMQP_SCHEMES


def is_database_url(url: str) -> bool:
    return urlsplit(url).scheme.lower() == DATABASE_SCHEME


def own_transport(url: str) -> tuple[str, str] | None:
    """The (publisher, transport) class paths of one of this package's transports."""
    return OWN_TRANSPORTS.get(urlsplit(url).scheme.lower())


def safe_url(url: str) -> str:
    """``url`` without its password, for logs and errors."""
    from kombu.utils.url import maybe_sanitize_url

    if own_transport(url) is not None:
        return url  # db://[alias] carries no credentials (kombu would print "db:///")

    return str(maybe_sanitize_url(url))
