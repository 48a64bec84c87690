"""Lanes: which ordering lanes this relay holds, shared fairly between relays.

Every outbox row has a lane (its key's hash modulo ``LANES``); a relay publishes the rows
of the lanes it holds, each lane held by one relay at a time, so a key's events go out in
order whatever the number of relays.  On PostgreSQL a lane is a session-level advisory
lock; relays count each other by one more advisory lock each and keep
``ceil(LANES / relays)`` lanes (:class:`LaneShare`).  Elsewhere (SQLite: one relay) every
lane counts as held.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

from django.db import connections

from reliable_events.conf import app_settings
from reliable_events.db import is_postgres

#: First key of the two-key advisory locks that guard lanes ("RE").
LANE_LOCK_NAMESPACE = 0x5245
#: First key of the advisory lock each relay holds while it runs (second key: its
#: backend pid), by which relays count each other to share the lanes.
RELAY_LOCK_NAMESPACE = 0x5246


def lock_lanes(
    alias: str, lanes: Iterable[int] | None = None, *, limit: int | None = None
) -> list[int]:
    """Try to take the advisory lock of each lane (at most ``limit`` of them); return the
    lanes now held.

    On databases without advisory locks every lane counts as held.
    """
    wanted = list(range(int(app_settings.LANES))) if lanes is None else list(lanes)
    if not is_postgres(alias):
        return wanted
    if limit is not None and limit <= 0:
        return []
    random.shuffle(wanted)  # spread contention between relays
    with connections[alias].cursor() as cursor:
        # LIMIT stops the scan (and the lock attempts) once ``limit`` lanes are taken.
        cursor.execute(
            "SELECT l FROM unnest(%s::int[]) AS l WHERE pg_try_advisory_lock(%s, l) LIMIT %s",
            [wanted, LANE_LOCK_NAMESPACE, limit if limit is not None else len(wanted)],
        )
        return sorted(row[0] for row in cursor.fetchall())


def unlock_lanes(alias: str, lanes: Sequence[int]) -> None:
    if not lanes or not is_postgres(alias):
        return
    with connections[alias].cursor() as cursor:
        cursor.execute(
            "SELECT pg_advisory_unlock(%s, l) FROM unnest(%s::int[]) AS l",
            [LANE_LOCK_NAMESPACE, list(lanes)],
        )


# Who holds what, from PostgreSQL's lock table: the relays of this database (one
# advisory lock each) and the lanes this session holds.  Two-key advisory locks show as
# classid = first key, objid = second key, objsubid = 2.
_PG_LANE_STATE = """SELECT
  (SELECT count(*) FROM pg_locks
   WHERE locktype = 'advisory' AND granted AND objsubid = 2 AND classid = %(relay)s::oid
     AND database = (SELECT oid FROM pg_database WHERE datname = current_database())),
  ARRAY(SELECT objid::int FROM pg_locks
   WHERE locktype = 'advisory' AND granted AND objsubid = 2 AND classid = %(lane)s::oid
     AND pid = pg_backend_pid()),
  EXISTS(SELECT 1 FROM pg_locks
   WHERE locktype = 'advisory' AND granted AND objsubid = 2 AND classid = %(relay)s::oid
     AND pid = pg_backend_pid())"""


class LaneShare:
    """The lanes one relay holds, kept between runs while it is busy, rebalanced before
    each run and given back while it idles (:meth:`rest`).

    A relay announces itself with an advisory lock of its own (released with its
    session, so a dead relay stops counting at once), counts the live relays, keeps
    ``ceil(LANES / live)`` lanes, releases the surplus and takes free lanes up to its
    share.  :meth:`refresh` runs only between runs, when nothing of the relay is in
    flight, so a lane changes hands only when its previous holder has settled every
    row it claimed from it.  The lanes are held on the relay's own database connection:
    if that connection was lost (and with it the locks), :meth:`refresh` finds out from
    ``pg_locks`` and takes a share again.
    """

    def __init__(self, alias: str) -> None:
        self.alias = alias
        self.held: list[int] = []
        self.relays = 1
        self._announced = False

    def refresh(self) -> list[int]:
        """Rebalance; return the lanes held for the next run."""
        total = int(app_settings.LANES)
        if not is_postgres(self.alias):
            self.held = list(range(total))
            return self.held
        with connections[self.alias].cursor() as cursor:
            params = {"relay": RELAY_LOCK_NAMESPACE, "lane": LANE_LOCK_NAMESPACE}
            cursor.execute(_PG_LANE_STATE, params)
            live, session_lanes, announced = cursor.fetchone()
            if not announced or not self._announced:
                # A new session (the old one and its locks are gone) or a new relay.
                cursor.execute(
                    "SELECT pg_advisory_lock(%s, pg_backend_pid())", [RELAY_LOCK_NAMESPACE]
                )
                live += 0 if announced else 1
                self._announced = True
        in_session = set(session_lanes)
        self.held = [lane for lane in self.held if lane in in_session]
        self.relays = max(1, int(live))
        share = -(-total // self.relays)
        if len(self.held) > share:
            random.shuffle(self.held)
            surplus, self.held = self.held[share:], self.held[:share]
            unlock_lanes(self.alias, surplus)
        elif len(self.held) < share:
            mine = set(self.held)
            free = [lane for lane in range(total) if lane not in mine]
            self.held += lock_lanes(self.alias, free, limit=share - len(self.held))
        self.held.sort()
        return self.held

    def rest(self) -> None:
        """Give the lanes back while the relay has nothing to do; it still counts as a
        relay.  The on-commit hook takes a lane for the moment it publishes a key's
        chain: a relay sitting on idle lanes would make every hook wait for it."""
        if not is_postgres(self.alias) or not self.held:
            return
        lanes, self.held = self.held, []
        unlock_lanes(self.alias, lanes)

    def release(self) -> None:
        """Give every lane back and stop counting as a relay."""
        if not is_postgres(self.alias):
            self.held = []
            return
        lanes, self.held = self.held, []
        if not self._announced:
            return
        self._announced = False
        unlock_lanes(self.alias, lanes)
        with connections[self.alias].cursor() as cursor:
            cursor.execute(
                "SELECT pg_advisory_unlock(%s, pg_backend_pid())", [RELAY_LOCK_NAMESPACE]
            )
