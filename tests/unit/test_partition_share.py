"""How processes share an ordered consumer's partitions (bounded rendezvous hashing)."""

from __future__ import annotations

from reliable_events.consumer.membership import assign

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
