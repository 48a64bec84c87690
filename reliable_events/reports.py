"""How does a command's report print? One base for the "counters + text" reports.

:class:`RelayReport`, :class:`WorkerStats` and :class:`PurgeReport` print as
``name=value`` pairs (the line ``relay_outbox``, ``consume_events`` and
``purge_outbox`` end with, and that scripts parse); each names its printed fields in
``TEXT_FIELDS`` and adds computed ones through :meth:`Report.extra_text`.
"""

from __future__ import annotations

from typing import ClassVar


class Report:
    """A dataclass whose ``str()`` is its ``TEXT_FIELDS`` as ``name=value`` pairs; a
    float prints with three decimals."""

    TEXT_FIELDS: ClassVar[tuple[str, ...]] = ()

    def extra_text(self) -> dict[str, str]:
        """Computed ``name: text`` pairs printed after the fields."""
        return {}

    def __str__(self) -> str:
        pairs = {name: _text(getattr(self, name)) for name in self.TEXT_FIELDS}
        pairs.update(self.extra_text())
        return " ".join(f"{name}={text}" for name, text in pairs.items())


def _text(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)
