"""The queued-messages admin: the database transport's queue rows (read-only)."""

from __future__ import annotations

from django.contrib import admin
from django.utils.translation import gettext_lazy as _

from reliable_events.admin.base import CSS, ReadOnlyAdmin
from reliable_events.models import QueuedMessage


# -- queued messages (the database transport) ---------------------------------------------
@admin.register(QueuedMessage)
class QueuedMessageAdmin(ReadOnlyAdmin):
    """What waits in the database transport's queues (``db://``): backlogs, retries due
    later, and events no consumer was bound for (``<EXCHANGE>.unrouted``)."""

    list_display = ("id", "queue", "message_id", "topic", "key", "attempt", "available_at")
    list_filter = ("queue",)
    search_fields = ("=message_id", "=queue", "^topic")
    search_help_text = _(
        "Exact message id or queue name, or the start of a topic (case-sensitive)."
    )
    ordering = ("id",)
    list_per_page = 100
    show_full_result_count = False
    heavy_fields = ("body", "headers")

    class Media:
        css = CSS
