"""What happens to one delivery? Decode, process, then retry or dead-letter (no ack)."""

from __future__ import annotations

import logging
from typing import Any

from django.db import transaction
from django.utils import timezone

from reliable_events import cloudevents, tracing
from reliable_events.broker.base import KEY_HEADER, Delivery
from reliable_events.conf import app_settings
from reliable_events.consumer.base import Event, EventConsumer, HandlerResult, Outcome
from reliable_events.consumer.db import database_guard
from reliable_events.consumer.failures import (
    DeadLetterRecord,
    Failure,
    error_type_name,
    fingerprint,
    write_dead_letter,
)
from reliable_events.consumer.holds import hold_key, holds_keys, is_held, park
from reliable_events.consumer.ordering import InPlaceRetries
from reliable_events.consumer.retries import RetryScheduler
from reliable_events.consumer.wire import (
    ATTEMPT_HEADER,
    DELIVERY_COUNT_HEADER,
    PERMANENT_ERROR,
    REDELIVERY_LIMIT,
    RETRIES_EXHAUSTED,
    Poison,
    decode_event,
    event_topic,
    log_duplicate,
    parse_attempt,
    read_first_failed,
    read_history,
)
from reliable_events.exceptions import (
    PoisonMessage,
)
from reliable_events.sanitize import clean_text, raw_text

logger = logging.getLogger(__name__)


