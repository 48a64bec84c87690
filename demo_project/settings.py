"""Demo project settings.

With no environment at all it runs on SQLite and the database transport (``db://``; no
server needed), relayed by the ``relay_outbox`` daemon.  Set ``DATABASE_URL``-style
variables to use PostgreSQL and RabbitMQ: ``DEMO_PG_NAME`` (and
``DEMO_PG_HOST``/``DEMO_PG_PORT``/``DEMO_PG_USER``) and ``DEMO_BROKER_URL``; on RabbitMQ
the relay is a Celery worker with beat, whose own tasks go through the same RabbitMQ.

Safe by default: ``DEBUG`` is off (``DJANGO_DEBUG=1`` turns it on, and the library's
exception-reporter filter then masks the broker password on the debug page), the secret
key is random per ``DEMO_VAR_DIR`` (or ``DJANGO_SECRET_KEY``), only the demo's own host
names are accepted (``demo_project.hosts``), and pages cannot be framed.
"""

from __future__ import annotations

import os
import secrets
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from demo_project.hosts import allowed_hosts

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("DEMO_VAR_DIR", BASE_DIR / "var"))


def _secret_key(path: Path) -> str:
    """A random key kept in ``path`` (shared by the demo's processes): a well-known key
    would let anyone who reaches the demo forge an admin session."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written aside, then linked into place: a process never reads a half-written key.
        draft = path.with_name(f"{path.name}.{os.getpid()}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(50) + "\n")
        try:
            os.link(draft, path)
        except FileExistsError:
            pass  # another process of the demo was first: use its key
        finally:
            draft.unlink()
    return path.read_text().strip()


SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY") or _secret_key(VAR_DIR / "secret-key.txt")
DEBUG = os.environ.get("DJANGO_DEBUG", "0") == "1"
# DEMO_HOST is scripts/demo's --host (the supervisor passes it on to every process).
ALLOWED_HOSTS = allowed_hosts(
    os.environ.get("DEMO_HOST", "127.0.0.1"), os.environ.get("DEMO_ALLOWED_HOSTS", "")
)
# With DEBUG on, Django's debug page lists every setting and the environment: this
# filter masks the password inside URLs (BROKER_URL, DEMO_BROKER_URL...).
DEFAULT_EXCEPTION_REPORTER_FILTER = "reliable_events.debug.SafeExceptionReporterFilter"
USE_TZ = True
TIME_ZONE = "UTC"
ROOT_URLCONF = "demo_project.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    # reliable-events[beat] (scripts/demo installs it): the relay on RabbitMQ runs on beat's
    # DatabaseScheduler. Without it (Django 6.1) the demo runs the relay_outbox daemon.
    *(["django_celery_beat"] if find_spec("django_celery_beat") else []),
    "reliable_events",
    "demo_project.orders",
    "demo_project.inventory",
    "demo_project.notifications",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]
# No page of the demo may be framed (a framing page could make a click retry a group).
X_FRAME_OPTIONS = "DENY"
# Explicit, though Django's defaults: SecurityMiddleware sends nosniff, a same-origin
# referrer policy and COOP; cookies are HttpOnly (session) and SameSite=Lax.  The demo
# is plain HTTP, so no HSTS, SSL redirect or Secure cookies.
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
CSRF_COOKIE_SAMESITE = "Lax"

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
STATIC_ROOT = VAR_DIR / "static"

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.SessionAuthentication",
        "rest_framework.authentication.BasicAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {"reliable_events": {"handlers": ["console"], "level": "INFO"}},
}

DATABASES: dict[str, dict[str, Any]]
if os.environ.get("DEMO_PG_NAME"):
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": os.environ["DEMO_PG_NAME"],
            "USER": os.environ.get("DEMO_PG_USER", "postgres"),
            "PASSWORD": os.environ.get("DEMO_PG_PASSWORD", ""),
            "HOST": os.environ.get("DEMO_PG_HOST", "127.0.0.1"),
            "PORT": os.environ.get("DEMO_PG_PORT", "5432"),
        }
    }
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": VAR_DIR / "demo.sqlite3",
            # Several processes write (web, relay, consumers): WAL, and BEGIN IMMEDIATE so
            # a transaction takes the write lock up front and waits for it (``timeout``)
            # instead of failing with "database is locked" when it upgrades mid-way.
            "OPTIONS": {
                "timeout": 30,
                "init_command": "PRAGMA journal_mode=WAL;",
                "transaction_mode": "IMMEDIATE",
            },
        }
    }

BROKER_URL = os.environ.get("DEMO_BROKER_URL", "db://")  # events: the database transport
RELIABLE_EVENTS: dict[str, Any] = {"BROKER_URL": BROKER_URL}

# Celery runs only on RabbitMQ (scripts/demo starts ``celery worker -B`` then, and the
# ``relay_outbox`` daemon otherwise): its tasks need a broker that is safe across
# processes, which kombu's server-less transports are not.
if BROKER_URL.startswith("amqp"):
    CELERY_BROKER_URL = BROKER_URL
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
# One worker: no remote control, gossip or mingle (scripts/demo also passes
# --without-gossip --without-mingle), so no extra queues on the broker.
CELERY_WORKER_ENABLE_REMOTE_CONTROL = False
CELERY_TASK_IGNORE_RESULT = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# Beat wakes at least this often (seconds): quick to stop, quick to see schedule edits.
CELERY_BEAT_MAX_LOOP_INTERVAL = 2
