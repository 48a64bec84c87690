"""URLs of the API; mount them with ``path("api/events/", include("reliable_events.api.urls"))``.

``dead-letters/`` (list, filters), ``dead-letters/groups/``, ``dead-letters/retry/`` and
``dead-letters/discard/`` (bulk), ``dead-letters/<id>/``, ``dead-letters/<id>/retry/``,
``dead-letters/<id>/discard/``, ``dead-letters/<id>/edit-retry/``,
``dead-letters/timeline/?message_id=``, ``outbox/stats/``, ``outbox/retry-dead/``.
See ``docs/api.md``.
"""

from __future__ import annotations

from django.urls import URLPattern, URLResolver
from rest_framework.routers import SimpleRouter

from reliable_events.api.views import DeadLetterViewSet, OutboxViewSet

app_name = "reliable_events_api"

router = SimpleRouter()
router.register("dead-letters", DeadLetterViewSet, basename="dead-letter")
router.register("outbox", OutboxViewSet, basename="outbox")

urlpatterns: list[URLPattern | URLResolver] = list(router.urls)
