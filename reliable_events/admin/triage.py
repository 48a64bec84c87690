"""Admin pages of triage beyond the changelists: timeline, edit and retry, audit history.

Thin views over :mod:`reliable_events.timeline` and :mod:`reliable_events.deadletters`;
``admin.py`` wires them into the dead-letter admin's URLs.  Also the guard that keeps the
changelists' URL lookups to the documented filters.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import DateField, Max, QuerySet
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseNotAllowed,
    HttpResponseRedirect,
)
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.dateparse import parse_datetime
from django.utils.html import format_html
from django.utils.http import urlencode
from django.utils.safestring import SafeString
from django.utils.translation import gettext_lazy as _

from reliable_events import deadletters, payload_search
from reliable_events.conf import app_settings
from reliable_events.deadletters import TriageResult
from reliable_events.exceptions import InvalidEvent
from reliable_events.models import DeadLetter, TriageEntry
from reliable_events.publishing import checked_payload
from reliable_events.timeline import timeline

if TYPE_CHECKING:
    _ModelAdmin = admin.ModelAdmin[Any]
else:
    _ModelAdmin = admin.ModelAdmin

APP_LABEL = "reliable_events"
MESSAGE_ID_PARAM = "message_id"


# -- URL lookups ------------------------------------------------------------------------
class DocumentedLookupsOnly:
    """Refuse every URL lookup but the documented filters (a 400, not a scan or a 500).

    Django's admin accepts any lookup on a local field in the query string:
    ``?payload__contains=`` (a 500 on SQLite), ``?consumer__regex=.*`` or
    ``?traceback__icontains=`` (unindexed scans any viewer may start), and a NUL in a
    value is a 500 on PostgreSQL.  Allowed are the
    parameters the page's own ``list_filter`` entries and ``date_hierarchy`` produce,
    plus ``url_lookups`` (plain ``field=value`` links from other pages).
    """

    url_lookups: Collection[str] = ()

    def documented_lookups(self) -> set[str]:
        allowed = set(self.url_lookups)
        model: Any = getattr(self, "model")  # noqa: B009 - set by ModelAdmin, not this mixin
        for item in getattr(self, "list_filter", ()):
            if isinstance(item, type) and issubclass(item, admin.SimpleListFilter):
                allowed.add(str(item.parameter_name))
                continue
            name = item[0] if isinstance(item, tuple | list) else item
            if not isinstance(name, str):
                continue
            allowed |= {f"{name}__exact", f"{name}__isnull"}
            if isinstance(model._meta.get_field(name), DateField):
                allowed |= {f"{name}__gte", f"{name}__lt"}
        hierarchy = getattr(self, "date_hierarchy", None)
        if hierarchy:
            allowed |= {f"{hierarchy}__{part}" for part in ("year", "month", "day")}
        return allowed

    def lookup_allowed(self, lookup: str, value: str, request: HttpRequest | None = None) -> bool:
        # PostgreSQL refuses NUL in text: that would be a 500, not "no match".
        if lookup not in self.documented_lookups() or "\x00" in str(value):
            return False
        part = lookup.rpartition("__")[2]
        if part in _DATE_PARTS and lookup.startswith(f"{getattr(self, 'date_hierarchy', '')}__"):
            # Django builds a datetime of these: past its range it raises OverflowError
            # (a 500), not the ValueError it turns into a 400.
            low, high = _DATE_PARTS[part]
            text = str(value)
            return text.isascii() and text.isdigit() and len(text) <= 4 and low <= int(text) <= high
        if part in ("gte", "lt") and not settings.USE_TZ:
            # Naive datetimes only: SQLite refuses an aware one then (a 500).
            return not _has_offset(str(value))
        return True


def _has_offset(text: str) -> bool:
    try:
        parsed = parse_datetime(text)
    except ValueError:  # well-formed but impossible: Django's own 400
        return False
    return parsed is not None and parsed.tzinfo is not None


#: The date-hierarchy parameters and the values a date can have.
_DATE_PARTS = {"year": (1, 9999), "month": (1, 12), "day": (1, 31)}


def int_or_none(value: str | None) -> int | None:
    """A positive 64-bit id in ASCII digits (``int()`` takes "١٢"; SQLite overflows past 2**63)."""
    text = (value or "").strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 19):
        return None
    number = int(text)
    return number if 0 < number < 2**63 else None


#: Skipped ids listed in a message before "and N more".
MAX_LISTED = 10


def report(modeladmin: _ModelAdmin, request: HttpRequest, result: TriageResult, verb: str) -> None:
    """Tell the user what a triage call did, including why it skipped rows."""
    text = result.summary(verb).capitalize() + "."
    if result.skipped:
        listed = list(result.skipped.items())[:MAX_LISTED]
        details = "; ".join(f"#{pk}: {why}" for pk, why in listed)
        more = len(result.skipped) - len(listed)
        text += f" Skipped {details}" + (f"; and {more} more." if more else ".")
    if result.done and not result.skipped:
        level = messages.SUCCESS
    elif result.done:
        level = messages.WARNING
    else:
        level = messages.ERROR
    modeladmin.message_user(request, text, level)
    for warning in result.warnings:
        modeladmin.message_user(request, f"Warning: {warning}.", messages.WARNING)


class PayloadFilter(admin.SimpleListFilter):
    """``?payload=order_id=42`` or ``?payload={"order_id": 42}``: see :mod:`payload_search`."""

    title = _("payload")
    parameter_name = "payload"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        value = self.value()
        return [(value, f"contains {value[:60]}")] if value else []

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if not value:
            return queryset
        try:
            return payload_search.search(queryset, payload_search.parse(value))
        except payload_search.PayloadQueryError as exc:
            messages.error(request, f"Payload search: {exc}")
            return queryset.none()


# -- links --------------------------------------------------------------------------------
def timeline_url(site_name: str, message_id: str) -> str:
    return (
        reverse(f"{site_name}:reliable_events_timeline")
        + "?"
        + urlencode({MESSAGE_ID_PARAM: message_id})
    )


def timeline_link(site_name: str, message_id: str) -> SafeString | str:
    if not message_id:
        return "-"
    return format_html(
        '<a class="re-timeline-link" href="{}" title="{}">timeline</a>',
        timeline_url(site_name, message_id),
        message_id,
    )


# -- timeline -------------------------------------------------------------------------------
def can_see_timeline(request: HttpRequest) -> bool:
    user = request.user
    return any(
        user.has_perm(f"{APP_LABEL}.view_{model}")
        for model in ("deadletter", "outboxmessage", "processedmessage")
    )


def timeline_view(modeladmin: _ModelAdmin, request: HttpRequest) -> HttpResponse:
    """Everything known about one message id (``?message_id=``), oldest first."""
    if not can_see_timeline(request):
        raise PermissionDenied
    message_id = request.GET.get(MESSAGE_ID_PARAM, "").strip()
    if "\x00" in message_id or len(message_id) > 255:
        raise Http404("not a message id")
    data = timeline(message_id) if message_id else None
    site = modeladmin.admin_site.name
    links = {
        "deadletter": request.user.has_perm(f"{APP_LABEL}.view_deadletter"),
        "outboxmessage": request.user.has_perm(f"{APP_LABEL}.view_outboxmessage"),
        "processedmessage": request.user.has_perm(f"{APP_LABEL}.view_processedmessage"),
    }
    rows = [
        {
            "event": event,
            "url": reverse(f"{site}:reliable_events_{event.row[0]}_change", args=[event.row[1]])
            if links[event.row[0]]
            else "",
            "note": event.details.get("note", ""),
            "changes": json.dumps(event.details.get("changes"), indent=2, sort_keys=True)
            if event.details.get("changes")
            else "",
        }
        for event in (data.events if data else [])
    ]
    context = {
        **modeladmin.admin_site.each_context(request),
        "title": _("Message timeline"),
        "opts": modeladmin.opts,
        "message_id": message_id,
        "timeline": data,
        "rows": rows,
        "copies": [(copy, timeline_url(site, copy)) for copy in (data.copies if data else [])],
        "copy_of_url": timeline_url(site, data.copy_of) if data and data.copy_of else "",
        "retry_counts": sorted(data.retry_counts().items()) if data else [],
    }
    return TemplateResponse(request, "admin/reliable_events/timeline.html", context)


# -- edit and retry -----------------------------------------------------------------------
def has_edit_permission(request: HttpRequest) -> bool:
    return bool(request.user.has_perm(f"{APP_LABEL}.edit_deadletter"))


class EditPayloadForm(forms.Form):
    payload = forms.CharField(
        widget=forms.Textarea(
            attrs={"rows": 18, "cols": 90, "class": "re-pre", "id": "re-payload"}
        ),
        strip=False,
        help_text=_("The corrected payload, as JSON. It is published as a copy with a new id."),
    )
    note = forms.CharField(
        max_length=2000,
        widget=forms.TextInput(attrs={"size": 60, "id": "re-edit-note"}),
        help_text=_("What you changed and why (kept in the audit trail)."),
    )

    def clean_payload(self) -> Any:
        text = self.cleaned_data["payload"]
        limit = int(app_settings.MAX_PAYLOAD_BYTES)
        if len(text.encode()) > limit:
            raise forms.ValidationError(f"The payload is over MAX_PAYLOAD_BYTES ({limit} bytes).")
        try:
            value = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise forms.ValidationError(f"Not valid JSON: {str(exc)[:200]}") from None
        try:
            checked_payload(value)
        except InvalidEvent as exc:  # what publish_event refuses: NUL, lone surrogates
            raise forms.ValidationError(f"Not publishable: {exc}.") from None
        return value


def initial_payload(letter: DeadLetter) -> str:
    if letter.payload is not None or not letter.raw_body:
        return json.dumps(letter.payload, indent=2, sort_keys=True, ensure_ascii=False)
    return letter.raw_body


def edit_view(modeladmin: _ModelAdmin, request: HttpRequest, letter_id: int) -> HttpResponse:
    """Edit an open dead letter's payload and publish the fix as a copy (new message id)."""
    if not has_edit_permission(request):
        raise PermissionDenied
    letter = DeadLetter.objects.filter(pk=letter_id).first()
    if letter is None:
        raise Http404("no such dead letter")
    site = modeladmin.admin_site.name
    change_url = reverse(f"{site}:reliable_events_deadletter_change", args=[letter.pk])
    if letter.status != DeadLetter.Status.OPEN:
        modeladmin.message_user(
            request,
            f"Dead letter #{letter.pk} is {letter.status}: nothing to edit.",
            messages.ERROR,
        )
        return HttpResponseRedirect(change_url)
    form = EditPayloadForm(
        request.POST if request.method == "POST" else None,
        initial={"payload": initial_payload(letter)},
    )
    if request.method == "POST" and form.is_valid():
        result = deadletters.edit_and_retry(
            letter,
            form.cleaned_data["payload"],
            user=str(request.user.get_username()),
            note=form.cleaned_data["note"].strip(),
            source="admin",
        )
        if result.done:
            copy_id = result.copies[letter.pk]
            modeladmin.message_user(
                request,
                f"Published an edited copy of dead letter #{letter.pk} as message {copy_id} "
                f"to queue {letter.queue or letter.consumer}.",
                messages.SUCCESS,
            )
            return HttpResponseRedirect(timeline_url(site, letter.message_id or copy_id))
        reason = "; ".join(result.skipped.values()) or "it is gone"
        modeladmin.message_user(request, f"Not retried: {reason}.", messages.ERROR)
        return HttpResponseRedirect(change_url)
    context = {
        **modeladmin.admin_site.each_context(request),
        "title": _("Edit and retry dead letter #%(id)s") % {"id": letter.pk},
        "opts": modeladmin.opts,
        "original": letter,
        "form": form,
        "change_url": change_url,
    }
    return TemplateResponse(request, "admin/reliable_events/deadletter/edit.html", context)


