"""System checks for misconfiguration (ids ``reliable_events.E0xx`` / ``W0xx``)."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, Warning, register
from django.utils.module_loading import import_string

from reliable_events import cloudevents
from reliable_events.broker.management import url_problems
from reliable_events.broker.queue_rows import dialect_for
from reliable_events.broker_url import (
    AMQP_SCHEMES,
    OWN_TRANSPORTS,
    node_list_problems,
    node_urls,
    userinfo_password,
)
from reliable_events.checks_database import (
    DOCS,
    check_pooled_databases,
    check_sqlite_clock,
    check_sqlite_writers,
)
from reliable_events.conf import app_settings
from reliable_events.consumer.base import QUORUM_DELIVERY_LIMIT
from reliable_events.db import queue_alias
from reliable_events.debug import mask_urls
from reliable_events.exceptions import ConfigurationError
from reliable_events.topology import KEY_BUCKETS

_POSITIVE_INTS = (
    "MAX_ATTEMPTS",
    "MAX_PAYLOAD_BYTES",
    "RELAY_BATCH_SIZE",
    "CONFIRM_WINDOW",
    "PURGE_BATCH_SIZE",
    "PREFETCH_COUNT",
    "CONSUMER_BATCH_SIZE",
    "CONSUMER_LOG_EVERY",
    "ON_COMMIT_CHAIN_LIMIT",
    "METRICS_MAX_TOPICS",
)
_POSITIVE_NUMBERS = (
    "RELAY_LEASE_SECONDS",
    "BACKOFF_BASE",
    "BACKOFF_MAX",
    "CONFIRM_TIMEOUT",
    "CONNECT_TIMEOUT",
    "ON_COMMIT_CONNECT_TIMEOUT",
    "ON_COMMIT_CONFIRM_TIMEOUT",
    "OUTBOX_RETENTION_DAYS",
    "PROCESSED_RETENTION_DAYS",
    "CONSUMER_RECONNECT_MAX",
    "TOPOLOGY_CHECK_SECONDS",
    "DATABASE_POLL_MAX",
    "RELAY_BROKER_RETRY_MAX",
    "TIME_SCALE",
    "HEARTBEAT_SECONDS",
    "HEARTBEAT_TIMEOUT_SECONDS",
    "HEARTBEAT_RETENTION_DAYS",
    "ORDERED_HEARTBEAT_SECONDS",
    "ORDERED_MEMBER_TTL",
)
_NON_NEGATIVE_NUMBERS = (
    "RELAY_IDLE_SECONDS",
    "ON_COMMIT_GRACE_SECONDS",
    "ON_COMMIT_BREAKER_SECONDS",
    "CONSUMER_HEARTBEAT",
    "UNROUTED_CACHE_SECONDS",
    "CONSUMER_BATCH_LINGER",
    "METRICS_CACHE_SECONDS",
)
#: Integers with bounds of their own, ``(lowest, highest, None allowed)``.
_BOUNDED_INTS = {
    # A partition per key bucket at most (the relay's buckets).
    "ORDERED_PARTITIONS": (1, KEY_BUCKETS, False),
    # Below the queues' x-delivery-limit, or the broker drops before the app dead-letters.
    "MAX_DELIVERIES": (1, QUORUM_DELIVERY_LIMIT - 1, False),
    "METRICS_PORT": (1, 65535, True),
}
_MAX_LANES = 32767


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _setting_errors() -> list[CheckMessage]:
    errors: list[CheckMessage] = []
    for name in _POSITIVE_INTS:
        value = getattr(app_settings, name)
        if name == "PREFETCH_COUNT" and value is None:
            continue  # derived from the batch sizes
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            errors.append(
                Error(
                    f"RELIABLE_EVENTS[{name!r}] must be a positive integer, got {value!r}.",
                    hint=DOCS,
                    id="reliable_events.E003",
                )
            )
    for name, (lowest, highest, optional) in _BOUNDED_INTS.items():
        value = getattr(app_settings, name)
        if optional and value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not lowest <= value <= highest:
            errors.append(
                Error(
                    f"RELIABLE_EVENTS[{name!r}] must be an integer from {lowest} to {highest}"
                    f"{' or None' if optional else ''}, got {value!r}.",
                    hint=DOCS,
                    id="reliable_events.E003",
                )
            )
    names = app_settings.CELERY_CONSUMERS
    if names is not None and (
        not isinstance(names, list | tuple) or not all(isinstance(n, str) and n for n in names)
    ):
        errors.append(
            Error(
                f"RELIABLE_EVENTS['CELERY_CONSUMERS'] must be None or a list of consumer names, "
                f"got {names!r}.",
                hint="A single name still goes in a list: ['billing.charge']. " + DOCS,
                id="reliable_events.E003",
            )
        )
    for name in _POSITIVE_NUMBERS:
        value = getattr(app_settings, name)
        if not _is_number(value) or value <= 0:
            errors.append(
                Error(
                    f"RELIABLE_EVENTS[{name!r}] must be a positive number, got {value!r}.",
                    hint=DOCS,
                    id="reliable_events.E003",
                )
            )
    for name in _NON_NEGATIVE_NUMBERS:
        value = getattr(app_settings, name)
        if not _is_number(value) or value < 0:
            errors.append(
                Error(
                    f"RELIABLE_EVENTS[{name!r}] must be a number >= 0, got {value!r}.",
                    hint=DOCS,
                    id="reliable_events.E003",
                )
            )
    return errors


def check_settings_type() -> list[CheckMessage]:
    value = getattr(settings, "RELIABLE_EVENTS", {})
    if not isinstance(value, dict):
        return [
            Error(
                "settings.RELIABLE_EVENTS must be a dict.",
                hint="Set RELIABLE_EVENTS = {'BROKER_URL': ...}. " + DOCS,
                id="reliable_events.E001",
            )
        ]
    unknown = app_settings.unknown()
    if unknown:
        return [
            Warning(
                f"Unknown RELIABLE_EVENTS setting(s): {', '.join(unknown)}.",
                hint="Check the spelling; the known settings are listed in docs/settings.md.",
                id="reliable_events.W001",
            )
        ]
    return []


def check_broker_url() -> list[CheckMessage]:
    nodes = check_broker_nodes()
    if nodes:
        return nodes
    url = app_settings.BROKER_URL
    if not isinstance(url, str) or not url:
        return [
            Error(
                "RELIABLE_EVENTS['BROKER_URL'] must be a non-empty string.",
                hint="e.g. 'amqp://user:password@host:5672//'. " + DOCS,
                id="reliable_events.E002",
            )
        ]
    from kombu.transport import TRANSPORT_ALIASES

    try:
        split = urlsplit(url)
        split.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:  # the URL stays out of the message: it may hold a password
        return [
            Error(
                "RELIABLE_EVENTS['BROKER_URL'] is not a URL (bad port or host).",
                hint="e.g. 'amqp://user:password@host:5672//'. " + DOCS,
                id="reliable_events.E002",
            )
        ]
    if any((urlsplit(node).password or "") != userinfo_password(node) for node in node_urls(url)):
        return [
            Error(
                "RELIABLE_EVENTS['BROKER_URL'] has a password with a character a URL "
                "reserves (/ ? # @ [ ]): the URL parser cuts it there.",
                hint="Percent-encode it (urllib.parse.quote(password, safe='')): "
                "'amqp://user:pa%2Fss@host:5672//'. " + DOCS,
                id="reliable_events.E002",
            )
        ]
    scheme = split.scheme.lower()
    if scheme in OWN_TRANSPORTS or scheme in UNSAFE_TRANSPORTS:
        return check_own_transport(url, scheme)
    if scheme not in TRANSPORT_ALIASES and scheme != "amqps":
        return [
            Error(
                f"RELIABLE_EVENTS['BROKER_URL'] uses the unknown transport {scheme!r}.",
                hint="Use amqp:// (RabbitMQ) in production, or db:// (the database transport).",
                id="reliable_events.E002",
            )
        ]
    if scheme not in SUPPORTED_KOMBU_TRANSPORTS:
        given = "" if app_settings.given("BROKER_URL") else " (taken from CELERY_BROKER_URL)"
        return [
            Error(
                f"RELIABLE_EVENTS['BROKER_URL']{given} uses kombu's {scheme!r} transport, "
                "which this app does not support: it has no publisher confirms, alternate "
                "exchange or delay queues, so an event could be lost unseen.",
                hint="Set RELIABLE_EVENTS['BROKER_URL'] to an amqp:// URL (RabbitMQ) or "
                "'db://' (queues in your database; Celery may keep its own broker). " + DOCS,
                id="reliable_events.E002",
            )
        ]
    if scheme == "memory":
        return [
            Warning(
                "RELIABLE_EVENTS['BROKER_URL'] is memory://: events only reach consumers "
                "running in the same process and are lost when it exits.",
                hint="Use amqp:// in production (db:// without a broker); memory:// is for tests.",
                id="reliable_events.W002",
            )
        ]
    return []


def check_broker_nodes() -> list[CheckMessage]:
    """A list of several nodes (``"amqp://h1//;amqp://h2//"`` or a list) must be usable."""
    raw = app_settings.given("BROKER_URL")
    if raw is None:
        raw = app_settings.BROKER_URL
    if (isinstance(raw, str) and not raw) or not isinstance(raw, str | list | tuple):
        return []  # not a URL at all: E002 says so
    problems = node_list_problems(raw)
    if not problems:
        return []
    return [
        Error(
            f"RELIABLE_EVENTS['BROKER_URL'] is a malformed node list: {'; '.join(problems)}.",
            hint="List the RabbitMQ cluster's nodes as ['amqp://user:password@host1:5672//', "
            "'amqp://user:password@host2:5672//'] or one string joined by ';'. " + DOCS,
            id="reliable_events.E011",
        )
    ]


#: kombu transports the app runs on: RabbitMQ, and ``memory://`` for in-process tests.
SUPPORTED_KOMBU_TRANSPORTS = AMQP_SCHEMES | {"librabbitmq", "memory"}
#: kombu transports that lose messages (see docs/settings.md): refused, pointing to db://.
UNSAFE_TRANSPORTS = frozenset({"filesystem"})


def check_own_transport(url: str, scheme: str) -> list[CheckMessage]:
    """``filesystem://`` is refused; ``db://`` needs a PostgreSQL or SQLite alias."""
    if scheme in UNSAFE_TRANSPORTS:
        return [
            Error(
                f"RELIABLE_EVENTS['BROKER_URL'] is {scheme}://: kombu's {scheme} transport "
                "loses messages (a reader can take a file before it is written; unacked "
                "messages live in the consumer's memory).",
                hint="Use db:// (queues in your database) or amqp:// (RabbitMQ). " + DOCS,
                id="reliable_events.E010",
            )
        ]
    try:
        dialect_for(queue_alias(url))
    except ConfigurationError as exc:
        return [
            Error(f"RELIABLE_EVENTS['BROKER_URL']: {exc}.", hint=DOCS, id="reliable_events.E010")
        ]
    return []


