"""Typed errors of ipltool; the CLI turns each into one line plus a hint."""

from __future__ import annotations


class IplError(Exception):
    """Base class of every error ipltool raises on purpose.

    Args:
        message: one line saying what went wrong.
        hint: one line saying what to do about it (optional).
    """

    exit_code = 1
    label = "error"  # how the CLI introduces the message

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(IplError):
    """Bad input from the user (a flag, a file, a name): exit code 2."""

    exit_code = 2


class DomainError(UsageError):
    """A domain file that cannot be read, parsed or validated, or a domain name not found."""


class UnknownNameError(UsageError):
    """A plugin, model or architecture name that is not installed or registered."""


class PluginError(IplError):
    """An installed plugin failed to load or returned something of the wrong kind."""


class CheckpointError(UsageError):
    """A checkpoint file that does not match the architecture it is loaded into."""


class Interrupted(IplError):
    """The user stopped a run (Ctrl-C or SIGTERM) after its state was saved: exit code 130."""

    exit_code = 130
    label = "stopped"
