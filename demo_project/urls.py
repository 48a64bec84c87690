from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView
from rest_framework.routers import SimpleRouter

from demo_project.orders.api import OrderViewSet

router = SimpleRouter()
router.register("orders", OrderViewSet, basename="order")

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="admin:reliable_events_overview", permanent=False)),
    path("admin/", admin.site.urls),
    path("api/events/", include("reliable_events.api.urls")),
    path("metrics/", include("reliable_events.urls_metrics")),
    path("health/", include("reliable_events.urls_health")),
    path("api/", include(router.urls)),
]
