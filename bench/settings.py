"""Settings for the benchmarks: the test settings on their own PostgreSQL database.

``RE_BENCH_PG_NAME`` overrides the database name (default ``re_bench``); create it
with ``createdb -h 127.0.0.1 -U postgres re_bench`` (``bench/run`` does, and migrates).
"""

from __future__ import annotations

import os

from tests.settings import *  # noqa: F403
from tests.settings import AMQP_URL, DATABASES

DATABASES = {
    "default": {
        **DATABASES["default"],
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ.get("RE_BENCH_PG_NAME", "re_bench"),
        "USER": os.environ.get("RE_TEST_PG_USER", "postgres"),
        "PASSWORD": os.environ.get("RE_TEST_PG_PASSWORD", ""),
        "HOST": os.environ.get("RE_TEST_PG_HOST", "127.0.0.1"),
        "PORT": os.environ.get("RE_TEST_PG_PORT", "5432"),
    }
}
BENCH_AMQP_URL = AMQP_URL
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"reliable_events": {"handlers": ["console"], "level": "ERROR"}},
}
