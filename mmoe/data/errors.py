"""Error and warning types of `mmoe.data` (no heavy imports: the CLI loads this at ``--help`` time)."""

from __future__ import annotations


class DataError(RuntimeError):
    """Bad input data: an unreadable or corrupt shard, an undecodable sample, a bad source file or line.

    The message always names where the problem is (the shard URL or input file, the sample key or line
    number) and what it is. ``url`` and ``key`` repeat the location for programs; they are ``None`` when
    they do not apply, and also after the error crossed a DataLoader worker boundary (the worker's
    traceback text is then part of the message instead).
    """

    def __init__(self, message: str, *, url: str | None = None, key: str | None = None):
        super().__init__(message)
        self.url = url
        self.key = key


class DataWarning(UserWarning):
    """A bad sample, shard or input file was skipped (``on_error="skip"``); the message names it."""
