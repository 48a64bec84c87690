"""The consumer of the ledger test (``tests/integration/test_ledger.py``).

Defined only when ``RE_TEST_LEDGER_CONSUMER`` is set (a JSON object: ``name``,
``topics``, ``max_retries``, ``retry_delays``), so it never shows up in other tests'
registries.  The ledger test runs it in ``manage.py consume_events`` child processes.

Each event is applied as one :class:`~tests.testapp.models.Effect` row (unique per
consumer and message id), recording the attempt and the ``redelivered`` flag it was
applied with.  The payload's ``fail`` designs the failures:

* ``"permanent"``: raise :class:`~reliable_events.exceptions.PermanentError` (dead letter);
* ``"once"``: raise on attempt 1, apply on the retry;
* ``"slow"``: apply after :data:`SLOW_SECONDS` inside the transaction.

The effect also records the span the handler ran in (the trace checks of the ledger).

A second application of one id is never absorbed silently: the unique ``Effect`` row
refuses it and the handler turns that into a ``PermanentError`` whose dead letter the
ledger reports as an undesigned failure.
"""

from __future__ import annotations

import json
import os
import sys
import time

from django.db import IntegrityError, transaction
from opentelemetry import trace

from reliable_events.consumer import Event, EventConsumer
from reliable_events.exceptions import PermanentError
from tests.testapp.models import Effect, KeySequence

LEDGER_CONSUMER_ENV = "RE_TEST_LEDGER_CONSUMER"
#: The ordered ledger's consumer (``tests/integration/test_ordered_ledger.py``): a JSON
#: object (``name``, ``topics``, ``partitions``).
ORDERED_CONSUMER_ENV = "RE_TEST_ORDERED_CONSUMER"
#: Text of the error a second application raises (searched for by the ledger test).
APPLIED_TWICE = "APPLIED TWICE"
#: Printed (flushed) right before the effect is written: a message id printed more often
#: than it was applied had its transaction cut short (a kill) and was claimed again.
APPLYING = "ledger: applying"
#: Pause of a ``"slow"`` event inside the handler's transaction, seconds.
SLOW_SECONDS = 0.5


def apply_ledger_event(consumer: str, event: Event) -> None:
    """What the ledger consumer's ``handle`` does (inside its transaction)."""
    payload = event.payload if isinstance(event.payload, dict) else {}
    fail = payload.get("fail")
    if fail == "permanent":
        raise PermanentError(f"designed permanent failure of {event.id}")
    if fail == "once" and event.attempt == 1:
        raise RuntimeError(f"designed transient failure of {event.id} (attempt 1)")
    sys.stdout.write(f"{APPLYING} {event.id}\n")
    sys.stdout.flush()
    if fail == "slow":
        time.sleep(SLOW_SECONDS)
    try:
        with transaction.atomic():
            Effect.objects.create(
                consumer=consumer,
                message_id=event.id,
                payload={
                    "event": payload,
                    "attempt": event.attempt,
                    "redelivered": event.redelivered,
                    "trace": current_span(),
                },
            )
    except IntegrityError as exc:
        raise PermanentError(f"{APPLIED_TWICE}: {event.id} already has an effect") from exc


def current_span() -> dict[str, str]:
    """The span the handler runs in (the consumer's ``process`` span), in the format of
    the SDK's JSON export; stored with the effect, so it survives any kill."""
    context = trace.get_current_span().get_span_context()
    return {"trace_id": f"0x{context.trace_id:032x}", "span_id": f"0x{context.span_id:016x}"}


_SPEC = os.environ.get(LEDGER_CONSUMER_ENV)

if _SPEC:
    _CONFIG = json.loads(_SPEC)

    class LedgerConsumer(EventConsumer):
        name = str(_CONFIG["name"])
        topics = list(_CONFIG["topics"])
        max_retries = _CONFIG.get("max_retries")
        retry_delays = _CONFIG.get("retry_delays")
        batch_size = _CONFIG.get("batch_size")

        def handle(self, event: Event) -> None:
            apply_ledger_event(self.name, event)


def apply_ordered_event(consumer: str, event: Event) -> None:
    """The ordered ledger's handler: check ``seq`` against the key's last applied one
    (row lock) and record both in the effect (``prev``: what was applied before)."""
    payload = event.payload if isinstance(event.payload, dict) else {}
    row = KeySequence.objects.select_for_update().get(consumer=consumer, key=event.key)
    previous = row.seq
    row.seq = int(payload["seq"])
    row.save(update_fields=["seq"])
    try:
        with transaction.atomic():
            Effect.objects.create(
                consumer=consumer,
                message_id=event.id,
                payload={
                    "key": event.key,
                    "seq": row.seq,
                    "prev": previous,
                    "pid": os.getpid(),
                    "at": time.time(),
                    "redelivered": event.redelivered,
                },
            )
    except IntegrityError as exc:
        raise PermanentError(f"{APPLIED_TWICE}: {event.id} already has an effect") from exc


_ORDERED_SPEC = os.environ.get(ORDERED_CONSUMER_ENV)

if _ORDERED_SPEC:
    _ORDERED = json.loads(_ORDERED_SPEC)

    class OrderedLedgerConsumer(EventConsumer):
        name = str(_ORDERED["name"])
        topics = list(_ORDERED["topics"])
        ordered = True
        partitions = _ORDERED.get("partitions")

        def handle(self, event: Event) -> None:
            apply_ordered_event(self.name, event)
