"""Every module of the package can be the first one a project imports.

A project's own app listed before ``reliable_events`` in ``INSTALLED_APPS`` imports its
consumers from its ``ready()`` (``from reliable_events.consumer import EventConsumer``),
before anything of ours is loaded: an import cycle between our packages then fails the
project's start with ``ImportError: ... partially initialized module``.

Each module is imported that way in a fresh interpreter state: a driver process configures
Django once and loads the third-party libraries, then forks a child per module whose
``django.setup()`` runs such an app's ``ready()`` first.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import reliable_events

ROOT = Path(__file__).resolve().parents[2]

DRIVER = r"""
import json, os, sys, traceback, types
import django
from django.apps import AppConfig
from django.conf import settings

target = [None]
first = types.ModuleType("import_first")


class Config(AppConfig):
    name = "import_first"
    path = os.getcwd()

    def ready(self):
        __import__(target[0])


Config.__module__ = "import_first"
first.Config = Config
sys.modules["import_first"] = first
settings.configure(
    INSTALLED_APPS=[
        "django.contrib.contenttypes",
        "django.contrib.auth",
        "import_first.Config",
        "django.contrib.admin",
        "django.contrib.sessions",
        "django.contrib.messages",
        "reliable_events",
    ],
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
)
# The libraries our modules import, loaded once before the forks (none imports a module
# of ours, so no cycle of ours can hide behind them): the children import ours only.
for library in (
    "amqp", "celery", "django.contrib.admin", "django.db.models", "django.forms", "kombu",
    "kombu.transport.pyamqp", "opentelemetry.propagate", "opentelemetry.trace",
    "prometheus_client", "psycopg", "rest_framework.serializers", "rest_framework.views",
    "rest_framework.viewsets",
):
    try:
        __import__(library)
    except ImportError:  # an optional extra this lane does not install
        pass

def start(module):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        target[0] = module
        try:
            django.setup()
            status = 0
        except BaseException:
            os.write(write, traceback.format_exc(limit=-3).encode())
            status = 1
        os._exit(status)
    os.close(write)
    return pid, read


failures = {}
waiting = list(reversed(sys.argv[1:]))
running = {}
while waiting or running:
    while waiting and len(running) < 2:
        module = waiting.pop()
        running[module] = start(module)
    module = next(iter(running))
    pid, read = running.pop(module)
    with os.fdopen(read, "rb") as reader:
        error = reader.read().decode()
    os.waitpid(pid, 0)
    if error:
        failures[module] = error
print(json.dumps(failures))
"""


def package_modules() -> list[str]:
    return sorted(
        info.name
        for info in pkgutil.walk_packages(reliable_events.__path__, "reliable_events.")
        if ".migrations" not in info.name
    )


def test_every_module_can_be_imported_first_from_a_projects_ready():
    modules = ["reliable_events", *package_modules()]
    assert "reliable_events.consumer" in modules
    assert len(modules) > 50
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, *modules],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    failures = json.loads(done.stdout.strip().splitlines()[-1])
    assert failures == {}, "\n".join(f"{name}:\n{error}" for name, error in failures.items())
