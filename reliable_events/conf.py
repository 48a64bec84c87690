"""Settings for reliable_events, read lazily from ``settings.RELIABLE_EVENTS``.

Every setting is an annotated attribute of :class:`AppSettings` with its default; the
value in ``settings.RELIABLE_EVENTS`` (a dict) wins.  Nothing is read at import time:
each attribute access looks at the current Django settings, so ``override_settings``
works in tests.  Every setting is documented in ``docs/settings.md``.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings as django_settings

from reliable_events.broker_url import join_nodes

#: Fallback broker when neither ``RELIABLE_EVENTS["BROKER_URL"]`` nor
#: ``CELERY_BROKER_URL`` is set: the database transport (queues in the app's database).
EMBEDDED_BROKER_URL = "db://"


class AppSettings:
    """Typed, lazily read view over ``settings.RELIABLE_EVENTS``."""

    #: Broker URL. ``None`` means: Celery's ``CELERY_BROKER_URL``, else the embedded transport.
    #: Several RabbitMQ cluster nodes: ``"amqp://h1//;amqp://h2//"`` or a list of URLs
    #: (read back as the one ``;``-separated string).
    BROKER_URL: str | None = None
    #: kombu transport options for the events connection (e.g. filesystem folders).
    BROKER_TRANSPORT_OPTIONS: dict[str, Any] = {}
    #: Name of the durable topic exchange events are published to.
    EXCHANGE: str = "events"
    #: ``"classic"`` or ``"quorum"``: the type of every queue the app declares.
    QUEUE_TYPE: str = "classic"
    #: Publish right after commit (``True``) or leave everything to the relay (``False``).
    PUBLISH_ON_COMMIT: bool = True
    #: Publish attempts before an outbox row is marked dead.
    MAX_ATTEMPTS: int = 10
    #: Largest accepted payload, in bytes of its JSON encoding (enforced on both sides).
    MAX_PAYLOAD_BYTES: int = 256 * 1024
    #: First retry delay of a failed publish, in seconds (doubled per attempt, with jitter).
    BACKOFF_BASE: float = 1.0
    #: Longest delay between two publish attempts, in seconds.
    BACKOFF_MAX: float = 300.0
    #: Rows the relay claims per batch.
    RELAY_BATCH_SIZE: int = 1000
    #: Outstanding publisher confirms allowed at once (the sliding window).
    CONFIRM_WINDOW: int = 1000
    #: Seconds the relay waits for the broker to confirm a batch.
    CONFIRM_TIMEOUT: float = 30.0
    #: Seconds ``relay_outbox`` sleeps when nothing was due.
    RELAY_IDLE_SECONDS: float = 1.0
    #: Seconds a relay's lease on a lane (and its presence) lasts unless renewed: a dead
    #: relay's lanes are taken over this long after it stopped renewing.
    RELAY_LEASE_SECONDS: float = 10.0
    #: The idle relay daemon waits for ``NOTIFY`` (``True``) or polls (``False``);
    #: ``None``: listens unless its connection goes through a pooler (PgBouncer).
    RELAY_LISTEN: bool | None = None
    #: Longest pause of the relay between two tries of a broker that is unavailable
    #: (connection refused or lost, blocked, confirm timeout), seconds.
    RELAY_BROKER_RETRY_MAX: float = 1.0
    #: Multiplies every delay of the relay's retry policy (backoff, broker retry pause,
    #: on-commit breaker, idle poll): < 1 runs the same policy on a faster clock (tests).
    TIME_SCALE: float = 1.0
    #: Number of ordering lanes; events of one key always share a lane.
    LANES: int = 64
    #: Seconds a row published by the on-commit hook is reserved for it before the relay
    #: may take it (must exceed the hook's connect + confirm timeouts).
    ON_COMMIT_GRACE_SECONDS: float = 10.0
    #: Connect timeout of the on-commit publish, seconds.
    ON_COMMIT_CONNECT_TIMEOUT: float = 0.25
    #: Confirm timeout of the on-commit publish, seconds.
    ON_COMMIT_CONFIRM_TIMEOUT: float = 1.0
    #: Seconds the on-commit publish is skipped after a broker failure (circuit breaker).
    ON_COMMIT_BREAKER_SECONDS: float = 5.0
    #: Most rows the on-commit hook publishes beyond its transaction's own: earlier pending
    #: rows of the same keys (PostgreSQL); a longer chain is a backlog left to the relay.
    ON_COMMIT_CHAIN_LIMIT: int = 100
    #: Connect timeout of relay and consumer connections, seconds.
    CONNECT_TIMEOUT: float = 5.0
    #: Days a sent outbox row is kept before ``purge_outbox`` deletes it.
    OUTBOX_RETENTION_DAYS: float = 7.0
    #: Days a ProcessedMessage record is kept (must exceed the longest retry horizon).
    PROCESSED_RETENTION_DAYS: float = 7.0
    #: Rows deleted per statement by the purge.
    PURGE_BATCH_SIZE: int = 1000
    #: Unacked messages a consumer holds at once (basic.qos prefetch); ``None``: twice the
    #: largest batch size of the consumers it runs, at least 20 (while one batch is
    #: processed, the next one is already on its way).
    PREFETCH_COUNT: int | None = None
    #: Default retry delays of consumers, seconds, one per retry.
    RETRY_DELAYS: list[float] = [1, 5, 15, 30, 60]
    #: Default ``max_retries`` of consumers.
    MAX_RETRIES: int = 5
    #: AMQP heartbeat of consumer connections, seconds (0 disables heartbeats).
    CONSUMER_HEARTBEAT: float = 60.0
    #: Longest pause between two reconnect attempts of a consumer, seconds.
    CONSUMER_RECONNECT_MAX: float = 30.0
    #: The consume loop logs (and ``consume_events`` prints) a progress line every N messages.
    CONSUMER_LOG_EVERY: int = 1000
    #: Quorum queues: a message the broker has delivered this many times (consumers died
    #: before acking it) is dead-lettered with reason ``redelivery-limit`` instead of run
    #: again.  Must stay below the queues' ``x-delivery-limit``.
    MAX_DELIVERIES: int = 50
    #: Database transport (``db://``): longest an idle consumer sleeps between two looks
    #: at its queues, seconds (PostgreSQL also wakes it at once through LISTEN/NOTIFY).
    DATABASE_POLL_MAX: float = 0.5
    #: Default ``EventConsumer.batch_size``: messages of one consumer that may share one
    #: transaction, each handler in its own savepoint (1 = a transaction per message).
    CONSUMER_BATCH_SIZE: int = 100
    #: Seconds a batch waits for more messages to arrive once it has one and nothing
    #: more has arrived yet (a trickle keeps its latency; a backlog fills the batch).
    CONSUMER_BATCH_LINGER: float = 0.002
    #: Seconds between two topology checks of a running AMQP consumer: its queue, bindings
    #: and delay queues are verified (re-declared when missing; a warning says what was)
    #: and the unrouted queue is counted (a warning names its topics).  Also done on
    #: every (re)connect.
    TOPOLOGY_CHECK_SECONDS: float = 30.0
    #: Seconds the admin overview and the API reuse the unrouted queue's depth.
    UNROUTED_CACHE_SECONDS: float = 15.0
    #: Partition queues of an ordered consumer (``EventConsumer.ordered``) unless the
    #: consumer sets ``partitions``.  Changing it moves keys between partitions: drain
    #: the queues first.
    ORDERED_PARTITIONS: int = 8
    #: Seconds between two heartbeats of a consumer process running ordered consumers;
    #: each heartbeat also recomputes its share of the partitions and releases the keys
    #: whose dead letter was retried or discarded.
    ORDERED_HEARTBEAT_SECONDS: float = 1.0
    #: Seconds without a heartbeat after which a consumer process counts as gone and its
    #: partitions are shared among the others.
    ORDERED_MEMBER_TTL: float = 5.0
    #: Consumers the Celery ``ConsumerStep`` runs (names); ``None`` = every registered one.
    CELERY_CONSUMERS: list[str] | None = None
    #: OpenTelemetry spans (``create``, ``send``, ``process``) and the W3C trace context
    #: stored with each event; only when ``opentelemetry-api`` is importable.
    TRACING: bool = True
    #: CloudEvents 1.0 on the wire: ``"off"`` (plain JSON, the default), ``"binary"``
    #: (``cloudEvents:`` attribute headers, the payload as the body) or ``"structured"``
    #: (an ``application/cloudevents+json`` envelope).  Consumers read all three.
    CLOUDEVENTS: str = "off"
    #: The CloudEvents ``source`` attribute (a URI reference); ``""`` means
    #: ``/reliable-events/<EXCHANGE>``.
    CLOUDEVENTS_SOURCE: str = ""

    #: Prometheus metrics: ``None`` = on when ``prometheus_client`` is importable.  Read
    #: once per process, at the first metric recorded or served.
    METRICS: bool | None = None
    #: Port ``relay_outbox`` and ``consume_events`` serve ``/metrics`` on (``None``: not
    #: served unless ``--metrics-port`` is given).
    METRICS_PORT: int | None = None
    #: Seconds a scrape reuses the database and broker figures of the previous one.
    METRICS_CACHE_SECONDS: float = 15.0
    #: RabbitMQ's management API (``"http://user:password@host:15672/"``; a user with
    #: the ``monitoring`` tag): queue depths then also count the messages delivered to a
    #: consumer and not yet acked.  ``None``: not asked (a passive declare counts the
    #: ready messages only).
    BROKER_MANAGEMENT_URL: str | None = None
    #: Most topics labelled in the outbox gauges; the rest are summed as ``"other"``.
    METRICS_MAX_TOPICS: int = 20
    #: Seconds between two heartbeats of a relay or consumer process (``TIME_SCALE``
    #: applies).
    HEARTBEAT_SECONDS: float = 10.0
    #: A process whose last heartbeat is older than this is not alive, seconds
    #: (``TIME_SCALE`` applies).
    HEARTBEAT_TIMEOUT_SECONDS: float = 60.0
    #: Days a heartbeat row of a stopped or vanished process is kept before
    #: ``purge_outbox`` deletes it.
    HEARTBEAT_RETENTION_DAYS: float = 1.0

    def _user_settings(self) -> dict[str, Any]:
        value = getattr(django_settings, "RELIABLE_EVENTS", None)
        return value if isinstance(value, dict) else {}

    def __getattribute__(self, name: str) -> Any:
        if name.isupper():
            user = object.__getattribute__(self, "_user_settings")()
            if name in user and not (name == "BROKER_URL" and user[name] is None):
                value = user[name]
                if name == "BROKER_URL" and isinstance(value, list | tuple):
                    return join_nodes(value)  # a list of cluster nodes: kombu's "h1;h2"
                return value
            if name == "BROKER_URL":  # unset or None: Celery's broker, else the embedded one
                return getattr(django_settings, "CELERY_BROKER_URL", None) or EMBEDDED_BROKER_URL
        return object.__getattribute__(self, name)

    def given(self, name: str) -> Any:
        """``name`` exactly as ``settings.RELIABLE_EVENTS`` gives it (``None`` if absent)."""
        return self._user_settings().get(name)

    def seconds(self, name: str) -> float:
        """The policy delay ``name`` in seconds on the relay's clock (times ``TIME_SCALE``)."""
        return float(getattr(self, name)) * float(self.TIME_SCALE)

    @classmethod
    def names(cls) -> list[str]:
        """Every setting name, in declaration order."""
        return [name for name in cls.__annotations__ if name.isupper()]

    def unknown(self) -> list[str]:
        """Keys of ``settings.RELIABLE_EVENTS`` that are not settings (likely typos)."""
        known = set(self.names())
        return sorted(key for key in self._user_settings() if key not in known)


app_settings = AppSettings()
