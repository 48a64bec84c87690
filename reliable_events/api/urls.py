"""URLs of the API; the full API arrives with the triage issue."""

from __future__ import annotations

from django.urls import URLPattern, URLResolver

app_name = "reliable_events_api"
urlpatterns: list[URLPattern | URLResolver] = []
