"""Django's debug page and error reports never show a broker password through
``reliable_events.debug.SafeExceptionReporterFilter``; check ``W003`` says when it is
missing."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import pytest
from django.http import HttpRequest, HttpResponse
from django.test import Client
from django.urls import path
from django.views import debug

from reliable_events.checks import check_debug_filter, reliable_events_checks
from reliable_events.debug import SafeExceptionReporterFilter, mask_urls

PASSWORD = "Xq7-canary-Pw"
URL = f"amqp://app:{PASSWORD}@rabbit-1:5672/prod"
FILTER = "reliable_events.debug.SafeExceptionReporterFilter"


def failing_view(request: HttpRequest) -> HttpResponse:
    broker = URL  # a local variable: shown on the debug page  # noqa: F841
    options = {"urls": [URL], "timeout": 5}  # noqa: F841
    raise RuntimeError("handler failed")


urlpatterns = [path("boom/", failing_view)]


class SubclassedFilter(SafeExceptionReporterFilter):
    pass


@pytest.fixture
def leaky(settings: Any) -> Iterator[Any]:
    """Settings where a password sits in every place Django's page shows."""
    # Django caches the filter instance (not reset by setting_changed).
    cast(Any, debug.get_default_exception_reporter_filter).cache_clear()
    settings.DEBUG = True
    settings.ROOT_URLCONF = __name__
    settings.ALLOWED_HOSTS = ["testserver"]
    settings.RELIABLE_EVENTS = {**settings.RELIABLE_EVENTS, "BROKER_URL": URL}
    settings.CELERY_BROKER_URL = URL
    settings.BROKER_URL = URL
    settings.DEMO_BROKER_URL = URL
    settings.CACHES_LIKE = {"default": {"LOCATION": [f"redis://:{PASSWORD}@cache:6379/0"]}}
    yield settings
    cast(Any, debug.get_default_exception_reporter_filter).cache_clear()


def responses(environ: dict[str, Any]) -> list[Any]:
    client = Client(raise_request_exception=False)
    return [
        client.get("/boom/", **environ),  # a 500 in a view
        client.get("/boom/", HTTP_HOST="evil.example", **environ),  # DisallowedHost: 400
    ]


@pytest.mark.parametrize("name", [FILTER, f"{__name__}.SubclassedFilter"])
def test_the_debug_page_shows_no_broker_password_through_the_filter(leaky, name):
    leaky.DEFAULT_EXCEPTION_REPORTER_FILTER = name
    for response in responses({"DEMO_BROKER_URL": URL}):  # META: the environment
        page = response.content.decode()
        assert type(debug.get_default_exception_reporter_filter()).__name__ == name.split(".")[-1]
        assert response.status_code in (400, 500)
        assert "BROKER_URL" in page
        assert "RELIABLE_EVENTS" in page
        assert "amqp://app:***@rabbit-1:5672/prod" in page
        assert PASSWORD not in page
    assert check_debug_filter() == []


def test_without_the_filter_django_shows_the_password(leaky):
    """The control: what the filter prevents (so the test above can fail)."""
    leaky.DEFAULT_EXCEPTION_REPORTER_FILTER = "django.views.debug.SafeExceptionReporterFilter"
    for response in responses({}):
        assert PASSWORD in response.content.decode()
    assert [m.id for m in check_debug_filter()] == ["reliable_events.W003"]


def test_frame_variables_are_masked_when_debug_is_off_too(leaky):
    """Error e-mails (``DEBUG = False``) carry the frame variables as well."""
    leaky.DEBUG = False
    leaky.DEFAULT_EXCEPTION_REPORTER_FILTER = FILTER
    try:
        failing_view(HttpRequest())
    except RuntimeError as exc:
        tb = exc.__traceback__
        assert tb is not None
        assert tb.tb_next is not None
        variables = dict(
            SafeExceptionReporterFilter().get_traceback_frame_variables(None, tb.tb_next.tb_frame)
        )
    assert variables["broker"] == "amqp://app:***@rabbit-1:5672/prod"
    assert PASSWORD not in repr(variables["options"])
    assert "'timeout': 5" in repr(variables["options"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (URL, "amqp://app:***@rabbit-1:5672/prod"),
        ("no url here", "no url here"),
        ("amqp://guest@host//", "amqp://guest@host//"),  # no password
        (
            f"try amqp://a:{PASSWORD}@h1// then redis://:{PASSWORD}x@h2/0",
            "try amqp://a:***@h1// then redis://:***@h2/0",
        ),
        ("postgres://u:p%40ss@db/x", "postgres://u:***@db/x"),
        # urlsplit refuses it (an unclosed "["): its password is masked all the same
        (f"amqp://u:{PASSWORD}@[rabbit-1//", "amqp://u:***@[rabbit-1//"),
    ],
)
def test_mask_urls(text, expected):
    assert mask_urls(text) == expected


class Unprintable:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def test_a_frame_variable_that_cannot_be_printed_is_left_to_django():
    def fail() -> None:
        thing = Unprintable()  # noqa: F841
        raise RuntimeError("handler failed")

    try:
        fail()
    except RuntimeError as exc:
        tb = exc.__traceback__
        assert tb is not None
        assert tb.tb_next is not None
        variables = dict(
            SafeExceptionReporterFilter().get_traceback_frame_variables(None, tb.tb_next.tb_frame)
        )
    assert isinstance(variables["thing"], Unprintable)  # as is: Django's page reports the error


@pytest.mark.parametrize(
    ("debug", "url", "celery", "installed", "warned"),
    [
        (True, URL, None, None, True),
        (True, "amqp://guest@rabbit//", URL, None, True),  # Celery's URL counts too
        (True, URL, None, FILTER, False),
        (True, URL, None, f"{__name__}.SubclassedFilter", False),
        (True, URL, None, "no.such.Filter", True),
        (False, URL, URL, None, False),
        (True, "memory://", "filesystem://", None, False),
        (True, "amqp://guest@rabbit//", None, None, False),  # no password
        # urlsplit refuses it (an unclosed "["), the page would still show its password
        (True, f"amqp://app:{PASSWORD}@[rabbit-1//", None, None, True),
    ],
)
def test_w003_debug_with_a_broker_password_and_no_filter(
    settings, re_settings, debug, url, celery, installed, warned
):
    settings.DEBUG = debug
    re_settings(BROKER_URL=url)
    settings.CELERY_BROKER_URL = celery
    if installed is not None:
        settings.DEFAULT_EXCEPTION_REPORTER_FILTER = installed
    ids = [m.id for m in reliable_events_checks()]
    assert ("reliable_events.W003" in ids) is warned
    if warned:
        (message,) = list(check_debug_filter())
        assert FILTER in str(message.hint)
        assert PASSWORD not in message.msg + str(message.hint)
