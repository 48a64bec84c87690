"""The outbox admin: rows by status and age; dead rows can be retried."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.views.main import ChangeList
from django.db.models import QuerySet
from django.http import (
    HttpRequest,
    HttpResponse,
)
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.text import Truncator
from django.utils.translation import gettext_lazy as _

from reliable_events.admin.base import (
    CSS,
    OUTBOX_HEAVY_FIELDS,
    LightChangeList,
    PendingAgeFilter,
    ReadOnlyAdmin,
    age_text,
    pre_block,
    pretty_json,
)
from reliable_events.models import OutboxMessage
from reliable_events.relay import retry_dead
from reliable_events.status import outbox_status

# -- outbox ---------------------------------------------------------------------------
_NOT_ASKED = object()


class OutboxChangeList(LightChangeList):
    """Also says which row holds back each pending row of the page (per-key order), in
    one query over the page's rows."""

    def get_results(self, request: HttpRequest) -> None:
        super().get_results(request)
        rows = list(self.result_list)
        behind = self.queryset.held_behind([row.pk for row in rows])
        for row in rows:
            row.held_behind_id = behind.get(row.pk)
        self.result_list = rows


@admin.register(OutboxMessage)
class OutboxMessageAdmin(ReadOnlyAdmin):
    heavy_fields = OUTBOX_HEAVY_FIELDS
    list_display = (
        "id",
        "topic",
        "key",
        "status_badge",
        "age",
        "attempts",
        "next_attempt",
        "short_error",
        "timeline",
    )
    list_filter = ("status", PendingAgeFilter)
    url_lookups = frozenset({"status"})
    search_fields = ("=message_id", "=key", "^topic")
    search_help_text = _("Exact message id or key, or the start of a topic (case-sensitive).")
    ordering = ("-id",)
    list_per_page = 50
    show_full_result_count = False
    actions = ("retry_dead_selected",)
    fields = (
        "id",
        "status",
        "topic",
        "key",
        "message_id",
        "queue",
        "lane",
        "attempts",
        "created_at",
        "next_attempt_at",
        "held_behind",
        "sent_at",
        "last_error",
        "payload_display",
        "headers_display",
    )

    class Media:
        css = CSS

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return OutboxChangeList

    @admin.display(description=_("status"), ordering="status")
    def status_badge(self, obj: OutboxMessage) -> SafeString:
        return format_html(
            '<span class="re-badge re-{}">{}</span>', obj.status, obj.get_status_display()
        )

    @admin.display(description=_("age"), ordering="created_at")
    def age(self, obj: OutboxMessage) -> SafeString:
        """How long a row has waited (pending or dead); sent rows show their latency."""
        if obj.status == OutboxMessage.Status.SENT and obj.sent_at is not None:
            text = "sent in " + age_text((obj.sent_at - obj.created_at).total_seconds())
        else:
            text = age_text((timezone.now() - obj.created_at).total_seconds())
        return format_html(
            '<span title="created {}">{}</span>', obj.created_at.isoformat(timespec="seconds"), text
        )

    @admin.display(description=_("next attempt"), ordering="next_attempt_at")
    def next_attempt(self, obj: OutboxMessage) -> SafeString | str:
        if obj.status != OutboxMessage.Status.PENDING:
            return "-"
        wait = (obj.next_attempt_at - timezone.now()).total_seconds()
        text = "due" if wait <= 0 else f"in {age_text(wait)}"
        behind = self.held_behind(obj)
        return format_html("{}, {}", text, behind) if behind else text

    @admin.display(description=_("held behind"))
    def held_behind(self, obj: OutboxMessage) -> SafeString | str:
        """The earlier row of its key that is not due yet: the relay sends this one only
        after it (per-key order)."""
        if obj.status != OutboxMessage.Status.PENDING:
            return ""
        row = getattr(obj, "held_behind_id", _NOT_ASKED)
        if row is _NOT_ASKED:  # the detail page: its row alone
            row = OutboxMessage.objects.using(obj._state.db).held_behind([obj.pk]).get(obj.pk)
        if row is None:
            return ""
        return format_html(
            '<span class="re-held" title="{}">held behind <a href="{}">#{}</a></span>',
            "An earlier event of this key waits for its next attempt; "
            "the relay sends this one after it.",
            reverse(f"admin:{self.opts.app_label}_{self.opts.model_name}_change", args=[row]),
            row,
        )

    @admin.display(description=_("last error"))
    def short_error(self, obj: OutboxMessage) -> SafeString | str:
        if not obj.last_error:
            return ""
        return format_html(
            '<span title="{}">{}</span>', obj.last_error[:1000], Truncator(obj.last_error).chars(50)
        )

    @admin.display(description=_("payload"))
    def payload_display(self, obj: OutboxMessage) -> SafeString:
        return pre_block(pretty_json(obj.payload), "re-json")

    @admin.display(description=_("headers"))
    def headers_display(self, obj: OutboxMessage) -> SafeString:
        return pre_block(pretty_json(obj.headers or {}), "re-json")

    def has_retry_permission(self, request: HttpRequest) -> bool:
        return bool(request.user.has_perm(f"{self.opts.app_label}.change_outboxmessage"))

    @admin.action(description=_("Retry selected dead outbox messages"), permissions=["retry"])
    def retry_dead_selected(self, request: HttpRequest, queryset: QuerySet[OutboxMessage]) -> None:
        ids = list(queryset.values_list("id", flat=True))
        count = retry_dead(ids)
        text = f"Made {count} dead outbox message(s) pending again; the relay publishes them next."
        if count < len(ids):
            text += f" Skipped {len(ids) - count} that were not dead."
        self.message_user(request, text, messages.SUCCESS if count else messages.WARNING)

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        status = outbox_status()
        context = {
            "outbox_status": status,
            "oldest_pending_age": age_text(status.oldest_pending_age_seconds),
            **(extra_context or {}),
        }
        return super().changelist_view(request, extra_context=context)