# -- processing one delivery -------------------------------------------------------------
class Processor:
    """Turns one delivery into an outcome (everything but the ack); transport-agnostic."""

    def __init__(self, consumers: dict[str, EventConsumer], scheduler: RetryScheduler) -> None:
        self.consumers = consumers
        self.scheduler = scheduler
        # Read once per worker (not per message); a restarted worker sees new values.
        self.max_bytes = int(app_settings.MAX_PAYLOAD_BYTES)
        self.exchange = str(app_settings.EXCHANGE)
        self.max_deliveries = int(app_settings.MAX_DELIVERIES)
        self.in_place = InPlaceRetries()

    def decode(self, delivery: Delivery) -> Event | None:
        """The event, or ``None`` when the delivery needs :meth:`process` on its own (it is
        poison, or was delivered too often)."""
        try:
            event = decode_event(delivery, max_bytes=self.max_bytes, exchange=self.exchange)
        except Poison:
            return None
        count = delivery.headers.get(DELIVERY_COUNT_HEADER)
        if isinstance(count, int) and not isinstance(count, bool) and count >= self.max_deliveries:
            return None
        cls = type(self.consumers[delivery.consumer])
        if holds_keys(cls, event) and is_held(cls, str(event.key)):
            return None  # parked by process()
        return event

    @tracing.traced_process
    def process(self, delivery: Delivery) -> tuple[Outcome, HandlerResult | None]:
        """Decode, run and settle ``delivery``; the caller acks unless this raises.

        Raises :class:`DatabaseUnavailable` (leave it unacked, wait, try again),
        :class:`RetryPublishFailed` (reject it back to its queue) and, for an ordered
        consumer, :class:`~reliable_events.consumer.ordering.RetryInPlace` (keep it,
        wait, process it again).
        """
        if not type(self.consumers[delivery.consumer]).ordered:
            return self._process(delivery)
        delivery = self.in_place.current(delivery)
        settled = self._process(delivery)
        self.in_place.settled(delivery)
        return settled

    def _process(self, delivery: Delivery) -> tuple[Outcome, HandlerResult | None]:
        consumer = self.consumers[delivery.consumer]
        cls = type(consumer)
        try:
            event = decode_event(delivery, max_bytes=self.max_bytes, exchange=self.exchange)
        except Poison as poison:
            self._poison(cls, delivery, poison)
            return Outcome.POISON, None
        count = delivery.headers.get(DELIVERY_COUNT_HEADER)
        if isinstance(count, int) and not isinstance(count, bool) and count >= self.max_deliveries:
            self._redelivery_limit(cls, delivery, event, count)
            return Outcome.DEAD_LETTERED, None
        if holds_keys(cls, event) and is_held(cls, str(event.key)) and park(cls, event):
            return Outcome.PARKED, None
        result = consumer.process(event)
        if result.outcome is Outcome.DUPLICATE:
            log_duplicate(cls.name, event.id)
        if result.outcome is not Outcome.FAILED:
            return result.outcome, result
        return self.fail(delivery, event, result)

    def fail(
        self, delivery: Delivery, event: Event, result: HandlerResult
    ) -> tuple[Outcome, HandlerResult]:
        """``event``'s handler failed (``result``, everything it did rolled back): schedule
        its retry, or dead-letter it when it is permanent or out of retries.  Raises like
        :meth:`process`."""
        cls = type(self.consumers[delivery.consumer])
        failure = Failure.from_result(result, event, delivery.headers)
        max_retries = cls.get_max_retries()
        if result.permanent or event.attempt > max_retries:
            reason = PERMANENT_ERROR if result.permanent else RETRIES_EXHAUSTED
            logger.error(
                "reliable_events: %s dead-lettered %s after %d attempt(s) (%s): %s",
                cls.name,
                event.id,
                event.attempt,
                reason,
                failure.history[-1]["error"],
            )
            self._dead_letter(cls, delivery, event, failure, reason)
            return Outcome.DEAD_LETTERED, result
        delay = cls.delay_for(event.attempt)
        if not cls.ordered:
            self.scheduler.schedule(cls, delivery, event, failure, retry=event.attempt, delay=delay)
        logger.warning(
            "reliable_events: %s failed on %s (attempt %d of %d), retrying %sin %gs: %s",
            cls.name,
            event.id,
            event.attempt,
            max_retries + 1,
            "in place " if cls.ordered else "",
            delay,
            failure.history[-1]["error"],
        )
        if cls.ordered:
            self.in_place.failed(delivery, event, failure, delay)
        return Outcome.RETRIED, result

    def _dead_letter(
        self,
        cls: type[EventConsumer],
        delivery: Delivery,
        event: Event,
        failure: Failure,
        reason: str,
    ) -> None:
        self._write_holding(
            cls,
            event.key,
            _record(cls, delivery, reason, event.payload, "", event.topic, event.key, failure),
        )

    def _write_holding(
        self, cls: type[EventConsumer], key: str | None, record: DeadLetterRecord
    ) -> None:
        """Write the dead letter; an ordered consumer holding keys holds ``key`` behind it
        in the same transaction.  Raises :class:`DatabaseUnavailable` when the database
        is gone, also when it fails as the transaction ends (Django reconnects then)."""
        alias = cls.get_database()
        with database_guard(alias, "writing a dead letter"), transaction.atomic(using=alias):
            hold_key(alias, cls, key, write_dead_letter(alias, record))

    def _poison(self, cls: type[EventConsumer], delivery: Delivery, poison: Poison) -> None:
        delivery = cloudevents.identified(delivery)
        now = timezone.now()
        try:
            attempt = parse_attempt(delivery.headers.get(ATTEMPT_HEADER))
        except Poison:
            attempt = 1
        key = delivery.headers.get(KEY_HEADER)
        logger.error(
            "reliable_events: %s dead-lettered a poison message %r: %s",
            cls.name,
            clean_text(delivery.message_id, 100),
            poison,
        )
        failure = Failure(
            attempt=attempt,
            at=now,
            error_type=error_type_name(PoisonMessage("")),
            error_message=clean_text(poison.detail, 10_000),
            traceback="",
            fingerprint=fingerprint(poison.reason, cls.name),
            history=[{"attempt": attempt, "at": now.isoformat(), "error": str(poison)[:300]}],
            first_failed_at=now,
        )
        write_dead_letter(
            cls.get_database(),
            _record(
                cls,
                delivery,
                poison.reason,
                poison.payload,
                "" if poison.payload is not None else raw_text(delivery.body),
                event_topic(delivery, str(app_settings.EXCHANGE)),
                key if isinstance(key, str) else None,
                failure,
            ),
        )

    def _redelivery_limit(
        self, cls: type[EventConsumer], delivery: Delivery, event: Event, count: int
    ) -> None:
        now = timezone.now()
        detail = (
            f"the broker delivered it {count} times without an ack (consumers crashed or "
            f"lost their connection while handling it); MAX_DELIVERIES is "
            f"{app_settings.MAX_DELIVERIES}"
        )
        logger.error("reliable_events: %s dead-lettered %s: %s", cls.name, event.id, detail)
        failure = Failure(
            attempt=event.attempt,
            at=now,
            error_type="",
            error_message=detail,
            traceback="",
            fingerprint=fingerprint(REDELIVERY_LIMIT, cls.name),
            history=[
                *read_history(delivery.headers),
                {"attempt": event.attempt, "at": now.isoformat(), "error": detail[:300]},
            ],
            first_failed_at=read_first_failed(delivery.headers) or now,
        )
        self._write_holding(
            cls,
            event.key,
            _record(
                cls, delivery, REDELIVERY_LIMIT, event.payload, "", event.topic, event.key, failure
            ),
        )


def _record(
    cls: type[EventConsumer],
    delivery: Delivery,
    reason: str,
    payload: Any,
    raw_body: str,
    topic: str,
    key: str | None,
    failure: Failure,
) -> DeadLetterRecord:
    """The dead letter of ``delivery`` for consumer ``cls`` (the delivery's own values)."""
    return DeadLetterRecord(
        consumer=cls.name,
        queue=cls.queue_of(delivery.headers),
        message_id=delivery.message_id,
        body=delivery.body,
        headers=delivery.headers,
        reason=reason,
        payload=payload,
        raw_body=raw_body,
        topic=topic,
        key=key,
        failure=failure,
    )
