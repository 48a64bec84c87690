"""Who holds which lane, until when? Lane leases and relay presence rows (PostgreSQL).

A relay owns a lane through a row of :class:`~reliable_events.models.LaneLease`: owner,
expiry (database clock) and a fencing token that grows at every change of hands.  It
takes, renews and gives back leases in short transactions of one statement each, so
nothing lives in the database session: this works the same on a direct connection and
through a transaction-pooling pooler (PgBouncer), where a session-level advisory lock
would stay behind on whichever server connection served it.

Each relay also keeps a :class:`~reliable_events.models.RelayPresence` row alive; the
unexpired rows are the live relays that share the lanes.  A relay that dies stops
renewing both: its lanes are free, and it stops counting, ``RELAY_LEASE_SECONDS``
later.

Elsewhere (SQLite: no ``FOR UPDATE``, no advisory locks) one relay at a time holds every
lane, through the lease row of lane 0 taken and renewed with the ORM (:func:`hold_all`):
a second relay (a daemon beside the Celery task, two daemons) waits instead of
publishing the same rows.

Safety: a relay claims rows only through :func:`lease_filter` (its token, and at least
:data:`CLAIM_MARGIN` of the lease left), and a lease is taken over only once expired,
so every row a relay claimed went to the broker long before another relay may take the
lane.  Its sent-marks check the token too (:func:`reliable_events.relay.claims.set_sent`).
The on-commit hook takes a transaction-level advisory lock per lane and publishes only
lanes no unexpired lease covers; a relay takes a lane only when it gets that same lock
(``pg_try_advisory_xact_lock``, released at once with its statement), so a hook and a
relay never publish one lane at once.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.db import connections
from django.db.models import Q
from django.utils import timezone

from reliable_events.conf import app_settings
from reliable_events.models import LaneLease, RelayPresence

#: First key of the two-key advisory locks that guard lanes ("RE"): transaction-level
#: only (the on-commit hook, and a relay for the instant it takes a lease).
LANE_LOCK_NAMESPACE = 0x5245
#: A claim needs at least this fraction of the lease left (checked in SQL, on the
#: database clock): the batch goes out well before the lease could expire.
CLAIM_MARGIN = 0.5
#: A relay renews its leases once less than this fraction is left (between runs; a run
#: ends when it is reached).
RENEW_AT = 0.7


#: Shortest lease, whatever ``TIME_SCALE`` says: a relay renews every quarter of it, and a
#: claimed batch must reach the broker within the margin left.
MIN_LEASE_SECONDS = 2.0


def lease_seconds() -> float:
    """The lease time on the relay's clock (``RELAY_LEASE_SECONDS`` times ``TIME_SCALE``,
    at least :data:`MIN_LEASE_SECONDS`)."""
    return max(MIN_LEASE_SECONDS, app_settings.seconds("RELAY_LEASE_SECONDS"))


def _tables(alias: str) -> dict[str, str]:
    quote = connections[alias].ops.quote_name
    return {
        "lease": quote(LaneLease._meta.db_table),
        "presence": quote(RelayPresence._meta.db_table),
    }


@dataclass(frozen=True)
class Fence:
    """What a relay's claims and marks check: it still owns ``lanes`` with ``tokens``."""

    owner: str
    lanes: tuple[int, ...]
    tokens: tuple[int, ...]
    #: Seconds of lease a claim needs left (``CLAIM_MARGIN`` of the lease).
    margin: float

    def params(self) -> dict[str, Any]:
        return {
            "fence_owner": self.owner,
            "fence_lanes": list(self.lanes),
            "fence_tokens": list(self.tokens),
            "fence_margin": self.margin,
        }


_LEASE_FILTER = """ARRAY(SELECT l.lane FROM {lease} l
    JOIN unnest(%(fence_lanes)s::int[], %(fence_tokens)s::bigint[]) AS h(lane, token)
      ON l.lane = h.lane AND l.token = h.token
    WHERE l.owner = %(fence_owner)s {expiry})"""
