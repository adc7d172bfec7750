"""Progress of long jobs as stages of counted steps, so a front end can draw one bar per stage.

The library only reports; what is shown is up to the caller: the CLI draws bars, the Python API stays
silent by default, and a plain text log hears one line per stage.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["Reporter", "TextReporter"]


class Reporter:
    """Hears ``stage(name, total)`` when a stage of ``total`` steps begins and ``advance(note)`` after each step.

    This base class reports nothing: the default of every job that takes one.
    """

    def stage(self, name: str, total: int) -> None:
        """A new stage begins."""

    def advance(self, note: str = "") -> None:
        """One step of the current stage is done; ``note`` says which (e.g. the block just measured)."""


class TextReporter(Reporter):
    """One line per stage (and per note) to a text log, e.g. a spinner's status."""

    def __init__(self, log: Callable[[str], None]):
        self.log, self.name = log, ""

    def stage(self, name: str, total: int) -> None:
        self.name = name
        self.log(name)

    def advance(self, note: str = "") -> None:
        if note:
            self.log(f"{self.name}: {note}")
