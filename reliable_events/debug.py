"""Django's error reports without broker passwords.

Django's debug page (``DEBUG = True``: any error, including a request with a bad
``Host:`` header) and the error e-mails list every setting, the request's ``META`` (which
under ``runserver`` holds the whole process environment) and the local variables of
each frame.  Django hides values whose *name* looks secret (``PASSWORD``, ``KEY``...),
not a password inside a URL: ``BROKER_URL``, ``CELERY_BROKER_URL`` or
``RELIABLE_EVENTS['BROKER_URL']`` show in clear.  Install this filter::

    DEFAULT_EXCEPTION_REPORTER_FILTER = "reliable_events.debug.SafeExceptionReporterFilter"

System check ``reliable_events.W003`` warns when ``DEBUG`` is on, a broker URL has a
password and this filter (or a subclass) is not installed.
"""

from __future__ import annotations

import re
from pprint import pformat
from typing import Any
from urllib.parse import urlsplit

from django.views import debug

from reliable_events.sanitize import redact

#: ``scheme://user:password@`` anywhere in a text (the userinfo of a URL with a password).
_URL_WITH_PASSWORD = re.compile(
    r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s/@'\"<>]*:[^\s/'\"<>]*@[^\s'\"<>]*"
)
#: The same userinfo, its password in no group (masked even where ``urlsplit`` fails).
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://[^\s/@'\"<>]*:)[^\s/'\"<>]*@")


def mask_urls(text: str) -> str:
    """``text`` with the password of every URL in it masked (``***``)."""
    # Longest password first: one may contain another.
    for url in sorted(set(_URL_WITH_PASSWORD.findall(text)), key=_password_length, reverse=True):
        text = redact(text, url)
    # A URL urlsplit cannot read (an unclosed "[" in its host) still has its userinfo.
    return _USERINFO.sub(r"\1***@", text)


def _password_length(url: str) -> int:
    try:
        return len(urlsplit(url).password or "")
    except ValueError:
        return 0


class _Masked:
    """Shows as the masked ``repr`` of a frame variable on the report."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


class SafeExceptionReporterFilter(debug.SafeExceptionReporterFilter):
    """Django's filter, plus: the password of any URL in a setting (also nested in
    dicts and lists, e.g. ``RELIABLE_EVENTS``), in ``request.META`` (environment
    variables such as ``DEMO_BROKER_URL``) and in a frame's local variables is masked.
    """

    def cleanse_setting(self, key: Any, value: Any) -> Any:
        cleansed = super().cleanse_setting(key, value)  # recurses through this method
        return mask_urls(cleansed) if isinstance(cleansed, str) else cleansed

    def get_traceback_frame_variables(self, request: Any, tb_frame: Any) -> Any:
        variables = super().get_traceback_frame_variables(request, tb_frame)
        return [(name, self._mask_variable(value)) for name, value in variables]

    @staticmethod
    def _mask_variable(value: Any) -> Any:
        if isinstance(value, str):
            return mask_urls(value)
        try:
            text = pformat(value)
        except Exception:  # the report shows the error itself; nothing to mask here
            return value
        masked = mask_urls(text)
        return value if masked == text else _Masked(masked)
