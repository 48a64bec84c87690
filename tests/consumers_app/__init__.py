"""A test-only app whose ``consumers.py`` defines a consumer only when a test asks for one.

Subprocess tests (``consume_events`` killed, restarted, or hosted by Celery) describe the
consumer in the environment variable ``RE_TEST_CONSUMER`` (see ``consumers.py``).
"""