# -- overview options ---------------------------------------------------------------------
#: ``?range=`` of the overview: hourly buckets shown.
OVERVIEW_RANGES = {"1h": 1, "24h": 24, "7d": 168}
#: ``?refresh=`` of the overview: seconds between reloads (0: off).
REFRESH_CHOICES = (0, 10, 30, 60)


def overview_options(request: HttpRequest) -> tuple[int, dict[str, Any]]:
    """Hours to chart and the range / auto-refresh links of the overview page.

    Auto-refresh is a ``<meta http-equiv="refresh">`` chosen by a link: no script, so it
    works under a strict Content-Security-Policy.  An unknown value falls back to 24 h (or
    off) with a warning on the page that names it.
    """
    chosen = request.GET.get("range", "24h")
    if chosen not in OVERVIEW_RANGES:
        messages.warning(
            request,
            f"Unknown range {chosen[:40]!r} (one of {', '.join(OVERVIEW_RANGES)}): showing 24h.",
        )
        chosen = "24h"
    given = request.GET.get("refresh", "")
    refresh = int_or_none(given) or 0
    if refresh not in REFRESH_CHOICES or (not refresh and given.strip() not in ("", "0")):
        messages.warning(
            request,
            f"Unknown refresh {given[:40]!r} (seconds: one of "
            f"{', '.join(map(str, REFRESH_CHOICES))}): auto-refresh is off.",
        )
        refresh = 0

    def link(**changes: Any) -> str:
        params = {"range": chosen, "refresh": refresh, **changes}
        return "?" + urlencode({k: v for k, v in params.items() if v})

    return OVERVIEW_RANGES[chosen], {
        "range": chosen,
        "refresh_seconds": refresh,
        "range_links": [(name, link(range=name), name == chosen) for name in OVERVIEW_RANGES],
        "refresh_links": [
            (f"{n} s" if n else "off", link(refresh=n), n == refresh) for n in REFRESH_CHOICES
        ],
    }


