"""``path("health/", include("reliable_events.urls_health"))``: the health endpoint
(JSON, 200 or 503; see ``docs/observability.md``)."""

from django.urls import path

from reliable_events.health import health_view

urlpatterns = [path("", health_view, name="reliable_events_health")]
