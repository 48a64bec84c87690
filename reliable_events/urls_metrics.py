"""``path("metrics/", include("reliable_events.urls_metrics"))``: the Prometheus
endpoint of the web process (see ``docs/observability.md``)."""

from django.urls import path

from reliable_events.metrics_collector import metrics_view

urlpatterns = [path("", metrics_view, name="reliable_events_metrics")]