def check_queue_type() -> list[CheckMessage]:
    if app_settings.QUEUE_TYPE not in ("classic", "quorum"):
        return [
            Error(
                f"RELIABLE_EVENTS['QUEUE_TYPE'] must be 'classic' or 'quorum', "
                f"got {app_settings.QUEUE_TYPE!r}.",
                hint=DOCS,
                id="reliable_events.E004",
            )
        ]
    return []


def check_cloudevents() -> list[CheckMessage]:
    try:
        cloudevents.mode()
    except ConfigurationError as exc:
        return [
            Error(f"RELIABLE_EVENTS['CLOUDEVENTS']: {exc}.", hint=DOCS, id="reliable_events.E012")
        ]
    return []


def check_management_url() -> list[CheckMessage]:
    url = app_settings.BROKER_MANAGEMENT_URL
    if url is None:
        return []
    problems = ["it must be a URL string"] if not isinstance(url, str) else url_problems(url)
    if not problems:
        return []
    return [
        Error(
            f"RELIABLE_EVENTS['BROKER_MANAGEMENT_URL']: {'; '.join(problems)}.",
            hint="RabbitMQ's management API, e.g. 'http://monitor:password@rabbit:15672/' "
            "(a user with the monitoring tag), or None. " + DOCS,
            id="reliable_events.E015",
        )
    ]


