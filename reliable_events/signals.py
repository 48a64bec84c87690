"""Signals sent by reliable_events (for observability and test helpers; no logic here)."""

from __future__ import annotations

from django.dispatch import Signal

#: Sent after ``publish_event`` stored a row. kwargs: ``message``, ``using``.
event_stored = Signal()
#: Sent after a batch was confirmed by the broker. kwargs: ``ids``, ``using``.
events_sent = Signal()
#: Sent after a consumer dead-lettered a message. kwargs: ``dead_letter``.
event_dead_lettered = Signal()
