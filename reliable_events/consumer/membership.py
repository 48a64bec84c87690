"""Which partitions of its ordered consumers does this process take?

Each process running an ordered consumer keeps a heartbeat row
(:class:`~reliable_events.models.ConsumerMember`, every ``ORDERED_HEARTBEAT_SECONDS``);
the live processes (a heartbeat younger than ``ORDERED_MEMBER_TTL``), sorted by name,
take the partitions round-robin (partition ``i`` goes to member ``i % count``) and each
subscribes to its share only.  When a process joins or stops beating, every process
computes the new share and, if its own changed, closes its connection and subscribes
again: what it had received but not acked goes back to the queue (as when a process
dies), then the new owner - possibly already subscribed, as the broker's standby -
receives the partition.

Exclusivity never comes from this scheme but from the queues' single active consumer:
two processes that briefly disagree both subscribe, and the broker delivers to one.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Iterable, Sequence
from datetime import timedelta

from django.db import DatabaseError, InterfaceError, transaction
from django.utils import timezone

from reliable_events.conf import app_settings
from reliable_events.consumer.base import EventConsumer
from reliable_events.consumer.partitions import partition_queues
from reliable_events.models import ConsumerMember

logger = logging.getLogger(__name__)


def member_name() -> str:
    return f"{socket.gethostname()[:60]}:{os.getpid()}:{secrets.token_hex(4)}"


class PartitionShare:
    """This process's share of the partitions of its ordered consumers.

    Until the first heartbeat (or while the database cannot be reached) the share is
    every partition: single active consumer still gives each to one process only.
    """

    def __init__(self, consumers: Iterable[type[EventConsumer]]) -> None:
        self.consumers = [cls for cls in consumers if cls.ordered]
        self.member = member_name()
        self.shares: dict[str, list[str]] = {
            cls.name: partition_queues(cls) for cls in self.consumers
        }
        self._next = 0.0

    def queues(self, cls: type[EventConsumer]) -> list[str]:
        return self.shares.get(cls.name, partition_queues(cls))

    def due(self) -> bool:
        return bool(self.consumers) and time.monotonic() >= self._next

    def heartbeat(self) -> bool:
        """Beat, and recompute the share; whether it changed (resubscribe then)."""
        self._next = time.monotonic() + float(app_settings.ORDERED_HEARTBEAT_SECONDS)
        changed = False
        for cls in self.consumers:
            try:
                members = self._beat(cls)
            except (DatabaseError, InterfaceError) as exc:
                logger.warning(
                    "reliable_events: %s: partition heartbeat failed (%s); keeping %d partition(s)",
                    cls.name,
                    type(exc).__name__,
                    len(self.queues(cls)),
                )
                continue
            share = assign(partition_queues(cls), members, self.member)
            if share != self.shares.get(cls.name):
                logger.info(
                    "reliable_events: %s: %d process(es); this one takes %s",
                    cls.name,
                    len(members),
                    ", ".join(share) or "no partition (standby)",
                )
                self.shares[cls.name] = share
                changed = True
        return changed

    def _beat(self, cls: type[EventConsumer]) -> list[str]:
        alias = cls.get_database()
        now = timezone.now()
        ttl = timedelta(seconds=float(app_settings.ORDERED_MEMBER_TTL))
        rows = ConsumerMember.objects.using(alias)
        with transaction.atomic(using=alias):
            if not rows.filter(consumer=cls.name, member=self.member).update(heartbeat_at=now):
                rows.create(consumer=cls.name, member=self.member, heartbeat_at=now)
            rows.filter(consumer=cls.name, heartbeat_at__lt=now - ttl * 10).delete()
        return sorted(
            rows.filter(consumer=cls.name, heartbeat_at__gte=now - ttl).values_list(
                "member", flat=True
            )
        )

    def leave(self) -> None:
        """Delete this process's heartbeat rows (a clean stop hands over at once)."""
        for cls in self.consumers:
            try:
                ConsumerMember.objects.using(cls.get_database()).filter(
                    consumer=cls.name, member=self.member
                ).delete()
            except (DatabaseError, InterfaceError):
                logger.debug("reliable_events: could not delete the heartbeat", exc_info=True)


def assign(queues: Sequence[str], members: Sequence[str], member: str) -> list[str]:
    """``member``'s partitions: partition ``i`` goes to ``members[i % len(members)]``."""
    if member not in members:
        return list(queues)
    index = list(members).index(member)
    return [queue for i, queue in enumerate(queues) if i % len(members) == index]