def check_exchange() -> list[CheckMessage]:
    exchange = app_settings.EXCHANGE
    if not isinstance(exchange, str) or not exchange or exchange.startswith("amq."):
        return [
            Error(
                f"RELIABLE_EVENTS['EXCHANGE'] must be a non-empty name not starting with "
                f"'amq.', got {exchange!r}.",
                hint=DOCS,
                id="reliable_events.E005",
            )
        ]
    return []


def check_lanes() -> list[CheckMessage]:
    lanes = app_settings.LANES
    if not isinstance(lanes, int) or isinstance(lanes, bool) or not 1 <= lanes <= _MAX_LANES:
        return [
            Error(
                f"RELIABLE_EVENTS['LANES'] must be an integer from 1 to {_MAX_LANES}, "
                f"got {lanes!r}.",
                hint="Change it only while the outbox has no pending rows. " + DOCS,
                id="reliable_events.E006",
            )
        ]
    return []


def check_on_commit_grace() -> list[CheckMessage]:
    values = (
        app_settings.ON_COMMIT_GRACE_SECONDS,
        app_settings.ON_COMMIT_CONNECT_TIMEOUT,
        app_settings.ON_COMMIT_CONFIRM_TIMEOUT,
    )
    if not all(_is_number(v) for v in values):
        return []  # reported by E003
    grace, connect, confirm = values
    if grace <= connect + confirm:
        return [
            Error(
                "RELIABLE_EVENTS['ON_COMMIT_GRACE_SECONDS'] must exceed "
                "ON_COMMIT_CONNECT_TIMEOUT + ON_COMMIT_CONFIRM_TIMEOUT, or the relay may "
                "publish a row while the on-commit hook still works on it.",
                hint=f"Set it above {connect + confirm:g} seconds.",
                id="reliable_events.E007",
            )
        ]
    return []


