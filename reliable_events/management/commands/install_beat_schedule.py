"""``install_beat_schedule``: put the relay and purge tasks on django-celery-beat.

Idempotent. Exit codes: 0 done; 1 django_celery_beat not installed.
"""

from __future__ import annotations

from typing import Any

from django.apps import apps
from django.core.management.base import BaseCommand, CommandError, CommandParser

from reliable_events.management.arguments import BadArgumentsExit1, schedule_seconds
from reliable_events.schedule import install_beat_schedule


class Command(BadArgumentsExit1, BaseCommand):
    help = "Create or update the periodic relay and purge tasks for the DatabaseScheduler."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--relay-every", type=schedule_seconds, default=10, help="Seconds between relays."
        )
        parser.add_argument(
            "--purge-every", type=schedule_seconds, default=3600, help="Seconds between purges."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if not apps.is_installed("django_celery_beat"):
            raise CommandError(
                "install django-celery-beat (pip install 'reliable-events[beat]') "
                "and add 'django_celery_beat' to INSTALLED_APPS first"
            )
        for name, created in install_beat_schedule(
            relay_every=options["relay_every"], purge_every=options["purge_every"]
        ):
            self.stdout.write(f"{'created' if created else 'updated'}: {name}")
