"""The ``mmoe`` command line: one table of commands.

`COMMANDS` holds mmoe's own commands (``train``, ``eval``, ``shards``, ``bench``, ``compare``); task families
add theirs through the ``mmoe.commands`` entry-point group of their distribution (``demo``, ``predict``,
``tokenizer``, ``generate`` come from ``vision`` and ``language`` that way; pyproject.toml lists them). Each
entry is a `Command`: ``add_args(parser)`` fills the subcommand's parser, ``run(args)`` returns an exit code.

Start-up stays light: ``mmoe --help`` imports no torch, and ``mmoe CMD --help`` builds only CMD's parser from
a module that imports no torch at module level either (heavy imports belong inside ``run``).

Every user-facing error is a `mmoe.errors.MMoEError`; `main` catches it once and prints it as one line
(``mmoe: error: <file:line / shard / key>: <problem>``), exit status 2, as argparse does for bad flags.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, NamedTuple, NoReturn, Sequence

from .plugins import family_entry_points, load_entry_point

__all__ = ["Command", "COMMANDS", "build_parser", "main", "lazy"]

PROG = "mmoe"


class Command(NamedTuple):
    """One subcommand: ``add_args(parser)``, ``run(namespace) -> exit code`` and its one-line help."""

    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    help: str


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line: ``mmoe bench layer: error: ... (see --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def lazy(module: str, attr: str) -> Callable:
    """A function that imports ``module`` only when called (keeps ``mmoe --help`` fast)."""

    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), attr)(*args, **kwargs)

    call.__qualname__ = f"{module}.{attr}"
    return call


COMMANDS: dict[str, Command] = {
    "train": Command(lazy("mmoe.train.cli", "add_train_args"), lazy("mmoe.train.cli", "run_train"),
                     "train a model from a YAML config (mmoe train CONFIG [key.sub=value ...])"),
    "eval": Command(lazy("mmoe.train.cli", "add_eval_args"), lazy("mmoe.train.cli", "run_eval"),
                    "evaluate a checkpoint (mmoe eval CONFIG --checkpoint PATH)"),
    "shards": Command(lazy("mmoe.data.cli", "add_args"), lazy("mmoe.data.cli", "run"),
                      "write WebDataset shards (image folder, COCO, text, image-text pairs, ...) and verify them"),
    "bench": Command(lazy("mmoe.tools.bench", "add_args"), lazy("mmoe.tools.bench", "run"),
                     "benchmarks (mmoe bench layer)"),
    "compare": Command(lazy("mmoe.tools.compare", "add_args"), lazy("mmoe.tools.compare", "run"),
                       "train one config with several routing variants and seeds; table and validation-loss plot"),
}


def _commands() -> dict[str, Command]:
    out = dict(COMMANDS)
    for name, ep in family_entry_points("mmoe.commands").items():
        if name not in out:
            out[name] = ep  # loaded only when its help or its parser is needed
    return out


def _resolve(entry) -> Command:
    if isinstance(entry, Command):
        return entry
    return load_entry_point(entry, f"command {entry.name!r}")


def _chosen(argv: Sequence[str], names: Sequence[str]) -> str | None:
    for a in argv:
        if not a.startswith("-"):
            return a if a in names else None
    return None


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The ``mmoe`` parser; only the subcommand named in ``argv`` (if any) gets its arguments."""
    parser = _Parser(prog=PROG, description="mmoe: one Mixture-of-Experts core for vision, language and "
                     "multimodal models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    commands = _commands()
    chosen = _chosen(argv, list(commands))
    for name, entry in commands.items():
        command = _resolve(entry)
        p = sub.add_parser(name, help=command.help, description=command.help)
        if name == chosen:
            command.add_args(p)
            p.set_defaults(_run=command.run)
    return parser


def _one_line_warnings() -> None:
    """Print mmoe's own warnings about a user's input (`mmoe.errors.DataWarning`) as one line,
    ``mmoe: warning: ...``, without the file, line and source of the code that raised them."""
    import warnings

    from .errors import DataWarning

    default = warnings.showwarning
    if getattr(default, "_mmoe", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if isinstance(category, type) and issubclass(category, DataWarning):
            print(f"{PROG}: warning: {message}", file=file or sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    show._mmoe = True  # type: ignore[attr-defined]
    warnings.showwarning = show


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mmoe`` console script and of ``python -m mmoe``."""
    from .errors import MMoEError

    argv = list(sys.argv[1:] if argv is None else argv)
    _one_line_warnings()
    # DeepSpeed's launcher puts --local_rank=N before the subcommand; the rank is in LOCAL_RANK too
    argv = [a for a in argv if not a.startswith("--local_rank=")]
    try:
        parser = build_parser(argv)
        args, extra = parser.parse_known_args(argv)
        if extra:
            # `key=value` overrides after an option (`mmoe train CFG --resume a.b=1`) land here
            if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
                args.overrides = [*(args.overrides or []), *extra]
            else:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return args._run(args)
    except MMoEError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