# -- "select all N" acts on what was listed ---------------------------------------------------
def listed_selection(
    modeladmin: Any, request: HttpRequest, queryset: QuerySet[DeadLetter]
) -> QuerySet[DeadLetter] | None:
    """The letters an action may touch: explicit ids as ticked; with "select all N", the
    matching letters up to the highest id when the list was drawn (``re_upto``), and
    nothing when more of those match than were listed (``re_seen``: a late commit).
    ``None`` (after telling the user) when the action must not run."""
    if request.POST.get("select_across") != "1":
        return queryset
    upto = int_or_none(request.POST.get("re_upto"))
    seen = int_or_none(request.POST.get("re_seen"))
    if upto is None or seen is None:
        modeladmin.message_user(
            request, "Reload the list: its snapshot (re_upto, re_seen) is missing.", messages.ERROR
        )
        return None
    shown = queryset.filter(pk__lte=upto)
    matching = shown.count()
    if matching > seen:
        modeladmin.message_user(
            request,
            f"The list changed since you looked: {matching} letters up to #{upto} match now, "
            f"{seen} were listed. Nothing was done; look at the list again.",
            messages.ERROR,
        )
        return None
    newer = queryset.filter(pk__gt=upto).count()
    if newer:
        modeladmin.message_user(
            request,
            f"{newer} dead letter(s) matching the filters arrived since the list was drawn "
            "and were not touched.",
            messages.WARNING,
        )
    return shown


