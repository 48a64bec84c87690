"""A Django project that uses reliable_events the way a user would (see docs/demo.md)."""

from demo_project.celery import app as celery_app

__all__ = ["celery_app"]