#: Heartbeats and how old one may be before its process counts as gone:
#: ``(interval, timeout, what the timeout decides)``.
_HEARTBEAT_WINDOWS = (
    (
        "ORDERED_HEARTBEAT_SECONDS",
        "ORDERED_MEMBER_TTL",
        "the other processes of an ordered consumer take its partitions",
    ),
    ("HEARTBEAT_SECONDS", "HEARTBEAT_TIMEOUT_SECONDS", "liveness reports it absent"),
)


def check_heartbeat_windows() -> list[CheckMessage]:
    messages: list[CheckMessage] = []
    for interval_name, timeout_name, effect in _HEARTBEAT_WINDOWS:
        interval = getattr(app_settings, interval_name)
        timeout = getattr(app_settings, timeout_name)
        if not (_is_number(interval) and _is_number(timeout)) or min(interval, timeout) <= 0:
            continue  # reported by E003
        text = (
            f"RELIABLE_EVENTS[{timeout_name!r}] ({timeout:g} s) is {{}} "
            f"{interval_name} ({interval:g} s): {{}}, {effect}."
        )
        hint = f"Keep it a few times {interval_name}, e.g. {5 * interval:g}."
        if timeout <= interval:
            messages.append(
                Error(
                    text.format("not above", "a process that beats on time counts as gone"),
                    hint=hint,
                    id="reliable_events.E014",
                )
            )
        elif timeout < 2 * interval:
            messages.append(
                Warning(
                    text.format(
                        "under twice", "one late heartbeat and a live process counts as gone"
                    ),
                    hint=hint,
                    id="reliable_events.W005",
                )
            )
    return messages


