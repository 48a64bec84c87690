"""How each model row names itself (admin titles, breadcrumbs, delete confirmations, logs)."""

from __future__ import annotations

from reliable_events.models import (
    ConsumerMember,
    Heartbeat,
    KeyHold,
    LaneLease,
    ParkedEvent,
    RelayPresence,
    TriageEntry,
)


def test_every_model_names_a_row_by_what_identifies_it() -> None:
    assert str(TriageEntry(action="retry", dead_letter_id=7, user="alice")) == (
        "retry of dead letter 7 by alice"
    )
    assert str(TriageEntry(action="discard", dead_letter_id=7)) == (
        "discard of dead letter 7 by system"
    )
    assert str(LaneLease(lane=3, owner="")) == "lane 3: free"
    assert str(LaneLease(lane=3, owner="relay-a")) == "lane 3: relay-a"
    assert str(RelayPresence(owner="relay-a", process="web-1:42")) == "relay relay-a (web-1:42)"
    assert str(Heartbeat(kind="consumer", host="web-1", pid=42)) == "consumer web-1:42"
    assert str(KeyHold(consumer="ledger", key="k1", state="held")) == "ledger: k1 (held)"
    assert str(ParkedEvent(consumer="ledger", key="k1", message_id="m-9")) == "ledger: k1 / m-9"
    assert str(ConsumerMember(consumer="ledger", member="web-1:42")) == "ledger: web-1:42"
