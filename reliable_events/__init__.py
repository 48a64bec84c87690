"""reliable_events: no event lost between a transaction and its consumers.

Importable before ``django.setup()``: nothing here touches models or settings until called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datetime import timedelta

    from reliable_events.models import OutboxMessage

__all__ = ["publish_event"]
__version__ = "0.1.0"


def publish_event(
    topic: str,
    payload: Any,
    *,
    key: str | None = None,
    headers: dict[str, str] | None = None,
    message_id: str | None = None,
    delay: float | timedelta | None = None,
    using: str | None = None,
) -> OutboxMessage:
    """Store an event in the outbox, in the caller's transaction.

    See :func:`reliable_events.publishing.publish_event` for the full contract.
    """
    # Lazy: the package must import before Django's apps are loaded (settings, Celery).
    from reliable_events.publishing import publish_event as _publish_event

    return _publish_event(
        topic,
        payload,
        key=key,
        headers=headers,
        message_id=message_id,
        delay=delay,
        using=using,
    )
