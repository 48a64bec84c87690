"""Deprecated: the consume loop moved to the :mod:`reliable_events.consumer` package.

This module only re-exports the names it used to define, so that existing imports
(``from reliable_events.consuming import Worker``) keep working.  New code imports from
the module that answers its question: :mod:`reliable_events.consumer.worker` (the
``Worker``), :mod:`~reliable_events.consumer.wire` (headers, poison reasons, decoding),
:mod:`~reliable_events.consumer.failures` (failure details, dead letters),
:mod:`~reliable_events.consumer.retries`, :mod:`~reliable_events.consumer.processor` and
:mod:`~reliable_events.consumer.db`; the consuming transports are in
:mod:`reliable_events.broker`, text cleaning in :mod:`reliable_events.sanitize`.
"""

from __future__ import annotations

from reliable_events.broker.amqp import AmqpTransport
from reliable_events.broker.base import POLL_SECONDS, Delivery, Transport, undecodable_delivery
from reliable_events.broker.connect import open_transport
from reliable_events.broker.kombu import KombuTransport
from reliable_events.consumer.db import (
    close_all_connections,
    close_stale_connections,
    database_answers,
    database_guard,
)
from reliable_events.consumer.failures import (
    DeadLetterRecord,
    Failure,
    application_frame,
    error_type_name,
    fingerprint,
    write_dead_letter,
)
from reliable_events.consumer.processor import Processor
from reliable_events.consumer.retries import (
    AmqpRetryScheduler,
    OutboxRetryScheduler,
    RetryPublishFailed,
    RetryScheduler,
    retry_headers,
)
from reliable_events.consumer.wire import (
    ATTEMPT_HEADER,
    BAD_ATTEMPT_HEADER,
    BAD_MESSAGE_ID,
    DELIVERY_COUNT_HEADER,
    FIRST_FAILED_HEADER,
    HISTORY_HEADER,
    HISTORY_LIMIT,
    JSON_CONTENT_TYPES,
    MAX_ATTEMPT,
    NO_MESSAGE_ID,
    NOT_JSON,
    PERMANENT_ERROR,
    POISON_REASONS,
    REDELIVERY_LIMIT,
    RETRIES_EXHAUSTED,
    TOO_LARGE,
    TOPIC_HEADER,
    UNDECODABLE,
    UTF8_ENCODINGS,
    WRONG_CONTENT_TYPE,
    Poison,
    decode_event,
    decode_payload,
    event_topic,
    log_duplicate,
    log_redelivery,
    parse_attempt,
    read_first_failed,
    read_history,
)
from reliable_events.consumer.worker import BATCH_MAX_SECONDS, Worker, WorkerStats
from reliable_events.sanitize import RAW_BODY_LIMIT, clean_text, error_summary, json_safe, raw_text

__all__ = [
    "ATTEMPT_HEADER",
    "BAD_ATTEMPT_HEADER",
    "BAD_MESSAGE_ID",
    "BATCH_MAX_SECONDS",
    "DELIVERY_COUNT_HEADER",
    "FIRST_FAILED_HEADER",
    "HISTORY_HEADER",
    "HISTORY_LIMIT",
    "JSON_CONTENT_TYPES",
    "MAX_ATTEMPT",
    "NOT_JSON",
    "NO_MESSAGE_ID",
    "PERMANENT_ERROR",
    "POISON_REASONS",
    "POLL_SECONDS",
    "RAW_BODY_LIMIT",
    "REDELIVERY_LIMIT",
    "RETRIES_EXHAUSTED",
    "TOO_LARGE",
    "TOPIC_HEADER",
    "UNDECODABLE",
    "UTF8_ENCODINGS",
    "WRONG_CONTENT_TYPE",
    "AmqpRetryScheduler",
    "AmqpTransport",
    "DeadLetterRecord",
    "Delivery",
    "Failure",
    "KombuTransport",
    "OutboxRetryScheduler",
    "Poison",
    "Processor",
    "RetryPublishFailed",
    "RetryScheduler",
    "Transport",
    "Worker",
    "WorkerStats",
    "application_frame",
    "clean_text",
    "close_all_connections",
    "close_stale_connections",
    "database_answers",
    "database_guard",
    "decode_event",
    "decode_payload",
    "error_summary",
    "error_type_name",
    "event_topic",
    "fingerprint",
    "json_safe",
    "log_duplicate",
    "log_redelivery",
    "open_transport",
    "parse_attempt",
    "raw_text",
    "read_first_failed",
    "read_history",
    "retry_headers",
    "undecodable_delivery",
    "write_dead_letter",
]