_LEASE_LEFT = "AND l.expires_at > statement_timestamp() + %(fence_margin)s * interval '1 second'"


def lease_filter(lease_table: str, *, margin: bool) -> str:
    """SQL: the lanes a :class:`Fence` still holds (its params), as an array.

    ``margin``: only leases with the fence's margin left (claims); without it any lease
    still carrying the token (marks: the rows went out while it was valid).
    """
    return _LEASE_FILTER.format(lease=lease_table, expiry=_LEASE_LEFT if margin else "")


def new_owner() -> str:
    """A relay's id: unique per :class:`~reliable_events.relay.lanes.LaneShare`."""
    return uuid.uuid4().hex


def process_label() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"[:255]


# Announce (or renew) this relay, renew its unexpired leases, count the live relays and
# drop presence rows long dead; one statement.  A relay counts while its presence row or
# any of its leases lasts: a lane taken after the presence was renewed (a later
# statement) outlasts it by moments, and a relay that died then must still be waited for.
_PG_HEARTBEAT = """WITH me AS (
  INSERT INTO {presence} (owner, process, expires_at)
  VALUES (%(owner)s, %(process)s, statement_timestamp() + %(lease)s * interval '1 second')
  ON CONFLICT (owner) DO UPDATE SET expires_at = EXCLUDED.expires_at
  RETURNING owner),
renewed AS (
  UPDATE {lease} l SET expires_at = statement_timestamp() + %(lease)s * interval '1 second'
  FROM unnest(%(held)s::int[], %(tokens)s::bigint[]) AS h(lane, token)
  WHERE l.lane = h.lane AND l.token = h.token AND l.owner = %(owner)s
    AND l.expires_at > statement_timestamp()
  RETURNING l.lane, l.token),
gone AS (
  DELETE FROM {presence}
  WHERE expires_at < statement_timestamp() - interval '1 hour' AND owner <> %(owner)s)
SELECT (SELECT count(*) FROM (
          SELECT owner FROM {presence}
          WHERE expires_at > statement_timestamp() AND owner <> %(owner)s
          UNION
          SELECT owner FROM {lease}
          WHERE expires_at > statement_timestamp() AND owner NOT IN ('', %(owner)s)) o) + 1,
  ARRAY(SELECT lane FROM renewed ORDER BY lane), ARRAY(SELECT token FROM renewed ORDER BY lane)"""
_PG_ENSURE_LANES = """INSERT INTO {lease} (lane, owner, expires_at, token)
SELECT g, '', statement_timestamp(), 0 FROM generate_series(0, %(total)s - 1) AS g
ON CONFLICT (lane) DO NOTHING"""
# Free or expired lanes among ``wanted`` (in that order), at most ``limit``, that no
# on-commit hook is publishing right now (its transaction-level lock): the token grows.
_PG_ACQUIRE = """UPDATE {lease} l
SET owner = %(owner)s, token = l.token + 1,
    expires_at = statement_timestamp() + %(lease)s * interval '1 second'
FROM (
  SELECT f.lane FROM {lease} f
  JOIN unnest(%(wanted)s::int[]) WITH ORDINALITY AS w(lane, n) ON f.lane = w.lane
  WHERE (f.owner = '' OR f.expires_at <= statement_timestamp())
    AND pg_try_advisory_xact_lock(%(namespace)s, f.lane)
  ORDER BY w.n LIMIT %(limit)s
  FOR UPDATE OF f SKIP LOCKED) picked
WHERE l.lane = picked.lane
RETURNING l.lane, l.token"""
_PG_RELEASE = """UPDATE {lease} SET owner = '', expires_at = statement_timestamp()
WHERE owner = %(owner)s AND lane = ANY(%(lanes)s::int[])"""
_PG_LEAVE = "DELETE FROM {presence} WHERE owner = %(owner)s"
#: SQL: lease row ``l`` is held by a live relay (the claims and the hook leave its lane alone).
LIVE_LEASE = "l.owner <> '' AND l.expires_at > statement_timestamp()"
_PG_LEASED = """SELECT l.lane FROM {lease} l WHERE l.lane = ANY(%(lanes)s::int[])
  AND {live_lease} ORDER BY l.lane"""


