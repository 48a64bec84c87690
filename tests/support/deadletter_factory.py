"""Build DeadLetter / OutboxMessage rows the way the consumer loop and relay leave them."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from django.contrib.auth.models import Permission, User
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from reliable_events.models import DeadLetter, OutboxMessage

TRACEBACK = """Traceback (most recent call last):
  File "/app/billing/consumers.py", line 42, in handle
    charge(event.payload["order_id"])
  File "/app/billing/gateway.py", line 7, in charge
    raise GatewayDown("card gateway timed out after 5s")
billing.gateway.GatewayDown: card gateway timed out after 5s
"""


def dead_letter(save: bool = True, **overrides: Any) -> DeadLetter:
    now = timezone.now()
    fields: dict[str, Any] = {
        "consumer": "billing.charge",
        "queue": "billing.charge",
        "message_id": str(uuid.uuid4()),
        "topic": "orders.created",
        "key": "order-42",
        "payload": {"order_id": 42, "lines": [{"sku": "A-1", "qty": 2}], "note": "gift"},
        "headers": {"source": "shop"},
        "reason": "retries-exhausted",
        "error_type": "billing.gateway.GatewayDown",
        "error_message": "card gateway timed out after 5s",
        "traceback": TRACEBACK,
        "fingerprint": "fp-gateway",
        "attempts": 3,
        "history": [
            {
                "attempt": n,
                "at": (now - timedelta(seconds=10 - n)).isoformat(),
                "error": "GatewayDown",
            }
            for n in (1, 2, 3)
        ],
        "first_failed_at": now - timedelta(seconds=10),
        "last_failed_at": now,
    }
    fields.update(overrides)
    letter = DeadLetter(**fields)
    if save:
        letter.save()
    return letter


def many_dead_letters(count: int, **overrides: Any) -> list[DeadLetter]:
    rows = []
    for index in range(count):
        extra = {
            "consumer": f"consumer-{index % 4}",
            "queue": f"consumer-{index % 4}",
            "fingerprint": f"fp-{index % 7}",
            "error_type": f"app.errors.Error{index % 7}",
            "topic": f"topic.{index % 5}",
        }
        extra.update(overrides)
        rows.append(dead_letter(save=False, **extra))
    return DeadLetter.objects.bulk_create(rows)


def outbox_row(**overrides: Any) -> OutboxMessage:
    fields: dict[str, Any] = {
        "message_id": str(uuid.uuid4()),
        "topic": "orders.created",
        "payload": {"order_id": 1},
        "next_attempt_at": timezone.now(),
    }
    fields.update(overrides)
    return OutboxMessage.objects.create(**fields)


#: Every permission of the app's admin and API.
EVERY_PERMISSION = (
    "view_deadletter",
    "retry_deadletter",
    "discard_deadletter",
    "view_outboxmessage",
    "change_outboxmessage",
    "edit_deadletter",
)


def admin_client(user: User) -> Client:
    """A client of the admin pages logged in as ``user``."""
    client = Client()
    client.force_login(user)
    return client


def api_client(user: User) -> APIClient:
    """A client of the API authenticated as ``user``."""
    client = APIClient()
    client.force_authenticate(user)
    return client


def staff_user(username: str, *codenames: str) -> User:
    user = User.objects.create_user(username, password="pw", is_staff=True)
    if codenames:
        user.user_permissions.set(
            Permission.objects.filter(
                content_type__app_label="reliable_events", codename__in=codenames
            )
        )
    return user


def at_hour(hours_ago: int, minute: int = 30) -> datetime:
    """An instant ``hours_ago`` hours before the current UTC hour, at ``minute``."""
    base = timezone.now().replace(minute=0, second=0, microsecond=0)
    return base - timedelta(hours=hours_ago) + timedelta(minutes=minute)
