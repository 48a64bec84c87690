"""Which command-line values do the commands accept?  ``argparse`` types that refuse what
would otherwise pass and misbehave (``nan``, an id beyond the database's integers, a port
beyond 65535) with a message that says what is wrong."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from django.conf import settings
from django.core.management.base import CommandParser

#: The largest id a database integer column holds (PostgreSQL ``bigint``, SQLite).
MAX_ID = 2**63 - 1


def finite_float(text: str) -> float:
    """A number, not ``nan`` or ``inf`` (``float()`` takes both)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def seconds_ago(text: str) -> float:
    """An age in seconds: a finite number, 0 or more."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative: an age is 0 or more seconds")
    return value


def whole_number(what: str, lowest: int, highest: int) -> Callable[[str], int]:
    """An ``argparse`` type: a whole number from ``lowest`` to ``highest`` (``what`` names
    it in the message)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not lowest <= value <= highest:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what} ({lowest} to {highest})")
        return value

    return parse


#: A TCP port.
port_number = whole_number("a port number", 1, 65535)
#: A row id (the database's integers).
row_id = whole_number("an id", 1, MAX_ID)
#: How many (messages, events, ...): the database's integers bound it.
count = whole_number("a positive count", 1, MAX_ID)
#: Rows per batch: one claim or delete loads them all.
batch_size = whole_number("a batch size", 1, 1_000_000)
#: AMQP ``basic.qos`` prefetch count (a 16-bit field).
prefetch_count = whole_number("a prefetch count", 1, 65535)
#: Seconds of a schedule (django-celery-beat stores a 32-bit integer).
schedule_seconds = whole_number("a number of seconds", 1, 2**31 - 1)


def database_alias(text: str) -> str:
    """An alias of ``DATABASES``."""
    if text not in settings.DATABASES:
        known = ", ".join(sorted(settings.DATABASES))
        raise argparse.ArgumentTypeError(f"{text!r} is not a database alias (DATABASES: {known})")
    return text


class BadArgumentsExit1:
    """Command mixin: arguments the parser refuses exit 1, the code the commands document
    for bad arguments (``argparse`` exits 2, which ``reliable_events_health`` uses for a
    database that does not answer)."""

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        parser: CommandParser = super().create_parser(  # type: ignore[misc]  # mixin of BaseCommand
            prog_name, subcommand, **kwargs
        )
        refuse = parser.error

        def error(message: str) -> NoReturn:
            if parser.called_from_command_line:
                parser.print_usage(sys.stderr)
                parser.exit(1, f"{parser.prog}: error: {message}\n")
            refuse(message)  # raises CommandError (call_command)
            raise AssertionError("unreachable")

        parser.error = error  # type: ignore[method-assign]  # argparse has no exit-code hook
        return parser
