"""Markers for tests of optional dependencies that a test lane may not install."""

from __future__ import annotations

from importlib.util import find_spec

import pytest

#: django-celery-beat (reliable-events[beat]) declares Django<6.1: the Django 6.1 lane runs
#: without it, the Python 3.11 lane (Django 5.2) with it.
needs_beat = pytest.mark.skipif(
    find_spec("django_celery_beat") is None,
    reason="django-celery-beat is not installed (the Django 6.1 lane: it declares Django<6.1)",
)
