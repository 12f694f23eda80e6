"""Errors a user can fix: a bad path, field, ratio or corrupt file. The CLIs catch ``UserError`` and print its one
line (exit 2); the recipes' CLIs print ``LostRankError`` (another rank died or stalled) as one line too (exit 1);
anything else is a bug and keeps its traceback and a non-zero exit on every rank.

Subclasses name the part that found the problem; every message names the file or config field and what was expected.
``UserError`` derives from ``ValueError`` because every one of them is a value the user gave.
"""

from __future__ import annotations


class UserError(ValueError):
    """Something the user can fix; the message is one line naming the file or field and what was expected."""


class ConfigError(UserError):
    """A config file, field or override."""


class RunError(UserError):
    """A run folder, mode or stage input (another run in the folder, a changed input on resume)."""


class TicketError(UserError):
    """A ticket that is malformed, corrupt, or drawn for another geometry."""


class DataError(UserError):
    """Input data: shards, vocab, task files."""


class ModelFolderError(UserError):
    """An HF-format model folder: missing config or weights, shapes that do not match."""


class LostRankError(RuntimeError):
    """Another rank of a multi-rank run died, stalled, or failed with a bug of its own: this rank stops with one line
    naming it (the CLIs print it, exit 1); the run resumes with --resume."""