def highest_id() -> int:
    """The snapshot of a changelist: every letter it lists has an id up to this."""
    return int(DeadLetter.objects.aggregate(top=Max("id"))["top"] or 0)


# -- group actions ------------------------------------------------------------------------
def group_action_view(modeladmin: Any, request: HttpRequest) -> HttpResponse:
    """Retry or discard exactly the open letters of a group that the user saw (POST only).

    The groups page posts the group's highest id (``upto``) and its count (``seen``) with
    the button.  Letters that arrived since have higher ids and are left alone (and
    counted in the message); if more letters up to ``upto`` are open than were shown (a
    transaction that committed late), nothing is done and the user is asked to look
    again.  Letters resolved meanwhile by someone else are skipped by the service.
    """
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    back = reverse(f"{modeladmin.admin_site.name}:reliable_events_deadletter_groups")
    fingerprint = request.POST.get("fingerprint")
    consumer = request.POST.get("consumer")
    op = request.POST.get("op")
    note = request.POST.get("note", "").strip()
    user = str(request.user.get_username())
    if op == "retry" and not modeladmin.has_retry_permission(request):
        raise PermissionDenied
    if op == "discard" and not modeladmin.has_discard_permission(request):
        raise PermissionDenied

    def fail(text: str) -> HttpResponse:
        modeladmin.message_user(request, text, messages.ERROR)
        return HttpResponseRedirect(back)

    if op not in ("retry", "discard"):
        return fail("Unknown operation.")
    if fingerprint is None or not consumer or "\x00" in fingerprint + consumer:
        return fail("Pick a group: consumer and fingerprint are required.")
    if op == "discard" and not note:
        return fail("Say why you discard them: the note is required.")
    upto, seen = int_or_none(request.POST.get("upto")), int_or_none(request.POST.get("seen"))
    if upto is None or seen is None:
        return fail("Reload the groups page: the group's snapshot (upto, seen) is missing.")
    group = deadletters.select(consumer=consumer, fingerprint=fingerprint)
    shown = group.filter(pk__lte=upto)
    matching = shown.count()
    if matching > seen:
        return fail(
            f"The group changed since you looked: {matching} open letters up to #{upto} now, "
            f"{seen} shown. Nothing was done; look at the group again."
        )
    newer = group.filter(pk__gt=upto).count()
    if op == "retry":
        result = deadletters.retry(shown.only("id"), user=user, note=note, source="admin group")
    else:
        result = deadletters.discard(shown.only("id"), note=note, user=user, source="admin group")
    report(modeladmin, request, result, "retried" if op == "retry" else "discarded")
    if newer or result.count < seen:
        modeladmin.message_user(
            request,
            f"The group changed since you looked: you saw {seen}, {result.count} were acted on; "
            f"{newer} newer letter(s) arrived meanwhile and were not touched.",
            messages.WARNING,
        )
    return HttpResponseRedirect(back)


# -- audit ----------------------------------------------------------------------------------
def history_context(letter_id: str) -> dict[str, Any]:
    """The triage entries of one dead letter, for its History page."""
    pk = int_or_none(letter_id)
    if pk is None:
        return {"triage_entries": []}
    entries = TriageEntry.objects.filter(dead_letter_id=pk).order_by("id")[:500]
    return {
        "triage_entries": [
            {
                "entry": entry,
                "changes": json.dumps(entry.changes, indent=2, sort_keys=True)
                if entry.changes
                else "",
            }
            for entry in entries
        ]
    }


__all__ = [
    "DocumentedLookupsOnly",
    "edit_view",
    "history_context",
    "timeline_link",
    "timeline_url",
    "timeline_view",
]
