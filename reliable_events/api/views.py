"""API views: dead-letter triage and outbox stats (thin shells over the services)."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from rest_framework import status as http
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.pagination import PageNumberPagination
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.viewsets import GenericViewSet, ViewSet

from reliable_events import deadletters
from reliable_events.api.filters import (
    MAX_ID,
    MAX_PAGE_SIZE,
    as_id,
    filter_dead_letters,
    reject_nul,
)
from reliable_events.api.parsers import PARSERS
from reliable_events.api.permissions import DeadLetterPermission, OutboxPermission
from reliable_events.api.serializers import (
    HEAVY_FIELDS,
    DeadLetterDetailSerializer,
    DeadLetterListSerializer,
    DiscardNoteSerializer,
    DiscardSelectionSerializer,
    EditRetrySerializer,
    NoteSerializer,
    OutboxRetrySerializer,
    RetrySelectionSerializer,
    triage_outcome,
)
from reliable_events.models import MESSAGE_ID_MAX_LENGTH, DeadLetter
from reliable_events.overview import failure_groups, overview
from reliable_events.relay import retry_dead
from reliable_events.timeline import timeline

MAX_GROUPS = 500
#: ``outbox/stats/?range=``: hours of the hourly series (as the admin overview offers).
STATS_RANGES = {"1h": 1, "24h": 24, "7d": 168}
#: ``TriageEntry.source`` of changes made through the API.
SOURCE = "api"


class DeadLetterPagination(PageNumberPagination):
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = MAX_PAGE_SIZE


def _user(request: Request) -> str:
    return str(request.user.get_username()) if request.user.is_authenticated else ""


def _letters_by_id(ids: list[int]) -> list[DeadLetter]:
    """Handles for the service, which locks the rows and reports unknown ids itself."""
    return [DeadLetter(pk=pk) for pk in ids]


class DeadLetterViewSet(GenericViewSet[DeadLetter]):
    """List, filter, inspect, retry and discard dead letters.

    Every change goes through :mod:`reliable_events.deadletters` (the service behind
    the admin and ``retry_dead_letters``) and answers with what it did.
    """

    permission_classes = (DeadLetterPermission,)
    parser_classes = PARSERS
    pagination_class = DeadLetterPagination
    lookup_value_regex = "[^/]+"

    def get_queryset(self) -> QuerySet[DeadLetter]:
        return deadletters.with_retry_counts(DeadLetter.objects.all())

    def get_serializer_class(self) -> Any:
        return DeadLetterDetailSerializer if self.action == "retrieve" else DeadLetterListSerializer

    def get_object(self) -> DeadLetter:
        raw = str(self.kwargs.get(self.lookup_field, ""))
        pk = as_id(raw)
        if pk is None:
            raise NotFound(
                f"{raw[:40]!r} is not a dead-letter id: ids are positive integers "
                f"(ASCII digits, at most {MAX_ID})."
            )
        letter = self.get_queryset().filter(pk=pk).first()
        if letter is None:
            raise NotFound(f"No dead letter with id {pk}.")
        self.check_object_permissions(self.request, letter)
        return letter

    # -- reading --------------------------------------------------------------------
    def list(self, request: Request) -> Response:
        query = filter_dead_letters(self.get_queryset().defer(*HEAVY_FIELDS), request.query_params)
        page = self.paginate_queryset(query)
        serializer = DeadLetterListSerializer(page, many=True)
        return self.get_paginated_response(serializer.data)

    def retrieve(self, request: Request, pk: str | None = None) -> Response:
        return Response(DeadLetterDetailSerializer(self.get_object()).data)

    @action(detail=False, methods=["get"])
    def groups(self, request: Request) -> Response:
        """Open dead letters grouped by consumer and fingerprint, largest first."""
        unknown = sorted(set(request.query_params) - {"limit", "format"})
        if unknown:
            raise ValidationError(
                {"detail": [f"unknown parameter(s): {', '.join(unknown)}; allowed: limit."]}
            )
        limit = as_id(request.query_params.get("limit", "100"))
        if limit is None or limit > MAX_GROUPS:
            raise ValidationError({"limit": [f"must be an integer from 1 to {MAX_GROUPS}."]})
        groups = failure_groups(limit=limit)
        return Response({"count": len(groups), "results": [g.as_dict() for g in groups]})

    @action(detail=False, methods=["get"])
    def timeline(self, request: Request) -> Response:
        """Everything known about one ``message_id``: outbox, consumers, dead letters, audit."""
        params = request.query_params
        reject_nul(params)
        unknown = sorted(set(params) - {"message_id", "format"})
        if unknown:
            raise ValidationError(
                {"detail": [f"unknown parameter(s): {', '.join(unknown)}; allowed: message_id."]}
            )
        if len(params.getlist("message_id")) > 1:
            raise ValidationError({"message_id": ["give one message id."]})
        message_id = params.get("message_id", "").strip()
        if not message_id or len(message_id) > MESSAGE_ID_MAX_LENGTH:
            raise ValidationError(
                {"message_id": [f"give a message id of 1 to {MESSAGE_ID_MAX_LENGTH} characters."]}
            )
        return Response(timeline(message_id).as_dict())

    # -- one dead letter --------------------------------------------------------------
    @action(detail=True, methods=["post"])
    def retry(self, request: Request, pk: str | None = None) -> Response:
        letter = self.get_object()
        body = NoteSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        result = deadletters.retry(
            [letter],
            user=_user(request),
            note=body.validated_data["note"],
            source=SOURCE,
            force=body.validated_data["force"],
        )
        return self._single_outcome("retry", result)

    @action(detail=True, methods=["post"])
    def discard(self, request: Request, pk: str | None = None) -> Response:
        letter = self.get_object()
        body = DiscardNoteSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        result = deadletters.discard(
            [letter], note=body.validated_data["note"], user=_user(request), source=SOURCE
        )
        return self._single_outcome("discard", result)

    @action(detail=True, methods=["post"], url_path="edit-retry")
    def edit_retry(self, request: Request, pk: str | None = None) -> Response:
        """Publish a corrected ``payload`` as a copy with a new message id; ``note`` required."""
        letter = self.get_object()
        body = EditRetrySerializer(data=request.data)
        body.is_valid(raise_exception=True)
        result = deadletters.edit_and_retry(
            letter,
            body.validated_data["payload"],
            user=_user(request),
            note=body.validated_data["note"],
            source=SOURCE,
            force=body.validated_data["force"],
        )
        return self._single_outcome("edit-retry", result)

    @staticmethod
    def _single_outcome(name: str, result: deadletters.TriageResult) -> Response:
        # Nothing done on one named dead letter means it was not open: a conflict.
        code = http.HTTP_200_OK if result.done else http.HTTP_409_CONFLICT
        return Response(triage_outcome(name, result), status=code)

    # -- many ---------------------------------------------------------------------------
    @action(detail=False, methods=["post"], url_path="retry")
    def bulk_retry(self, request: Request) -> Response:
        """Retry by ``ids``, by ``consumer``/``fingerprint``, or ``all``; ``dry_run`` to preview."""
        body = RetrySelectionSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        result = deadletters.retry(
            self._selection(data),
            user=_user(request),
            note=data["note"],
            source=SOURCE,
            dry_run=data["dry_run"],
            force=data["force"],
        )
        return Response(triage_outcome("retry", result, dry_run=data["dry_run"]))

    @action(detail=False, methods=["post"], url_path="discard")
    def bulk_discard(self, request: Request) -> Response:
        """Discard by ``ids``, by ``consumer``/``fingerprint``, or ``all``; ``note`` required."""
        body = DiscardSelectionSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        result = deadletters.discard(
            self._selection(data),
            note=data["note"].strip(),
            user=_user(request),
            source=SOURCE,
            dry_run=data["dry_run"],
        )
        return Response(triage_outcome("discard", result, dry_run=data["dry_run"]))

    @staticmethod
    def _selection(data: dict[str, Any]) -> Any:
        if "ids" in data:
            return _letters_by_id(list(dict.fromkeys(data["ids"])))
        return deadletters.select(
            consumer=data.get("consumer"),
            fingerprint=data.get("fingerprint"),
            everything=bool(data.get("all")),
            upto=data.get("upto"),
        ).only("id")


class OutboxViewSet(ViewSet):
    """Outbox health and retrying dead outbox rows."""

    permission_classes = (OutboxPermission,)
    parser_classes = PARSERS

    @action(detail=False, methods=["get"])
    def stats(self, request: Request) -> Response:
        """Backlog, dead rows, open dead letters by consumer, per hour over ``range``.

        ``range`` is ``1h``, ``24h`` (default) or ``7d``: ``hourly`` covers it and
        ``totals`` sums it; ``last_24h`` always sums the last 24 hours of it.
        """
        reject_nul(request.query_params)
        unknown = sorted(set(request.query_params) - {"range", "format"})
        if unknown:
            raise ValidationError(
                {"detail": [f"unknown parameter(s): {', '.join(unknown)}; allowed: range."]}
            )
        chosen = request.query_params.get("range", "24h")
        if chosen not in STATS_RANGES:
            raise ValidationError({"range": [f"use one of {', '.join(STATS_RANGES)}."]})
        data = overview(hours=STATS_RANGES[chosen])
        body = data.as_dict()
        body["range"] = chosen
        body["totals"] = data.totals
        body["last_24h"] = {
            key: sum(getattr(bucket, key) for bucket in data.hours[-24:]) for key in data.totals
        }
        return Response(body)

    @action(detail=False, methods=["post"], url_path="retry-dead")
    def retry_dead(self, request: Request) -> Response:
        """Make dead outbox rows pending again (the relay publishes them next)."""
        body = OutboxRetrySerializer(data=request.data)
        body.is_valid(raise_exception=True)
        ids = body.validated_data.get("ids")
        count = retry_dead(ids)
        return Response({"count": count, "detail": f"made {count} dead outbox message(s) pending"})
