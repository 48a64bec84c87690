from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/events/", include("reliable_events.api.urls")),
    path("metrics/", include("reliable_events.urls_metrics")),
    path("health/", include("reliable_events.urls_health")),
]
