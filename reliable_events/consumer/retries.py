"""How does a failed message come back later? The retry schedulers (delay queue or outbox row)."""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from typing import Any

from reliable_events.broker.amqp import AmqpPublisher, AmqpTransport
from reliable_events.broker.base import (
    CONTENT_TYPE,
    KEY_HEADER,
    Delivery,
    OutgoingMessage,
    Transport,
)
from reliable_events.conf import app_settings
from reliable_events.consumer.base import Event, EventConsumer
from reliable_events.consumer.db import database_guard
from reliable_events.consumer.failures import Failure
from reliable_events.consumer.wire import (
    ATTEMPT_HEADER,
    BROKER_HEADER_PREFIXES,
    FIRST_FAILED_HEADER,
    HISTORY_HEADER,
    OUR_HEADERS,
    TOPIC_HEADER,
)
from reliable_events.exceptions import (
    BrokerError,
)
from reliable_events.outbox import hold, insert, new_row
from reliable_events.sanitize import json_safe
from reliable_events.times import as_instant

logger = logging.getLogger(__name__)


# -- retries -----------------------------------------------------------------------------
class RetryPublishFailed(BrokerError):
    """The retry could not be handed to the broker with a confirm: do not ack."""


def retry_headers(delivery: Delivery, event: Event, failure: Failure) -> dict[str, Any]:
    """The headers of the re-published message: the original ones minus what the broker
    added, plus the next attempt number, the topic and the failure history."""
    headers = {
        k: v
        for k, v in delivery.headers.items()
        if not k.startswith(BROKER_HEADER_PREFIXES) and k not in OUR_HEADERS
    }
    headers[ATTEMPT_HEADER] = event.attempt + 1
    headers[TOPIC_HEADER] = event.topic
    headers[FIRST_FAILED_HEADER] = as_instant(failure.first_failed_at).isoformat()
    headers[HISTORY_HEADER] = json.dumps(failure.history, separators=(",", ":"))
    return headers


class RetryScheduler:
    """Hands a failed message back for a later attempt."""

    def schedule(
        self,
        consumer: type[EventConsumer],
        delivery: Delivery,
        event: Event,
        failure: Failure,
        *,
        retry: int,
        delay: float,
    ) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release connections."""


class AmqpRetryScheduler(RetryScheduler):
    """Publishes to the delay queue ``<name>.retry.<n>`` and waits for the confirm."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.publisher = AmqpPublisher(url, window=1, declare_events_topology=False)

    def schedule(
        self,
        consumer: type[EventConsumer],
        delivery: Delivery,
        event: Event,
        failure: Failure,
        *,
        retry: int,
        delay: float,
    ) -> None:
        queue = consumer.retry_queue_for(retry)
        message = OutgoingMessage(
            ref=event.id,
            exchange="",
            routing_key=queue,
            body=delivery.body,
            message_id=event.id,
            topic=event.topic,
            headers=retry_headers(delivery, event, failure),
            timestamp=event.published_at,
            content_type=str(delivery.properties.get("content_type") or CONTENT_TYPE),
        )
        result = self.publisher.publish([message], timeout=float(app_settings.CONFIRM_TIMEOUT))
        if event.id not in result.confirmed:
            reasons = {**result.interrupted, **result.failed}
            reason = reasons.get(event.id) or result.broker_error or "not confirmed"
            raise RetryPublishFailed(f"retry of {event.id!r} to {queue} not confirmed: {reason}")

    def close(self) -> None:
        self.publisher.close()


class OutboxRetryScheduler(RetryScheduler):
    """Embedded transports (no TTL dead-lettering): an outbox row addressed to the
    consumer's queue, due after the delay; the relay delivers it."""

    def schedule(
        self,
        consumer: type[EventConsumer],
        delivery: Delivery,
        event: Event,
        failure: Failure,
        *,
        retry: int,
        delay: float,
    ) -> None:
        alias = consumer.get_database()
        headers = json_safe(retry_headers(delivery, event, failure))
        headers.pop(KEY_HEADER, None)  # the relay sets it from ``key``
        when = hold(alias, delay=timedelta(seconds=delay), on_commit=False)
        row = new_row(
            message_id=event.id,
            topic=event.topic or consumer.queue_name(),
            key=event.key,
            queue=consumer.queue_name(),
            payload=event.payload,
            headers=headers,
            due=when.due,
        )
        with database_guard(alias, "scheduling a retry"):
            insert(row, alias, on_commit=False)


def retry_scheduler(transport: Transport) -> RetryScheduler:
    """How this worker's retries travel: the transport's own way when it has one (the
    database transport), a delay queue on RabbitMQ, else an outbox row."""
    own = transport.make_scheduler()
    if own is not None:
        return own
    if isinstance(transport, AmqpTransport):
        return AmqpRetryScheduler(transport.url)
    return OutboxRetryScheduler()
