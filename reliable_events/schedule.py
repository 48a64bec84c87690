"""Put the relay and purge tasks on django-celery-beat's DatabaseScheduler."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScheduledTask:
    name: str
    task: str
    every_seconds: int


DEFAULT_SCHEDULE = (
    ScheduledTask("reliable_events: relay outbox", "reliable_events.tasks.relay_outbox", 10),
    ScheduledTask("reliable_events: purge outbox", "reliable_events.tasks.purge_outbox", 3600),
)


def install_beat_schedule(
    *, relay_every: int = 10, purge_every: int = 3600
) -> list[tuple[str, bool]]:
    """Create or update the periodic tasks; returns ``(name, created)`` for each.

    Idempotent.  Each task expires after its interval, so a busy worker never piles up
    stale relay runs.
    """
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    every = {DEFAULT_SCHEDULE[0].name: relay_every, DEFAULT_SCHEDULE[1].name: purge_every}
    results = []
    for item in DEFAULT_SCHEDULE:
        seconds = every[item.name]
        interval, _ = IntervalSchedule.objects.get_or_create(
            every=seconds, period=IntervalSchedule.SECONDS
        )
        _, created = PeriodicTask.objects.update_or_create(
            name=item.name,
            defaults={
                "task": item.task,
                "interval": interval,
                "enabled": True,
                "expire_seconds": seconds,
            },
        )
        results.append((item.name, created))
    return results