def heartbeat(
    alias: str, owner: str, held: dict[int, int], *, total: int, first: bool
) -> tuple[int, dict[int, int]]:
    """Announce/renew relay ``owner`` and renew the leases of ``held`` (lane → token).

    Returns the live relays (this one included) and the leases still held (those that
    had not expired).  ``first``: also make sure the lease rows of ``total`` lanes exist.
    """
    tables = _tables(alias)
    with connections[alias].cursor() as cursor:
        if first:
            cursor.execute(_PG_ENSURE_LANES.format(**tables), {"total": total})
        cursor.execute(
            _PG_HEARTBEAT.format(**tables),
            {
                "owner": owner,
                "process": process_label(),
                "lease": lease_seconds(),
                "held": list(held),
                "tokens": list(held.values()),
            },
        )
        live, lanes, tokens = cursor.fetchone()
    return int(live), dict(zip(lanes, tokens, strict=True))


def acquire(alias: str, owner: str, wanted: list[int], limit: int) -> dict[int, int]:
    """Take up to ``limit`` free (or expired) lanes of ``wanted``; lane → new token."""
    if limit <= 0 or not wanted:
        return {}
    with connections[alias].cursor() as cursor:
        cursor.execute(
            _PG_ACQUIRE.format(**_tables(alias)),
            {
                "owner": owner,
                "lease": lease_seconds(),
                "wanted": wanted,
                "limit": limit,
                "namespace": LANE_LOCK_NAMESPACE,
            },
        )
        return {int(lane): int(token) for lane, token in cursor.fetchall()}


def release(alias: str, owner: str, lanes: list[int]) -> None:
    if not lanes:
        return
    with connections[alias].cursor() as cursor:
        cursor.execute(_PG_RELEASE.format(**_tables(alias)), {"owner": owner, "lanes": lanes})


def leased(alias: str, lanes: list[int]) -> list[int]:
    """Those of ``lanes`` a relay holds a lease on now (database clock)."""
    with connections[alias].cursor() as cursor:
        cursor.execute(_PG_LEASED.format(live_lease=LIVE_LEASE, **_tables(alias)), {"lanes": lanes})
        return [int(row[0]) for row in cursor.fetchall()]


def hold_all(alias: str, owner: str) -> bool:
    """Take or renew the one lease of a database without lane locks (SQLite) for
    ``owner``; whether it holds it (``False``: another relay does, its lease unexpired).
    One ``UPDATE`` (each its own write: SQLite serialises them); the row is created by
    the first relay ever."""
    now = timezone.now()
    leases = LaneLease.objects.using(alias)
    free = leases.filter(lane=0).filter(Q(owner="") | Q(owner=owner) | Q(expires_at__lte=now))
    until = now + timedelta(seconds=lease_seconds())
    if free.update(owner=owner, expires_at=until):
        return True
    _row, created = leases.get_or_create(lane=0, defaults={"owner": owner, "expires_at": until})
    return created


def let_go(alias: str, owner: str) -> None:
    """Give back the lease :func:`hold_all` took."""
    LaneLease.objects.using(alias).filter(lane=0, owner=owner).update(
        owner="", expires_at=timezone.now()
    )


def leave(alias: str, owner: str, lanes: list[int]) -> None:
    """Give ``lanes`` back and stop counting as a relay."""
    release(alias, owner, lanes)
    with connections[alias].cursor() as cursor:
        cursor.execute(_PG_LEAVE.format(**_tables(alias)), {"owner": owner})
