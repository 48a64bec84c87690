"""Lane leases (PostgreSQL): the fair share, the fencing token checked by claims and
sent-marks, expiry and takeover, and the on-commit hook leaving leased lanes alone."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.utils import timezone

from reliable_events import publish_event
from reliable_events.conf import app_settings
from reliable_events.models import LaneLease, OutboxMessage, RelayPresence
from reliable_events.relay import LaneShare, claim_committed, claim_due, set_sent
from reliable_events.relay.leases import lease_seconds

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.postgres]


def _rows(count: int) -> list[OutboxMessage]:
    with transaction.atomic():
        return [publish_event("lease.e", {"n": n}, key=f"k{n % 20}") for n in range(count)]


def test_two_shares_split_the_lanes_and_a_leaving_one_frees_them(re_settings):
    re_settings(PUBLISH_ON_COMMIT=False)
    first, second = LaneShare(connection.alias), LaneShare(connection.alias)
    try:
        assert len(first.refresh()) == 64  # alone
        assert RelayPresence.objects.count() == 1
        second.refresh()  # two now; the first still holds everything until it rebalances
        assert second.held == []
        assert second.relays == 2
        assert len(first.refresh()) == 32
        assert len(second.refresh()) == 32
        assert set(first.held).isdisjoint(second.held)
        first.release()
        assert RelayPresence.objects.count() == 1
        assert len(second.refresh()) == 64
    finally:
        first.release()
        second.release()
    assert not RelayPresence.objects.exists()
    assert not LaneLease.objects.exclude(owner="").exists()


def test_a_lost_lease_fences_claims_and_marks(re_settings, caplog):
    re_settings(PUBLISH_ON_COMMIT=False)
    rows = _rows(40)
    share = LaneShare(connection.alias)
    try:
        lanes = share.refresh()
        fence = share.fence()
        assert fence is not None
        claimed = claim_due(connection.alias, lanes, 100, fence=fence)
        assert len(claimed) == 40
        lost_lane = rows[0].lane
        # the relay stalled past its lease; another relay took the lane (a new token)
        LaneLease.objects.filter(lane=lost_lane).update(
            owner="other", token=share.tokens[lost_lane] + 1
        )
        lost = sorted(r.pk for r in rows if r.lane == lost_lane)
        with caplog.at_level(logging.WARNING, logger="reliable_events"):
            left = set_sent(connection.alias, [r.id for r in claimed], fence)
        assert left == lost  # confirmed, but the lane changed hands: left to its new holder
        assert "lost the lease" in caplog.text
        assert sorted(OutboxMessage.objects.pending().values_list("pk", flat=True)) == lost
        # nor can the stale relay claim them again
        assert claim_due(connection.alias, lanes, 100, fence=fence) == []
        # a lease with too little time left is no lease for a claim either
        LaneLease.objects.filter(lane=lost_lane).update(owner=share.owner, token=fence.tokens[0])
        LaneLease.objects.update(expires_at=timezone.now() + timedelta(seconds=0.1))
        assert claim_due(connection.alias, lanes, 100, fence=fence) == []
    finally:
        share.release()


def test_an_expired_lease_is_taken_over_with_a_new_token(re_settings):
    re_settings(PUBLISH_ON_COMMIT=False, LANES=4)
    dead, alive = LaneShare(connection.alias), LaneShare(connection.alias)
    try:
        assert len(dead.refresh()) == 4
        tokens = dict(dead.tokens)
        assert alive.refresh() == []  # nothing free while the lease runs
        # the dead relay stops renewing: its presence and leases run out
        past = timezone.now() - timedelta(seconds=1)
        RelayPresence.objects.filter(owner=dead.owner).update(expires_at=past)
        LaneLease.objects.update(expires_at=past)
        assert alive.refresh() == [0, 1, 2, 3]
        assert all(alive.tokens[lane] == tokens[lane] + 1 for lane in range(4))
        assert alive.relays == 1
        # the dead relay, were it to wake up, renews nothing and claims nothing
        dead.refresh()
        assert dead.held == []
    finally:
        dead.release()
        alive.release()
    assert lease_seconds() == max(2.0, app_settings.seconds("RELAY_LEASE_SECONDS"))


def test_a_relay_counts_while_a_lease_of_it_lasts(re_settings):
    # A relay renews its presence, then takes lanes in a later statement: killed right
    # after, its presence runs out moments before those leases.  In that moment another
    # relay must still count it (and wait for its lanes), not find itself alone with
    # every lane held and give up (``relay_outbox --once`` exited 0, nothing sent).
    re_settings(PUBLISH_ON_COMMIT=False, LANES=4)
    dead, other = LaneShare(connection.alias), LaneShare(connection.alias)
    try:
        assert len(dead.refresh()) == 4
        RelayPresence.objects.filter(owner=dead.owner).update(
            expires_at=timezone.now() - timedelta(seconds=0.1)
        )
        assert other.refresh() == []
        assert other.relays == 2
        LaneLease.objects.update(expires_at=timezone.now() - timedelta(seconds=0.1))
        assert other.refresh() == [0, 1, 2, 3]
        assert other.relays == 1
    finally:
        dead.release()
        other.release()


def test_the_hook_leaves_the_rows_of_a_leased_lane_to_its_relay(re_settings):
    re_settings(PUBLISH_ON_COMMIT=False)
    rows = _rows(20)
    share = LaneShare(connection.alias)
    try:
        share.refresh()  # a relay holds every lane
        ids = [r.pk for r in rows]
        keys = sorted({r.key for r in rows if r.key})
        with transaction.atomic():
            assert claim_committed(connection.alias, ids, keys) == []
        share.rest()  # idle: lanes given back
        with transaction.atomic():
            assert len(claim_committed(connection.alias, ids, keys)) == 20
    finally:
        share.release()
