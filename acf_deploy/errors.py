"""Errors that the CLI maps to its documented exit codes (docs/guarantees.md §7)."""

from __future__ import annotations


class AcfError(Exception):
    """Base class: a one-line message for the user and an exit code."""

    exit_code = 2


class CheckFailed(AcfError):
    """A parity or verification check did not pass (exit 1)."""

    exit_code = 1


class BadInput(AcfError):
    """Bad usage or bad input: wrong shapes, NaNs, corrupt or mismatched files (exit 2)."""

    exit_code = 2


class BackendUnavailable(AcfError):
    """The requested backend cannot run on this machine (exit 3)."""

    exit_code = 3
