"""Serializers of the API: dead letters (list and detail), selections, outcomes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rest_framework import serializers
from rest_framework.settings import api_settings
from rest_framework.utils import html

from reliable_events.api.filters import MAX_ID
from reliable_events.deadletters import TriageResult
from reliable_events.exceptions import InvalidEvent
from reliable_events.models import DeadLetter
from reliable_events.publishing import checked_payload

#: Largest explicit id list a bulk call accepts.
MAX_BULK_IDS = 10_000
MAX_NOTE = 2000

LIST_FIELDS = (
    "id",
    "status",
    "consumer",
    "queue",
    "message_id",
    "topic",
    "key",
    "reason",
    "error_type",
    "error_message",
    "fingerprint",
    "attempts",
    "first_failed_at",
    "last_failed_at",
    "created_at",
    "resolved_at",
    "resolved_by",
)
#: Fields the list never loads.
HEAVY_FIELDS = ("payload", "raw_body", "headers", "traceback", "history", "note")


class DeadLetterListSerializer(serializers.ModelSerializer[DeadLetter]):
    #: Retries of this message for this consumer so far (``deadletters.with_retry_counts``).
    retries = serializers.IntegerField(source="retry_count", read_only=True, default=0)

    class Meta:
        model = DeadLetter
        fields = (*LIST_FIELDS, "retries")
        read_only_fields = fields


class DeadLetterDetailSerializer(DeadLetterListSerializer):
    class Meta:
        model = DeadLetter
        fields = (*LIST_FIELDS, "retries", *HEAVY_FIELDS)
        read_only_fields = fields


class StrictSerializer(serializers.Serializer[Any]):
    """A request body: a key it does not know is a 400 naming it (a typo such as
    ``"dryrun": true`` must not run the real thing)."""

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, Mapping):
            unknown = sorted(str(key)[:40] for key in data if key not in self.fields)
            if unknown:
                raise serializers.ValidationError(
                    {
                        api_settings.NON_FIELD_ERRORS_KEY: [
                            f"unknown field(s): {', '.join(unknown[:5])}; "
                            f"allowed: {', '.join(self.fields)}."
                        ]
                    }
                )
        return super().to_internal_value(data)


class Flag(serializers.BooleanField):
    """A yes/no field of a request body: a JSON body gives ``true`` or ``false``, a form
    ``true``/``false``, ``on``/``off`` or ``1``/``0`` (DRF's ``BooleanField`` also
    reads ``"yes"``, ``"y"`` or ``"N"``, and in a JSON body a string is a client's bug:
    ``"all": "no"`` must not be guessed)."""

    FORM_VALUES = {"true": True, "on": True, "1": True, "false": False, "off": False, "0": False}
    default_error_messages = {
        "invalid": "Must be true or false.",
    }

    def to_internal_value(self, data: Any) -> bool:
        if isinstance(data, bool):
            return data
        value = None
        if isinstance(data, str) and html.is_html_input(self.root.initial_data):
            value = self.FORM_VALUES.get(data.strip().lower())
        if value is None:
            self.fail("invalid")
        return value


class NoteSerializer(StrictSerializer):
    """Body of a single retry (note optional; ``force``: also for a consumer not
    registered in the web process)."""

    note = serializers.CharField(required=False, allow_blank=True, max_length=MAX_NOTE, default="")
    force = Flag(required=False, default=False)


class DiscardNoteSerializer(StrictSerializer):
    """Body of a single discard: say why."""

    note = serializers.CharField(max_length=MAX_NOTE, allow_blank=False, trim_whitespace=True)


class EditRetrySerializer(StrictSerializer):
    """Body of an edit and retry: the corrected ``payload`` (any JSON) and a ``note``."""

    payload = serializers.JSONField()
    note = serializers.CharField(max_length=MAX_NOTE, allow_blank=False, trim_whitespace=True)
    force = Flag(required=False, default=False)

    def validate_payload(self, value: Any) -> Any:
        try:
            checked_payload(value)
        except InvalidEvent as exc:  # what publish_event refuses: NUL, lone surrogates, size
            raise serializers.ValidationError(f"{exc}.") from None
        return value


class SelectionSerializer(StrictSerializer):
    """Which open dead letters a bulk call acts on.

    Either ``ids``; or ``consumer`` and/or ``fingerprint``; or ``all: true``.
    """

    ids = serializers.ListField(
        child=serializers.IntegerField(min_value=1, max_value=MAX_ID),
        required=False,
        allow_empty=False,
        max_length=MAX_BULK_IDS,
    )
    consumer = serializers.CharField(required=False, allow_blank=False, max_length=200)
    fingerprint = serializers.CharField(required=False, allow_blank=True, max_length=64)
    all = Flag(required=False, default=False)
    #: Only letters with ids up to this one: what the caller saw (a group's ``last_id``).
    upto = serializers.IntegerField(required=False, min_value=1, max_value=MAX_ID)
    dry_run = Flag(required=False, default=False)
    note = serializers.CharField(required=False, allow_blank=True, max_length=MAX_NOTE, default="")

    note_required = False

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        has_ids = "ids" in attrs
        has_group = "consumer" in attrs or "fingerprint" in attrs
        everything = bool(attrs.get("all"))
        chosen = sum([has_ids, has_group, everything])
        if chosen == 0:
            raise serializers.ValidationError(
                "say which dead letters: give ids, or consumer and/or fingerprint, or all: true."
            )
        if chosen > 1:
            raise serializers.ValidationError(
                "give only one of: ids; consumer and/or fingerprint; all: true."
            )
        if self.note_required and not attrs.get("note", "").strip():
            raise serializers.ValidationError({"note": ["say why they are discarded."]})
        return attrs


class RetrySelectionSerializer(SelectionSerializer):
    """A bulk retry's selection; ``force``: also letters of consumers not registered in
    the web process."""

    force = Flag(required=False, default=False)


class DiscardSelectionSerializer(SelectionSerializer):
    note_required = True


class OutboxRetrySerializer(StrictSerializer):
    """Which dead outbox rows to make pending again: ``ids`` or ``all: true``."""

    ids = serializers.ListField(
        child=serializers.IntegerField(min_value=1, max_value=MAX_ID),
        required=False,
        allow_empty=False,
        max_length=MAX_BULK_IDS,
    )
    all = Flag(required=False, default=False)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if ("ids" in attrs) == bool(attrs.get("all")):
            raise serializers.ValidationError("give either ids or all: true.")
        return attrs


def triage_outcome(action: str, result: TriageResult, *, dry_run: bool = False) -> dict[str, Any]:
    """The response body of a retry or discard."""
    verb = {"retry": "retried", "discard": "discarded", "edit-retry": "retried"}[action]
    outcome = {
        "action": action,
        "dry_run": dry_run,
        "count": result.count,
        "done": result.done,
        "skipped": {str(pk): why for pk, why in result.skipped.items()},
        # The outbox rows carrying the re-deliveries (retry only): follow them there.
        "outbox_ids": list(getattr(result, "outbox_ids", [])),
        "warnings": list(result.warnings),
        "detail": ("would have " if dry_run else "") + result.summary(verb),
    }
    if action == "edit-retry":  # the new message id of the copy, by dead-letter id
        outcome["copies"] = {str(pk): copy for pk, copy in result.copies.items()}
    return outcome
