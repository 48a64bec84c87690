from __future__ import annotations

from django.apps import AppConfig


class ReliableEventsConfig(AppConfig):
    name = "reliable_events"
    verbose_name = "Reliable events"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from reliable_events import checks  # registers the system checks

        del checks
