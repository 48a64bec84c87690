"""How processes share an ordered consumer's partitions (bounded rendezvous hashing)."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from reliable_events.consumer.membership import PartitionShare, assign
from reliable_events.consumer.partitions import partition_queues
from reliable_events.models import ConsumerMember
from reliable_events.topology import BUCKET_HEADER
from tests.support.consumer_support import make_consumer

QUEUES = [f"c.p{i}" for i in range(8)]


def shares(members: list[str]) -> dict[str, list[str]]:
    return {member: assign(QUEUES, members, member) for member in members}


def test_every_partition_has_exactly_one_owner_and_shares_are_even() -> None:
    for count in range(1, 10):
        members = sorted(f"host:{n}:x" for n in range(count))
        taken = [queue for share in shares(members).values() for queue in share]
        assert sorted(taken) == sorted(QUEUES)
        assert max(len(share) for share in shares(members).values()) == -(-8 // count)


def test_a_process_not_yet_counted_takes_every_partition() -> None:
    assert assign(QUEUES, ["a", "b"], "c") == QUEUES


def test_a_member_leaving_moves_only_some_partitions() -> None:
    before = shares(["a", "b", "c", "d"])
    after = shares(["a", "b", "c"])
    kept = sum(len(set(before[m]) & set(after[m])) for m in ("a", "b", "c"))
    assert kept >= 4  # the six partitions of a, b and c mostly stay where they were


@pytest.mark.django_db
def test_a_process_that_stops_beating_without_leaving_is_a_warning(
    clean_registry: Any, caplog: Any
) -> None:
    consumer = make_consumer(clean_registry, name="ordered.c")
    consumer.ordered = True
    one, two, three = (PartitionShare([consumer]) for _ in range(3))
    for share in (one, two, three):
        share.heartbeat()
    one.heartbeat()  # sees all three
    members = sorted(share.member for share in (one, two, three))
    assert one.queues(consumer) == assign(partition_queues(consumer), members, one.member)
    assert len(one.queues(consumer)) in (2, 3)  # 8 partitions over 3: 3, 3 and 2
    two.leave()  # a clean stop: no warning
    stale = timezone.now() - timedelta(seconds=20)  # past ORDERED_MEMBER_TTL (5 s)
    ConsumerMember.objects.filter(member=three.member).update(heartbeat_at=stale)
    with caplog.at_level(logging.WARNING, logger="reliable_events.consumer.membership"):
        one.heartbeat()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"reliable_events: ordered.c: process {three.member} stopped beating without leaving "
        "(killed, or frozen): its partitions go to the others, but a frozen one keeps them "
        "until the broker drops its connection (up to twice CONSUMER_HEARTBEAT)"
    ]
    assert len(one.queues(consumer)) == 8
    caplog.clear()
    one.heartbeat()  # said once
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_an_event_is_from_the_partition_of_its_bucket(
    clean_registry: Any, re_settings: Any
) -> None:
    re_settings(BROKER_URL="amqp://guest:guest@127.0.0.1//")  # partitions: RabbitMQ's
    consumer = make_consumer(clean_registry, name="ordered.q")
    consumer.ordered = True
    consumer.partitions = 8
    queues = partition_queues(consumer)
    assert [consumer.queue_of({BUCKET_HEADER: str(b)}) for b in (0, 9, 63)] == [
        queues[0],
        queues[1],
        queues[7],
    ]
    for headers in ({}, {BUCKET_HEADER: "64"}, {BUCKET_HEADER: "x"}, {BUCKET_HEADER: "٣"}):
        assert consumer.queue_of(headers) == "ordered.q"  # none known: the consumer's name
    consumer.ordered = False
    assert consumer.queue_of({BUCKET_HEADER: "9"}) == consumer.queue_name()
    consumer.ordered = True
    re_settings(BROKER_URL="db://")  # one queue per consumer there
    assert consumer.queue_of({BUCKET_HEADER: "9"}) == "ordered.q"
