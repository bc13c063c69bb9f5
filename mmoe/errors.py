"""One base class for every error that is the user's to fix (a config, data, a checkpoint, a run, a
command line). ``mmoe``'s `main` catches `MMoEError` once and prints it as one line, exit status 2;
anything else is a bug in mmoe and keeps its traceback.

No heavy imports here: the CLI loads this module at ``--help`` time.
"""

from __future__ import annotations

__all__ = ["MMoEError", "ConfigError", "DataError", "DataWarning", "CheckpointError", "TrainingError", "CLIError"]


class MMoEError(Exception):
    """Base class of user-facing errors: the message is one line that names the file, field, shard or key."""


class ConfigError(MMoEError, ValueError):
    """A configuration problem: ``"<origin>: <key>: <problem>"``.

    ``origin`` is ``file:line`` when the value came from a file (else the file, ``"<dict>"`` or the
    override that set it), ``key`` the dotted key path (``""`` for the whole document).

    A section's own validation (a dataclass ``__post_init__``, `mmoe.config.moe_config_from_section`) may
    raise it with ``origin=""`` and a key *relative to the section*; the config loader
    (`mmoe.train.configfile`) then prefixes the section's key path and fills in the ``file:line`` of
    that key.
    """

    def __init__(self, origin: str, key: str, problem: str) -> None:
        self.origin, self.key, self.problem = origin, key, problem
        parts = [p for p in (origin, key) if p]
        super().__init__(": ".join([*parts, problem]))

    def __reduce__(self):  # picklable (e.g. raised inside a DataLoader worker)
        return (type(self), (self.origin, self.key, self.problem))


class DataError(MMoEError, RuntimeError):
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


class CheckpointError(MMoEError, RuntimeError):
    """A checkpoint that cannot be used: incomplete, unreadable, or of another model; the message names it."""


class TrainingError(MMoEError, RuntimeError):
    """A run that cannot go on (diverged, bad setup); the message says why."""


class CLIError(MMoEError):
    """A mistake or missing prerequisite on the command line (a missing file, a bad argument)."""
