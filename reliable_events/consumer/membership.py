"""Which partitions of its ordered consumers does this process take?

Each process running an ordered consumer keeps a heartbeat row
(:class:`~reliable_events.models.ConsumerMember`, every ``ORDERED_HEARTBEAT_SECONDS``);
the live processes (a heartbeat younger than ``ORDERED_MEMBER_TTL``) share the
partitions evenly by bounded rendezvous hashing (:func:`assign`), and each subscribes to
its share only.  When a process joins or stops beating, every process
computes the new share; one whose share changed closes its connection and subscribes
again to its new share: the broker puts back what it had received but not acked (as
when a process dies) before it activates the next owner of a partition it left -
possibly already subscribed, as the partition's standby.

Exclusivity never comes from this scheme but from the queues' single active consumer:
two processes that briefly disagree both subscribe, and the broker delivers to one.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
import zlib
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
        #: The live members each consumer had at the last beat.
        self._members: dict[str, set[str]] = {}

    def queues(self, cls: type[EventConsumer]) -> list[str]:
        return self.shares.get(cls.name, partition_queues(cls))

    def due(self) -> bool:
        return bool(self.consumers) and time.monotonic() >= self._next

    def heartbeat(self) -> tuple[bool, dict[str, list[str]]]:
        """Beat, and recompute the share: whether a partition was lost, and the
        partitions gained (either way the worker subscribes again)."""
        self._next = time.monotonic() + float(app_settings.ORDERED_HEARTBEAT_SECONDS)
        lost = False
        gained: dict[str, list[str]] = {}
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
            self._warn_of_silent(cls, members)
            share = assign(partition_queues(cls), members, self.member)
            before = self.queues(cls)
            if share != before:
                logger.info(
                    "reliable_events: %s: %d process(es); this one takes %s",
                    cls.name,
                    len(members),
                    ", ".join(share) or "no partition (standby)",
                )
                self.shares[cls.name] = share
                lost = lost or bool(set(before) - set(share))
                gained[cls.name] = [queue for queue in share if queue not in before]
        return lost, gained

    def _warn_of_silent(self, cls: type[EventConsumer], members: list[str]) -> None:
        """A process that was live at the last beat and is gone now without leaving
        (its row is there, stale): killed, or frozen with its connection still open."""
        before = self._members.get(cls.name, set())
        self._members[cls.name] = set(members)
        vanished = before - set(members)
        if not vanished:
            return
        rows = ConsumerMember.objects.using(cls.get_database())
        for member in sorted(
            rows.filter(consumer=cls.name, member__in=vanished).values_list("member", flat=True)
        ):
            logger.warning(
                "reliable_events: %s: process %s stopped beating without leaving (killed, "
                "or frozen): its partitions go to the others, but a frozen one keeps them "
                "until the broker drops its connection (up to twice CONSUMER_HEARTBEAT)",
                cls.name,
                member,
            )

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
    """``member``'s partitions.

    Rendezvous hashing with a bound: each partition, in order, goes to the member that
    ranks it highest (``crc32(member|partition)``) among those holding fewer than
    ``ceil(partitions / members)``.  Every process computes the same answer from the
    same member list, and a member joining or leaving moves few partitions.
    """
    if member not in members:
        return list(queues)
    bound = -(-len(queues) // len(members))
    load = dict.fromkeys(members, 0)
    mine = []
    for queue in queues:
        ranked = sorted(members, key=lambda m: zlib.crc32(f"{m}|{queue}".encode()), reverse=True)
        owner = next(m for m in ranked if load[m] < bound)
        load[owner] += 1
        if owner == member:
            mine.append(queue)
    return mine
