"""Settings for the test suite.

``RE_TEST_DATABASE`` picks the database: ``postgres`` (default; the real PostgreSQL at
``RE_TEST_PG_HOST``/``RE_TEST_PG_PORT``) or ``sqlite`` (the embedded configuration).
``RE_TEST_AMQP_URL`` is the real RabbitMQ used by tests marked ``rabbitmq``.
"""

from __future__ import annotations

import os
from importlib.util import find_spec
from typing import Any

SECRET_KEY = "tests-only-not-secret"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
ROOT_URLCONF = "tests.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    # An optional dependency (reliable-events[beat]); the Django 6.1 lane runs without it.
    *(["django_celery_beat"] if find_spec("django_celery_beat") else []),
    "reliable_events",
    "tests.testapp",
    "tests.consumers_app",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]

# A strict Content Security Policy: scripts, styles, images and fonts from our own origin
# only, no inline code, no plugins, no framing. tests/unit/test_admin_csp.py renders every
# admin page of ours under it; with RE_TEST_CSP=1 (the Django 6.1 lane) Django 6's CSP
# middleware sends it on every response, so the browser tests run under it too.
STRICT_CSP = {
    "default-src": ["'none'"],
    "script-src": ["'self'"],
    "style-src": ["'self'"],
    "img-src": ["'self'"],
    "font-src": ["'self'"],
    "connect-src": ["'self'"],
    "form-action": ["'self'"],
    "base-uri": ["'none'"],
    "frame-ancestors": ["'none'"],
    "object-src": ["'none'"],
}
CSP_MIDDLEWARE = "django.middleware.csp.ContentSecurityPolicyMiddleware"
if os.environ.get("RE_TEST_CSP") == "1":
    MIDDLEWARE.insert(1, CSP_MIDDLEWARE)
    SECURE_CSP = STRICT_CSP

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
STATIC_URL = "/static/"

DATABASE_KIND = os.environ.get("RE_TEST_DATABASE", "postgres")
# RE_TEST_SQLITE_WAL=1: several processes share the SQLite file (the SQLite ledger's
# children): WAL, and BEGIN IMMEDIATE takes the write lock up front and waits for it, as
# the demo and docs/relay.md recommend.
_SQLITE_SHARED = (
    {"transaction_mode": "IMMEDIATE", "init_command": "PRAGMA journal_mode=WAL;"}
    if os.environ.get("RE_TEST_SQLITE_WAL") == "1"
    else {}
)
DATABASES: dict[str, dict[str, Any]]
if DATABASE_KIND == "sqlite":
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.environ.get("RE_TEST_SQLITE_NAME", "reliable_events_test.sqlite3"),
            "TEST": {"NAME": os.environ.get("RE_TEST_SQLITE_TEST_NAME") or None},
            "OPTIONS": {"timeout": 30, **_SQLITE_SHARED},
        }
    }
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": os.environ.get("RE_TEST_PG_NAME", "reliable_events"),
            "USER": os.environ.get("RE_TEST_PG_USER", "postgres"),
            "PASSWORD": os.environ.get("RE_TEST_PG_PASSWORD", ""),
            "HOST": os.environ.get("RE_TEST_PG_HOST", "127.0.0.1"),
            "PORT": os.environ.get("RE_TEST_PG_PORT", "5432"),
            "TEST": {"NAME": os.environ.get("RE_TEST_PG_TEST_NAME", "test_reliable_events")},
        }
    }
    # RE_TEST_PG_ISOLATION=serializable (or repeatable_read): the project's default
    # transaction isolation level, as a project may set it (children inherit it).
    if os.environ.get("RE_TEST_PG_ISOLATION"):
        from django.db.backends.postgresql.psycopg_any import (  # type: ignore[import-untyped]
            IsolationLevel,
        )

        level = IsolationLevel[os.environ["RE_TEST_PG_ISOLATION"].upper()]
        DATABASES["default"]["OPTIONS"] = {"isolation_level": level}
    # RE_TEST_PG_POOLED=1: RE_TEST_PG_PORT is a PgBouncer in transaction pooling mode
    # (tests/support/pgbouncer.py); what a pooled connection needs (docs/relay.md).
    if os.environ.get("RE_TEST_PG_POOLED") == "1":
        DATABASES["default"].update(
            {"OPTIONS": {"prepare_threshold": None}, "DISABLE_SERVER_SIDE_CURSORS": True}
        )

AMQP_URL = os.environ.get("RE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")

# PostgreSQL tier: unit tests run on the in-process transport (memory://); tests of
# guarantees override BROKER_URL with AMQP_URL and a per-test exchange.  SQLite tier: the
# embedded default, the database transport (db://); tests written for memory:// ask for it.
# The retry policy is the shipped one (MAX_ATTEMPTS, BACKOFF_BASE, BACKOFF_MAX untouched),
# on a clock 20 times faster: TIME_SCALE scales every relay delay (backoff, broker retry
# pause, on-commit breaker, idle poll), never the policy itself.
RELIABLE_EVENTS = {
    "BROKER_URL": "db://" if DATABASE_KIND == "sqlite" else "memory://",
    "TIME_SCALE": 0.05,
}
# Subprocess tests (a relay_outbox process killed or stopped by a test) point the child at
# the test's own broker and exchange: RE_TEST_RELIABLE_EVENTS is a JSON object whose keys
# override RELIABLE_EVENTS.
if os.environ.get("RE_TEST_RELIABLE_EVENTS"):
    import json

    RELIABLE_EVENTS.update(json.loads(os.environ["RE_TEST_RELIABLE_EVENTS"]))
# Child processes of the trace checks export their spans to a file per process.
if os.environ.get("RE_TEST_OTEL_SPANS"):
    from tests.support.otel_support import install_span_file

    install_span_file(os.environ["RE_TEST_OTEL_SPANS"])
SILENCED_SYSTEM_CHECKS = ["reliable_events.W002"]

CELERY_BROKER_URL = "memory://"
CELERY_TASK_ALWAYS_EAGER = True
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
# RE_TEST_LOG_LEVEL: subprocess tests that count log lines (the ledger) ask for INFO, with
# a timestamp and the pid on each line.
_LOG_LEVEL = os.environ.get("RE_TEST_LOG_LEVEL")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"stamped": {"format": "%(asctime)s %(process)d %(message)s"}},
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            **({"formatter": "stamped"} if _LOG_LEVEL else {}),
        }
    },
    "loggers": {"reliable_events": {"handlers": ["console"], "level": _LOG_LEVEL or "WARNING"}},
}
