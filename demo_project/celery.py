"""The demo's Celery app: the relay and purge tasks run on beat's DatabaseScheduler.

Run it with ``celery -A demo_project worker -B`` (scripts/demo does); the schedule is
installed by ``manage.py install_beat_schedule``.
"""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo_project.settings")

app = Celery("demo_project")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
