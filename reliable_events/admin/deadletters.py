"""The dead-letter admin: triage (retry, discard, groups, edit and retry) and the
overview page.

Everything here is read-only over the rows the system owns.  The only changes staff
can make go through the same services as the management commands:

* dead letters: **retry** and **discard** (with a note) on a selection, on a whole
  failure group (same consumer and fingerprint) or from the detail page, through
  :mod:`reliable_events.deadletters`; gated by the ``retry_deadletter`` and
  ``discard_deadletter`` permissions;
* dead outbox rows: **retry** through :func:`reliable_events.relay.retry_dead`, gated by
  ``change_outboxmessage``.

The overview page (``admin:reliable_events_overview``) shows the outbox backlog, the
open dead letters by consumer and an hourly chart of the last 24 hours; it needs view
permission on dead letters or on the outbox.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseNotAllowed,
    HttpResponseRedirect,
)
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.http import urlencode
from django.utils.safestring import SafeString
from django.utils.text import Truncator
from django.utils.translation import gettext_lazy as _

from reliable_events import deadletters
from reliable_events.admin.base import (
    CSS,
    DEADLETTER_HEAVY_FIELDS,
    HISTORY_COLUMNS,
    DeadLetterStatusFilter,
    FailureGroupFilter,
    ReadOnlyAdmin,
    age_text,
    pre_block,
    pretty_json,
    request_username,
)
from reliable_events.admin.triage import (
    PayloadFilter,
    edit_view,
    group_action_view,
    has_edit_permission,
    highest_id,
    history_context,
    int_or_none,
    listed_selection,
    overview_options,
    report,
    timeline_url,
    timeline_view,
)
from reliable_events.consumer.holds import held_by
from reliable_events.models import DeadLetter, OutboxMessage
from reliable_events.overview import build_chart, failure_groups, overview


# -- dead letters ---------------------------------------------------------------------
@admin.register(DeadLetter)
class DeadLetterAdmin(ReadOnlyAdmin):
    heavy_fields = DEADLETTER_HEAVY_FIELDS
    list_display = (
        "id",
        "status_badge",
        "consumer",
        "topic",
        "error_summary",
        "tries",
        "retries",
        "failed_ago",
        "timeline",
    )
    list_display_links = ("id",)
    #: Plain ``field=value`` links (group links, the overview); the filters add their own.
    url_lookups = frozenset({"consumer", "topic", "error_type", "reason"})
    object_history_template = "admin/reliable_events/deadletter/object_history.html"
    list_filter = (
        DeadLetterStatusFilter,
        ("consumer", admin.AllValuesFieldListFilter),
        ("topic", admin.AllValuesFieldListFilter),
        ("error_type", admin.AllValuesFieldListFilter),
        ("reason", admin.AllValuesFieldListFilter),
        FailureGroupFilter,
        ("last_failed_at", admin.DateFieldListFilter),
        PayloadFilter,
    )
    search_fields = ("=message_id", "=key", "error_message")
    search_help_text = _("Exact message id or key, or any words of the error message.")
    date_hierarchy = "created_at"
    ordering = ("-id",)
    list_per_page = 50
    actions = ("retry_selected", "discard_selected")
    fieldsets = (
        (
            _("What failed"),
            {
                "fields": (
                    "status",
                    "consumer",
                    "queue",
                    "topic",
                    "key",
                    "message_id",
                    "reason",
                    "attempts",
                    "first_failed_at",
                    "last_failed_at",
                )
            },
        ),
        (_("Why"), {"fields": ("error_type", "error_message", "traceback_display", "fingerprint")}),
        (_("Message"), {"fields": ("payload_display", "headers_display", "raw_body_display")}),
        (_("Attempt history"), {"fields": ("history_display",)}),
        (_("Resolution"), {"fields": ("resolved_at", "resolved_by", "note", "created_at")}),
    )

    class Media:
        css = CSS

    # -- columns --------------------------------------------------------------------
    @admin.display(description=_("status"), ordering="status")
    def status_badge(self, obj: DeadLetter) -> SafeString:
        return format_html(
            '<span class="re-badge re-{}">{}</span>', obj.status, obj.get_status_display()
        )

    @admin.display(description=_("error"))
    def error_summary(self, obj: DeadLetter) -> SafeString:
        kind = obj.error_type.rsplit(".", 1)[-1] if obj.error_type else obj.reason
        return format_html(
            '<span class="re-error-cell" title="{}"><strong>{}</strong> {}</span>{}',
            obj.error_message[:500],
            kind,
            Truncator(obj.error_message).chars(60),
            self.group_link(obj),
        )

    @admin.display(description=_("failed"), ordering="last_failed_at")
    def failed_ago(self, obj: DeadLetter) -> SafeString:
        return format_html(
            '<span title="{}">{}&nbsp;ago</span>',
            obj.last_failed_at.isoformat(timespec="seconds"),
            age_text((timezone.now() - obj.last_failed_at).total_seconds()).split(" ")[0],
        )

    def get_queryset(self, request: HttpRequest) -> QuerySet[DeadLetter]:
        return deadletters.with_retry_counts(super().get_queryset(request))

    @admin.display(description=_("retries"), ordering="retry_count")
    def retries(self, obj: DeadLetter) -> int:
        """How often this message was retried for this consumer (from the audit trail)."""
        return int(getattr(obj, "retry_count", 0))

    @admin.display(description=_("tries"), ordering="attempts")
    def tries(self, obj: DeadLetter) -> int:
        return obj.attempts

    def group_link(self, obj: DeadLetter) -> SafeString | str:
        """A link listing every open dead letter of the same consumer and fingerprint."""
        if not obj.fingerprint:
            return ""
        query = urlencode({"fingerprint": obj.fingerprint, "consumer": obj.consumer})
        return format_html(
            ' <a class="re-group-link" href="?{}" title="All open dead letters with this '
            'failure ({})">[group]</a>',
            query,
            obj.fingerprint,
        )

    # -- detail fields --------------------------------------------------------------
    @admin.display(description=_("traceback"))
    def traceback_display(self, obj: DeadLetter) -> SafeString:
        return pre_block(obj.traceback or "(none)", "re-traceback")

    @admin.display(description=_("payload"))
    def payload_display(self, obj: DeadLetter) -> SafeString:
        if obj.payload is None:
            return pre_block("(not JSON: see the raw body)" if obj.raw_body else "null")
        return pre_block(pretty_json(obj.payload), "re-json")

    @admin.display(description=_("headers"))
    def headers_display(self, obj: DeadLetter) -> SafeString:
        return pre_block(pretty_json(obj.headers or {}), "re-json")

    @admin.display(description=_("raw body"))
    def raw_body_display(self, obj: DeadLetter) -> SafeString | str:
        return pre_block(obj.raw_body) if obj.raw_body else "-"

    @admin.display(description=_("history"))
    def history_display(self, obj: DeadLetter) -> SafeString | str:
        """One row per failed attempt; columns are the entries' keys (attempt, at, error)."""
        entries = obj.history if isinstance(obj.history, list) else []
        if not entries:
            return "-"
        columns: list[str] = []
        for entry in entries:
            if isinstance(entry, dict):
                columns.extend(str(k) for k in entry if str(k) not in columns)
        # A stable order whatever the database did to the JSON keys (jsonb sorts them).
        columns.sort(key=lambda c: HISTORY_COLUMNS.index(c) if c in HISTORY_COLUMNS else 99)
        columns = columns[:8] or ["entry"]
        numbered = "attempt" not in columns
        head = format_html_join(
            "",
            "<th>{}</th>",
            ((c.replace("_", " "),) for c in (["#"] if numbered else []) + columns),
        )
        rows = format_html_join(
            "",
            "<tr>{}</tr>",
            (
                (
                    format_html_join(
                        "",
                        "<td>{}</td>",
                        (
                            (cell,)
                            for cell in ([str(number)] if numbered else [])
                            + self._cells(entry, columns)
                        ),
                    ),
                )
                for number, entry in enumerate(entries, start=1)
            ),
        )
        return format_html(
            '<table class="re-history"><thead><tr>{}</tr></thead><tbody>{}</tbody></table>',
            head,
            rows,
        )

    @staticmethod
    def _cells(entry: Any, columns: list[str]) -> list[str]:
        if not isinstance(entry, dict):
            return [Truncator(str(entry)).chars(300)] + [""] * (len(columns) - 1)
        return [Truncator(str(entry.get(c, ""))).chars(300) for c in columns]

    # -- permissions ----------------------------------------------------------------
    def has_retry_permission(self, request: HttpRequest) -> bool:
        return bool(request.user.has_perm(f"{self.opts.app_label}.retry_deadletter"))

    def has_discard_permission(self, request: HttpRequest) -> bool:
        return bool(request.user.has_perm(f"{self.opts.app_label}.discard_deadletter"))

    # -- actions --------------------------------------------------------------------
    @admin.action(description=_("Retry selected dead letters"), permissions=["retry"])
    def retry_selected(self, request: HttpRequest, queryset: QuerySet[DeadLetter]) -> None:
        listed = listed_selection(self, request, queryset)
        if listed is None:
            return
        result = deadletters.retry(
            listed.only("id"), user=request_username(request), source="admin"
        )
        report(self, request, result, "retried")

    @admin.action(
        description=_("Discard selected dead letters (with a note)…"), permissions=["discard"]
    )
    def discard_selected(
        self, request: HttpRequest, queryset: QuerySet[DeadLetter]
    ) -> HttpResponse | None:
        note = request.POST.get("note", "").strip()
        listed = listed_selection(self, request, queryset)
        if listed is None:
            return None
        queryset = listed
        if request.POST.get("confirm") == "yes":
            if note:
                result = deadletters.discard(
                    queryset.only("id"), note=note, user=request_username(request), source="admin"
                )
                report(self, request, result, "discarded")
                return None
            self.message_user(
                request, "Say why you discard them: the note is required.", messages.ERROR
            )
        count = queryset.count()
        context = {
            **self.admin_site.each_context(request),
            "title": _("Discard dead letters"),
            "opts": self.opts,
            "count": count,
            "sample": list(
                queryset.only("id", "consumer", "message_id", "error_type", "status")[:20]
            ),
            "selected": request.POST.getlist(helpers.ACTION_CHECKBOX_NAME),
            "select_across": request.POST.get("select_across", "0"),
            "action_name": "discard_selected",
            "note": note,
            "re_upto": request.POST.get("re_upto", ""),
            "re_seen": request.POST.get("re_seen", ""),
        }
        return TemplateResponse(
            request, "admin/reliable_events/deadletter/discard_confirmation.html", context
        )

    # -- views ----------------------------------------------------------------------
    def get_urls(self) -> list[URLPattern]:
        wrap = self.admin_site.admin_view
        return [
            path("overview/", wrap(self.overview_view), name="reliable_events_overview"),
            path(
                "groups/",
                wrap(self.groups_view),
                name="reliable_events_deadletter_groups",
            ),
            path(
                "groups/act/",
                wrap(self.group_action_view),
                name="reliable_events_deadletter_group_action",
            ),
            path("timeline/", wrap(self.timeline_view), name="reliable_events_timeline"),
            path(
                "<path:object_id>/edit/",
                wrap(self.edit_view),
                name="reliable_events_deadletter_edit",
            ),
            path(
                "<path:object_id>/triage/",
                wrap(self.triage_view),
                name="reliable_events_deadletter_triage",
            ),
            *super().get_urls(),
        ]

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        context = {
            "groups_url": reverse(f"{self.admin_site.name}:reliable_events_deadletter_groups"),
            "top_groups": failure_groups(limit=5),
            # "Select all N" then acts on these letters only: see listed_selection().
            "re_upto": highest_id(),
            **(extra_context or {}),
        }
        return super().changelist_view(request, extra_context=context)

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        letter = deadletters.with_retry_counts(
            DeadLetter.objects.filter(pk=_int_or_404(object_id))
        ).first()
        name = self.admin_site.name
        context = {
            "can_retry": self.has_retry_permission(request),
            "can_discard": self.has_discard_permission(request),
            "can_edit": has_edit_permission(request),
            # Why "Retry now" would fail (not JSON, no id...): shown instead of the button.
            "retry_blocked": deadletters.retry_block_reason(letter) if letter else None,
            "edit_blocked": deadletters.edit_block_reason(letter) if letter else None,
            "key_hold": held_by(letter._state.db or "default", letter) if letter else None,
            "parked_url": reverse(f"{name}:reliable_events_parkedevent_changelist"),
            "retry_count": getattr(letter, "retry_count", 0),
            "triage_url": reverse(f"{name}:reliable_events_deadletter_triage", args=[object_id]),
            "edit_url": reverse(f"{name}:reliable_events_deadletter_edit", args=[object_id]),
            "timeline_url": timeline_url(name, letter.message_id)
            if letter and letter.message_id
            else "",
            **(extra_context or {}),
        }
        return super().change_view(request, object_id, form_url, extra_context=context)

    def history_view(
        self, request: HttpRequest, object_id: str, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        """Django's history page plus the letter's triage audit trail."""
        context = {**history_context(object_id), **(extra_context or {})}
        return super().history_view(request, object_id, extra_context=context)

    def timeline_view(self, request: HttpRequest) -> HttpResponse:
        return timeline_view(self, request)

    def edit_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        return edit_view(self, request, _int_or_404(object_id))

    def triage_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """Retry or discard one dead letter from its detail page (POST only)."""
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        letter = get_object_or_404(DeadLetter.objects.only("id"), pk=_int_or_404(object_id))
        op = request.POST.get("op")
        note = request.POST.get("note", "").strip()
        back = reverse(
            f"{self.admin_site.name}:reliable_events_deadletter_change", args=[letter.pk]
        )
        if op == "retry":
            if not self.has_retry_permission(request):
                raise PermissionDenied
            result = deadletters.retry(
                [letter], user=request_username(request), note=note, source="admin"
            )
            report(self, request, result, "retried")
        elif op == "discard":
            if not self.has_discard_permission(request):
                raise PermissionDenied
            if not note:
                self.message_user(
                    request, "Say why you discard it: the note is required.", messages.ERROR
                )
                return HttpResponseRedirect(back)
            result = deadletters.discard(
                [letter], note=note, user=request_username(request), source="admin"
            )
            report(self, request, result, "discarded")
        else:
            self.message_user(request, "Unknown operation.", messages.ERROR)
        return HttpResponseRedirect(back)

    def groups_view(self, request: HttpRequest) -> HttpResponse:
        """Open failures grouped by consumer and fingerprint, with group actions."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        changelist = reverse(f"{self.admin_site.name}:reliable_events_deadletter_changelist")
        groups = [
            {
                "group": group,
                "filter_url": changelist
                + "?"
                + urlencode({"fingerprint": group.fingerprint, "consumer": group.consumer}),
            }
            for group in failure_groups(limit=200)
        ]
        context = {
            **self.admin_site.each_context(request),
            "title": _("Open failures by group"),
            "opts": self.opts,
            "groups": groups,
            "can_retry": self.has_retry_permission(request),
            "can_discard": self.has_discard_permission(request),
            "action_url": reverse(
                f"{self.admin_site.name}:reliable_events_deadletter_group_action"
            ),
            "overview_url": self.overview_url(),
        }
        return TemplateResponse(request, "admin/reliable_events/deadletter/groups.html", context)

    def group_action_view(self, request: HttpRequest) -> HttpResponse:
        """Retry or discard the open dead letters of one group the user saw (POST only)."""
        return group_action_view(self, request)

    def overview_view(self, request: HttpRequest) -> HttpResponse:
        """Backlog, dead rows, open dead letters by consumer, the last 24 hours."""
        outbox_admin = self.admin_site._registry.get(OutboxMessage)
        allowed = self.has_view_permission(request) or (
            outbox_admin is not None and outbox_admin.has_view_permission(request)
        )
        if not allowed:
            raise PermissionDenied
        hours, options = overview_options(request)
        data = overview(hours=hours)
        name = self.admin_site.name
        deadletters_url = reverse(f"{name}:reliable_events_deadletter_changelist")
        outbox_url = reverse(f"{name}:reliable_events_outboxmessage_changelist")
        by_consumer = sorted(
            data.status.open_dead_letters_by_consumer.items(), key=lambda item: (-item[1], item[0])
        )
        context = {
            **self.admin_site.each_context(request),
            "title": _("Reliable events overview"),
            "opts": self.opts,
            "data": data,
            "oldest_pending_age": age_text(data.status.oldest_pending_age_seconds),
            "by_consumer": [
                (consumer, count, deadletters_url + "?" + urlencode({"consumer": consumer}))
                for consumer, count in by_consumer
            ],
            "chart": build_chart(data.hours),
            "totals": data.totals,
            "pending_url": outbox_url + "?" + urlencode({"status__exact": "pending"}),
            "dead_outbox_url": outbox_url + "?" + urlencode({"status__exact": "dead"}),
            "deadletters_url": deadletters_url,
            "held_keys_url": reverse(f"{name}:reliable_events_keyhold_changelist"),
            "groups_url": reverse(f"{name}:reliable_events_deadletter_groups"),
            "top_groups": failure_groups(limit=5),
            **options,
        }
        return TemplateResponse(request, "admin/reliable_events/overview.html", context)


def _int_or_404(value: str) -> int:
    number = int_or_none(value)
    if number is None:
        raise Http404(f"{value[:40]!r} is not a dead-letter id")
    return number
