"""The processed-messages admin: the consumers' idempotency records (read-only)."""

from __future__ import annotations

from django.contrib import admin
from django.utils.translation import gettext_lazy as _

from reliable_events.admin.base import CSS, ReadOnlyAdmin
from reliable_events.models import ProcessedMessage


# -- processed messages -----------------------------------------------------------------
@admin.register(ProcessedMessage)
class ProcessedMessageAdmin(ReadOnlyAdmin):
    list_display = ("id", "consumer", "message_id", "topic", "processed_at", "timeline")
    search_fields = ("=message_id", "=consumer", "^topic")
    search_help_text = _(
        "Exact message id or consumer name, or the start of a topic (case-sensitive)."
    )
    ordering = ("-id",)
    list_per_page = 100
    show_full_result_count = False

    class Media:
        css = CSS
