"""Typed exceptions raised by reliable_events.

Every error message is safe to log: none carries a broker password or a payload.
"""

from __future__ import annotations


class ReliableEventsError(Exception):
    """Base class of every exception raised by reliable_events."""


class InvalidEvent(ReliableEventsError, ValueError):
    """``publish_event`` was given bad input; nothing was written."""


class ConfigurationError(ReliableEventsError):
    """The ``RELIABLE_EVENTS`` settings are inconsistent or unusable."""


class BrokerError(ReliableEventsError):
    """The broker could not be reached, or refused or failed to confirm a publish."""


class ConfirmTimeout(BrokerError):
    """The broker did not confirm a publish in time; the message may or may not be stored."""


class PublishNacked(BrokerError):
    """The broker answered ``basic.nack``: it did not store the message."""


class PermanentError(ReliableEventsError):
    """Raised by a consumer's ``handle``: dead-letter the event at once, no retry."""


class PoisonMessage(ReliableEventsError):
    """A delivered message cannot be turned into an event (bad body, headers or size)."""


class UnknownConsumer(ReliableEventsError, LookupError):
    """No registered consumer has that name."""


class DeadLetterStateError(ReliableEventsError):
    """A dead letter cannot move to the requested state (e.g. retrying a discarded one)."""


class DatabaseUnavailable(ReliableEventsError):
    """The database failed under a consumer (connection lost): do not ack, wait, redo."""
