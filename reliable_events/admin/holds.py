"""Held keys and parked events of ordered consumers (read-only): what waits behind a
dead-lettered head until its dead letter is retried or discarded."""

from __future__ import annotations

from django.contrib import admin
from django.db.models import Count, OuterRef, QuerySet, Subquery
from django.db.models.functions import Coalesce
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.translation import gettext_lazy as _

from reliable_events.admin.base import CSS, ReadOnlyAdmin
from reliable_events.models import KeyHold, ParkedEvent


@admin.register(KeyHold)
class KeyHoldAdmin(ReadOnlyAdmin):
    """Keys an ordered consumer holds behind a dead letter, with their parked events."""

    list_display = ("consumer", "key", "state", "dead_letter", "parked", "created_at")
    list_filter = ("state", "consumer")
    search_fields = ("=key", "=consumer")
    search_help_text = _("Exact key or consumer name.")
    ordering = ("id",)
    list_per_page = 100

    class Media:
        css = CSS

    def get_queryset(self, request: HttpRequest) -> QuerySet[KeyHold]:
        parked = (
            ParkedEvent.objects.filter(consumer=OuterRef("consumer"), key=OuterRef("key"))
            .order_by()
            .values("consumer")
            .annotate(n=Count("id"))
            .values("n")[:1]
        )
        query: QuerySet[KeyHold] = super().get_queryset(request)
        return query.annotate(parked_count=Coalesce(Subquery(parked), 0))

    @admin.display(description=_("parked events"), ordering="parked_count")
    def parked(self, obj: KeyHold) -> SafeString:
        url = reverse(f"{self.admin_site.name}:reliable_events_parkedevent_changelist")
        return format_html(
            '<a href="{}?consumer={}&key={}">{}</a>',
            url,
            obj.consumer,
            obj.key or "",
            getattr(obj, "parked_count", 0),
        )

    @admin.display(description=_("dead letter"))
    def dead_letter(self, obj: KeyHold) -> SafeString:
        url = reverse(
            f"{self.admin_site.name}:reliable_events_deadletter_change", args=[obj.dead_letter_id]
        )
        return format_html('<a href="{}">{}</a>', url, obj.dead_letter_id)


@admin.register(ParkedEvent)
class ParkedEventAdmin(ReadOnlyAdmin):
    """Events parked behind their key's dead letter, in the order they will follow it."""

    list_display = ("id", "consumer", "key", "message_id", "topic", "parked_at")
    list_filter = ("consumer",)
    #: The held keys' links: ``?consumer=…&key=…``.
    url_lookups = frozenset({"consumer", "key"})
    search_fields = ("=key", "=message_id")
    search_help_text = _("Exact key or message id.")
    ordering = ("id",)
    list_per_page = 100
    show_full_result_count = False
    heavy_fields = ("payload", "headers")

    class Media:
        css = CSS
