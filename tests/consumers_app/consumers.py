"""A consumer configured by the environment, for tests that run ``consume_events`` or a
Celery worker as a subprocess.  Without ``RE_TEST_CONSUMER`` this module defines nothing,
so it never shows up in other tests' registries.

``RE_TEST_CONSUMER`` is a JSON object: ``name``, ``topics``, optional ``max_retries``,
``retry_delays`` and ``marker_dir`` (a directory for the marker files below).

The handler records its effect as an ``Order`` row with ``reference = "<name>|<message id>"``
(no unique constraint: the tests count how many times an event was applied), then acts on
``payload["action"]``:

* ``"effect"`` (default): nothing more;
* ``"hang"``: the first time (no marker file yet) write the marker, then sleep so the
  test can kill the process inside ``handle``;
* ``"die-after-commit"``: the first time, write the marker and SIGKILL this process
  right after the transaction commits, before the ack;
* ``"sleep"``: the first time, write the marker, then sleep ``payload["seconds"]``
  and finish normally (the test sends SIGTERM meanwhile);
* ``"stall"``: the first time, write the marker, sleep ``payload["seconds"]`` (the
  test cuts the database meanwhile), then query the database again.

With ``payload["publish_topic"]`` the handler also calls ``publish_event`` (before the
action): its outbox row commits, or not, with the ProcessedMessage.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from django.db import transaction

from reliable_events import publish_event
from reliable_events.consumer import Event, EventConsumer
from tests.testapp.models import Order

_SPEC = os.environ.get("RE_TEST_CONSUMER")


def _marker(spec: dict[str, object], event: Event) -> Path:
    return Path(str(spec["marker_dir"])) / f"{event.id}.marker"


def _first_time(spec: dict[str, object], event: Event) -> bool:
    marker = _marker(spec, event)
    if marker.exists():
        return False
    marker.write_text(str(os.getpid()))
    return True


if _SPEC:
    _CONFIG = json.loads(_SPEC)

    class EnvConsumer(EventConsumer):
        name = str(_CONFIG["name"])
        topics = list(_CONFIG["topics"])
        max_retries = _CONFIG.get("max_retries")
        retry_delays = _CONFIG.get("retry_delays")

        def handle(self, event: Event) -> None:
            Order.objects.create(reference=f"{self.name}|{event.id}")
            payload = event.payload if isinstance(event.payload, dict) else {}
            if payload.get("publish_topic"):
                publish_event(str(payload["publish_topic"]), {"caused_by": event.id})
            action = payload.get("action", "effect")
            if action == "hang" and _first_time(_CONFIG, event):
                time.sleep(120)
            elif action == "die-after-commit" and _first_time(_CONFIG, event):
                pid = os.getpid()
                transaction.on_commit(lambda: os.kill(pid, signal.SIGKILL))
            elif action == "sleep" and _first_time(_CONFIG, event):
                time.sleep(float(payload.get("seconds", 2)))
            elif action == "stall" and _first_time(_CONFIG, event):
                time.sleep(float(payload.get("seconds", 3)))
                Order.objects.filter(reference__startswith=self.name).count()
