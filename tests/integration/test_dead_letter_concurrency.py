"""Two workers dead-letter copies of one message at the same moment (PostgreSQL).

At-least-once delivery means two consumer processes can hold two copies of one message;
when its handler fails permanently both write its dead letter at once.  There must be
one open dead letter per consumer and message id, not two (found by the ledger work:
without a lock both transactions saw "no open letter" and inserted) — also in a project
whose default isolation level is REPEATABLE READ or SERIALIZABLE (where the second
snapshot predated the lock: two open letters, or a serialization failure reported as the
database being unavailable).
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from django.db import connections
from django.utils import timezone

from reliable_events.consumer.failures import DeadLetterRecord, Failure, write_dead_letter
from reliable_events.consumer.wire import PERMANENT_ERROR
from reliable_events.models import DeadLetter
from tests.support.consumer_support import make_consumer

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.postgres]

ROUNDS = 20


@pytest.mark.parametrize("level", ["default", "REPEATABLE_READ", "SERIALIZABLE"])
def test_concurrent_dead_letters_of_one_message_make_one_open_letter(
    clean_registry: Any, project_isolation: Any, level: str
) -> None:
    project_isolation(None if level == "default" else level)
    consumer = make_consumer(clean_registry)
    errors: list[BaseException] = []

    def dead_letter(message_id: str, barrier: threading.Barrier, attempt: int) -> None:
        try:
            barrier.wait(10)
            now = timezone.now()
            write_dead_letter(
                "default",
                DeadLetterRecord(
                    consumer=consumer.name,
                    queue=consumer.queue_name(),
                    message_id=message_id,
                    body=b"{}",
                    headers={},
                    reason=PERMANENT_ERROR,
                    payload={},
                    raw_body="",
                    topic="orders.created",
                    key=None,
                    failure=Failure(
                        attempt=attempt,
                        at=now,
                        error_type="app.Error",
                        error_message="failed for good",
                        traceback="",
                        fingerprint="fp",
                        history=[],
                        first_failed_at=now,
                    ),
                ),
            )
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            connections.close_all()

    for n in range(ROUNDS):
        barrier = threading.Barrier(2)
        threads = [
            threading.Thread(target=dead_letter, args=(f"m-{n}", barrier, attempt))
            for attempt in (1, 2)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert not errors, errors[0]
    counts = {
        f"m-{n}": DeadLetter.objects.filter(consumer=consumer.name, message_id=f"m-{n}").count()
        for n in range(ROUNDS)
    }
    assert counts == {f"m-{n}": 1 for n in range(ROUNDS)}
    assert set(DeadLetter.objects.values_list("status", flat=True)) == {DeadLetter.Status.OPEN}
