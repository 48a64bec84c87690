"""A Celery app for the test that hosts the consumers in ``celery worker`` (ConsumerStep)."""

from __future__ import annotations

import os

from celery import Celery

from reliable_events.bootsteps import ConsumerStep

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

app = Celery("tests")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.steps["worker"].add(ConsumerStep)
