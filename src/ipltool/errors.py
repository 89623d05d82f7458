"""Typed errors of ipltool; the CLI turns each into one line plus a hint."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable


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


class RunConfigError(DomainError):
    """A run folder's `config.toml` that is TOML but not a valid domain.

    Args:
        message: the one-line error, naming the file.
        reason: pydantic's first message alone, for callers that name the file themselves.
    """

    def __init__(self, message: str, reason: str, hint: str | None = None):
        super().__init__(message, hint)
        self.reason = reason


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


class NonFiniteError(IplError):
    """A NaN or infinite loss, weight or output: the run stops instead of writing it (exit code 1).

    Training raises it before anything non-finite is saved, so the run directory keeps
    its last finite state; the hint names the likely cause (learning rate, precision, inputs).
    """


# ----------------------------------------------------------------------------
# Misspelled names


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """The tail ` — did you mean 'x'?` when one of `choices` is close to `name`, else "".

    Closeness is difflib's ratio (at least 0.6), compared without case so that `Disney`
    finds `disney`; the suggestion keeps the choice's own spelling.
    """
    if len(str(name)) > 200:
        return ""  # no name is that long; difflib would take seconds over a megabyte of text
    by_lower = {}
    for choice in choices:
        by_lower.setdefault(str(choice).lower(), str(choice))
    close = difflib.get_close_matches(str(name).lower(), list(by_lower), n=1, cutoff=0.6)
    if not close or by_lower[close[0]] == name:
        return ""
    return f" — did you mean {by_lower[close[0]]!r}?"


def unknown_name(
    what: str,
    name: str,
    choices: Iterable[str],
    *,
    label: str = "known",
    hint: str | None = None,
    error: type[IplError] = UnknownNameError,
) -> IplError:
    """The error for a name that is not one of `choices`, for the caller to raise.

    Message: `unknown {what} {name!r}`, plus ` — did you mean 'x'?` when a choice is
    close; hint: `{label}: a, b, c`, then `hint` after a semicolon.

    Args:
        what: the kind of name, as the user knows it ("domain", "mapper", "metric").
        name: what was given.
        choices: the valid names, in the order they should be listed.
        label: introduces the list in the hint ("known domains", "installed").
        hint: more advice after the list (optional).
        error: the class to build (`UnknownNameError`, or e.g. `DomainError`).
    """
    choices = [str(c) for c in choices]
    listing = f"{label}: {', '.join(choices) or 'none'}"
    return error(f"unknown {what} {name!r}{did_you_mean(name, choices)}", hint=f"{listing}; {hint}" if hint else listing)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def first_line(err: BaseException) -> str:
    """The first informative line of an exception: what a one-line error can show.

    Never empty: an exception without a message gives its type's name. Colour codes are
    dropped, and torch's long weights-only refusal is cut to what it refused.
    """
    text = _ANSI.sub("", str(err))
    marker = "WeightsUnpickler error:"
    if marker in text:  # torch's long weights-only message: keep the part that says what was refused
        text = text.split(marker, 1)[1]
        text = text.split(". Please", 1)[0]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if lines:
        return lines[0][:300]
    if isinstance(err, EOFError):
        return "the file ends early (truncated)"
    return type(err).__name__
