"""The relay: due outbox rows to the broker, marking sent only what the broker confirmed.

- :mod:`~reliable_events.relay.claims`: which rows go out, and what became of them (claim
  SQL, messages, sent / failed / dead marks, backoff, retrying dead rows).
- :mod:`~reliable_events.relay.engine`: how the relay runs (:class:`Relay`, ``relay_once``).
- :mod:`~reliable_events.relay.on_commit`: publishing right after the commit (the
  dispatcher and :func:`publish_after_commit`).
- :mod:`~reliable_events.relay.lanes`: which ordering lanes this relay holds.
- :mod:`~reliable_events.relay.leases`: lane leases and relay presence rows (PostgreSQL).
- :mod:`~reliable_events.relay.pooling`: detecting a transaction-pooling pooler.
- :mod:`~reliable_events.relay.breaker`: the relay's view of broker health.
- :mod:`~reliable_events.relay.traced`: the ``send`` span of each publish.

The names below keep ``from reliable_events.relay import ...`` working.
"""

from __future__ import annotations

from reliable_events.relay.breaker import BrokerBreaker
from reliable_events.relay.claims import (
    WAKE_CHANNEL,
    RelayReport,
    backoff_seconds,
    build_message,
    claim_committed,
    claim_due,
    lock_hook_lanes,
    mark_failed,
    mark_interrupted,
    mark_sent,
    publish_rows,
    record_result,
    retry_dead,
    set_sent,
    wake_relays,
)
from reliable_events.relay.engine import LANE_WAIT, RUN_SECONDS, Relay, relay_once
from reliable_events.relay.lanes import LaneShare
from reliable_events.relay.leases import LANE_LOCK_NAMESPACE, Fence
from reliable_events.relay.on_commit import (
    HOOK_LANE_WAIT,
    HOOK_LEASE_PAUSE,
    HOOK_LEASE_WAIT,
    dispatcher,
    publish_after_commit,
)
from reliable_events.relay.pooling import behind_pooler

__all__ = [
    "HOOK_LANE_WAIT",
    "HOOK_LEASE_PAUSE",
    "HOOK_LEASE_WAIT",
    "LANE_LOCK_NAMESPACE",
    "LANE_WAIT",
    "RUN_SECONDS",
    "WAKE_CHANNEL",
    "BrokerBreaker",
    "Fence",
    "LaneShare",
    "Relay",
    "RelayReport",
    "backoff_seconds",
    "behind_pooler",
    "build_message",
    "claim_committed",
    "claim_due",
    "dispatcher",
    "lock_hook_lanes",
    "mark_failed",
    "mark_interrupted",
    "mark_sent",
    "publish_after_commit",
    "publish_rows",
    "record_result",
    "relay_once",
    "retry_dead",
    "set_sent",
    "wake_relays",
]