def check_retry_policy() -> list[CheckMessage]:
    delays = app_settings.RETRY_DELAYS
    retries = app_settings.MAX_RETRIES
    if (
        not isinstance(delays, list | tuple)
        or not delays
        or not all(_is_number(d) and d >= 0 for d in delays)
    ):
        return [
            Error(
                f"RELIABLE_EVENTS['RETRY_DELAYS'] must be a non-empty list of seconds >= 0, "
                f"got {delays!r}.",
                hint=DOCS,
                id="reliable_events.E008",
            )
        ]
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        return [
            Error(
                f"RELIABLE_EVENTS['MAX_RETRIES'] must be an integer >= 0, got {retries!r}.",
                hint=DOCS,
                id="reliable_events.E008",
            )
        ]
    retention = app_settings.PROCESSED_RETENTION_DAYS
    if _is_number(retention) and retention * 86400 <= sum(delays) * 2:
        return [
            Error(
                "RELIABLE_EVENTS['PROCESSED_RETENTION_DAYS'] is shorter than the retry "
                "horizon: a late redelivery could be applied twice.",
                hint="Keep processed records longer than the sum of RETRY_DELAYS.",
                id="reliable_events.E009",
            )
        ]
    return []


SAFE_FILTER = "reliable_events.debug.SafeExceptionReporterFilter"


def _has_password(url: Any) -> bool:
    """Whether the filter would mask something in ``url`` (also one urlsplit refuses)."""
    return isinstance(url, str) and mask_urls(url) != url


def check_debug_filter() -> list[CheckMessage]:
    """Django's debug page shows every setting: a broker password in a URL too, unless
    the filter that masks it is installed."""
    if not settings.DEBUG:
        return []
    urls = (
        app_settings.BROKER_URL,
        getattr(settings, "CELERY_BROKER_URL", None),
        app_settings.BROKER_MANAGEMENT_URL,
    )
    if not any(_has_password(url) for url in urls):
        return []
    installed = str(getattr(settings, "DEFAULT_EXCEPTION_REPORTER_FILTER", ""))
    try:
        safe = issubclass(import_string(installed), import_string(SAFE_FILTER))
    except (ImportError, TypeError):
        safe = False
    if safe:
        return []
    return [
        Warning(
            "DEBUG is on and the broker URL has a password: Django's debug page (any "
            "error, or a request with a bad Host header) shows it in clear.",
            hint=f"Set DEFAULT_EXCEPTION_REPORTER_FILTER = {SAFE_FILTER!r}, or turn DEBUG "
            "off. " + DOCS,
            id="reliable_events.W003",
        )
    ]


CHECKS: tuple[Callable[[], list[CheckMessage]], ...] = (
    check_settings_type,
    check_broker_url,
    check_queue_type,
    check_cloudevents,
    check_management_url,
    check_exchange,
    check_lanes,
    check_on_commit_grace,
    check_heartbeat_windows,
    check_retry_policy,
    check_debug_filter,
    check_pooled_databases,
    check_sqlite_clock,
    check_sqlite_writers,
    _setting_errors,
)


@register(Tags.compatibility)
def reliable_events_checks(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    if not isinstance(getattr(settings, "RELIABLE_EVENTS", {}), dict):
        return check_settings_type()
    messages: list[CheckMessage] = []
    for check in CHECKS:
        messages.extend(check())
    return messages
