"""Lanes: which ordering lanes this relay holds, shared fairly between relays.

Every outbox row has a lane (its key's hash modulo ``LANES``); a relay publishes the rows
of the lanes it holds, each lane held by one relay at a time, so a key's events go out in
order whatever the number of relays.  On PostgreSQL a lane is a lease row with an expiry
and a fencing token (:mod:`reliable_events.relay.leases`: no session state, so it works
through PgBouncer in transaction pooling); relays count each other by their presence
rows and keep ``ceil(LANES / relays)`` lanes (:class:`LaneShare`).  Elsewhere (SQLite:
one relay at a time) the relay that holds the one lease holds every lane.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from django.db import DatabaseError, connections

from reliable_events.conf import app_settings
from reliable_events.db import is_postgres
from reliable_events.relay import leases
from reliable_events.relay.leases import CLAIM_MARGIN, RENEW_AT, Fence

logger = logging.getLogger(__name__)


class LaneShare:
    """The lanes one relay holds, kept between runs while it is busy, rebalanced before
    each run and given back while it idles (:meth:`rest`).

    A relay announces itself with a presence row, renewed at every :meth:`refresh` and
    :meth:`keep_alive` (a dead relay stops counting ``RELAY_LEASE_SECONDS`` later),
    counts the live relays, keeps ``ceil(LANES / live)`` lanes, releases the surplus and
    takes free (or expired) lanes up to its share.  :meth:`refresh` runs only between
    runs, when nothing of the relay is in flight, so a lane changes hands only when its
    previous holder has settled every row it claimed from it, or once its lease expired
    (the holder died or stalled: its claims stopped with :data:`CLAIM_MARGIN` of the
    lease left, see :meth:`fence`).  A run ends by :meth:`run_budget`, before the leases
    need renewing.
    """

    def __init__(self, alias: str) -> None:
        self.alias = alias
        self.owner = leases.new_owner()
        #: lane → fencing token of the leases held (PostgreSQL).
        self.tokens: dict[int, int] = {}
        self.held: list[int] = []
        self.relays = 1
        self._announced = False
        self._renew_by = 0.0
        self._seen_at = 0.0

    def refresh(self) -> list[int]:
        """Rebalance; return the lanes held for the next run."""
        total = int(app_settings.LANES)
        if not is_postgres(self.alias):
            started = time.monotonic()
            if not self.held or started - self._seen_at >= leases.lease_seconds() / 4:
                self._hold_all(started)
            return self.held
        started = time.monotonic()
        live, self.tokens = leases.heartbeat(
            self.alias, self.owner, self.tokens, total=total, first=not self._announced
        )
        self._announced = True
        self._seen_at = started
        self.relays = max(1, live)
        share = -(-total // self.relays)
        if len(self.tokens) > share:
            lanes = list(self.tokens)
            random.shuffle(lanes)
            surplus = lanes[share:]
            leases.release(self.alias, self.owner, surplus)
            for lane in surplus:
                del self.tokens[lane]
        elif len(self.tokens) < share:
            free = [lane for lane in range(total) if lane not in self.tokens]
            random.shuffle(free)  # spread contention between relays
            self.tokens.update(
                leases.acquire(self.alias, self.owner, free, share - len(self.tokens))
            )
        self._renew_by = started + leases.lease_seconds() * (1 - RENEW_AT)
        self.held = sorted(self.tokens)
        return self.held

    def run_budget(self) -> float:
        """Seconds a run may keep claiming before the leases need renewing."""
        if not is_postgres(self.alias):
            return float("inf")
        return max(0.0, self._renew_by - time.monotonic())

    def lapsed(self) -> bool:
        """Whether the leases were due for renewal (a claim may have found too little of
        them left and returned nothing: that is no sign of an empty outbox)."""
        return bool(self.tokens) and self.run_budget() <= 0

    def fence(self) -> Fence | None:
        """What this relay's claims and marks check (``None``: no leases, SQLite)."""
        if not is_postgres(self.alias):
            return None
        lanes = tuple(sorted(self.tokens))
        return Fence(
            owner=self.owner,
            lanes=lanes,
            tokens=tuple(self.tokens[lane] for lane in lanes),
            margin=leases.lease_seconds() * CLAIM_MARGIN,
        )

    @contextmanager
    def kept(self, seconds: float) -> Iterator[None]:
        """Keep this relay's leases while a run has rows in flight, for at most
        ``seconds``: a thread with its own connection renews them every quarter of a
        lease.

        A run claims with half a lease left, but its confirms may take longer than that
        (a broker that just restarted, flow control: up to ``CONFIRM_TIMEOUT``).  A lease
        that expired meanwhile would let an on-commit hook (or another relay) publish the
        rows in flight a second time.  A relay that stalls or dies stops renewing, and
        ``seconds`` bounds a run that hangs.  Nothing is kept inside an atomic block (the
        leases are not committed: the thread would wait for them).
        """
        if (
            not is_postgres(self.alias)
            or not self.tokens
            or connections[self.alias].in_atomic_block
        ):
            yield
            return
        keeper = _LeaseKeeper(self.alias, self.owner, dict(self.tokens), seconds)
        keeper.start()
        try:
            yield
        finally:
            keeper.stop()

    def keep_alive(self) -> None:
        """Renew the presence row (and leases) while idle, every quarter of a lease."""
        started = time.monotonic()
        if not self._announced or started - self._seen_at < leases.lease_seconds() / 4:
            return
        if not is_postgres(self.alias):
            self._hold_all(started)
            return
        live, self.tokens = leases.heartbeat(
            self.alias, self.owner, self.tokens, total=int(app_settings.LANES), first=False
        )
        self.relays = max(1, live)
        self.held = sorted(self.tokens)
        self._seen_at = started

    def _hold_all(self, started: float) -> None:
        """Without lane locks (SQLite): every lane while this relay holds the one lease,
        none while another relay does (said once each time it starts waiting)."""
        held = leases.hold_all(self.alias, self.owner)
        if not held and (self.held or not self._announced):
            logger.warning(
                "reliable_events: another relay holds this database's outbox (one relay "
                "publishes at a time on %s): this one waits until it stops, or until its "
                "lease runs out (RELAY_LEASE_SECONDS) if it died",
                connections[self.alias].vendor,
            )
        self._announced = True
        self._seen_at = started
        self.held = list(range(int(app_settings.LANES))) if held else []

    def rest(self) -> None:
        """Give the lanes back while the relay has nothing to do; it still counts as a
        relay.  The on-commit hook publishes only lanes no relay holds: a relay sitting
        on idle lanes would leave every hook's rows to it.  (Without lane locks the hook
        has its own reservation: the relay keeps its one lease while idle.)"""
        if not is_postgres(self.alias) or not self.tokens:
            return
        lanes = list(self.tokens)
        self.tokens, self.held = {}, []
        leases.release(self.alias, self.owner, lanes)

    def release(self) -> None:
        """Give every lane back and stop counting as a relay."""
        lanes = list(self.tokens)
        self.tokens, self.held = {}, []
        if not self._announced:
            return
        self._announced = False
        if is_postgres(self.alias):
            leases.leave(self.alias, self.owner, lanes)
        else:
            leases.let_go(self.alias, self.owner)


class _LeaseKeeper(threading.Thread):
    """Renews the leases of one run (see :meth:`LaneShare.kept`)."""

    def __init__(self, alias: str, owner: str, tokens: dict[int, int], seconds: float) -> None:
        super().__init__(name="reliable-events-leases", daemon=True)
        self.alias, self.owner, self.tokens = alias, owner, tokens
        self.deadline = time.monotonic() + seconds
        self._stopping = threading.Event()

    def run(self) -> None:
        every = leases.lease_seconds() / 4
        try:
            while not self._stopping.wait(min(every, max(0.0, self.deadline - time.monotonic()))):
                if time.monotonic() >= self.deadline:
                    return
                _live, self.tokens = leases.heartbeat(
                    self.alias, self.owner, self.tokens, total=int(app_settings.LANES), first=False
                )
        except DatabaseError as exc:
            logger.warning(
                "reliable_events: renewing the relay's leases during a run failed (%s): "
                "rows in flight may be published again once they expire",
                exc,
            )
        finally:
            connections[self.alias].close()

    def stop(self) -> None:
        self._stopping.set()
        self.join()
