"""Django admin for triage: dead letters, the outbox, processed and queued messages.

Everything here is read-only over the rows the system owns; the only changes staff can
make go through the same services as the management commands
(:mod:`reliable_events.deadletters`, :func:`reliable_events.relay.retry_dead`).  One
module per admin:

- :mod:`~reliable_events.admin.base`: helpers, list filters and the read-only base admin.
- :mod:`~reliable_events.admin.deadletters`: dead letters (triage) and the overview page.
- :mod:`~reliable_events.admin.triage`: timeline, edit and retry, audit history pages.
- :mod:`~reliable_events.admin.holds`: held keys and parked events of ordered consumers.
- :mod:`~reliable_events.admin.outbox`, :mod:`~reliable_events.admin.processed`,
  :mod:`~reliable_events.admin.queued`: the other tables.

Importing this package registers the admins (Django's admin autodiscovery does).
"""

from __future__ import annotations

from reliable_events.admin.base import pretty_json
from reliable_events.admin.deadletters import DeadLetterAdmin
from reliable_events.admin.holds import KeyHoldAdmin, ParkedEventAdmin
from reliable_events.admin.outbox import OutboxMessageAdmin
from reliable_events.admin.processed import ProcessedMessageAdmin
from reliable_events.admin.queued import QueuedMessageAdmin

__all__ = [
    "DeadLetterAdmin",
    "KeyHoldAdmin",
    "OutboxMessageAdmin",
    "ParkedEventAdmin",
    "ProcessedMessageAdmin",
    "QueuedMessageAdmin",
    "pretty_json",
]
