"""Where task families plug in: four entry-point groups of their distribution (pyproject.toml).

- ``mmoe.tasks``: ``name = "package.module:TaskClass"``, a training task selected by ``task: name``;
- ``mmoe.commands``: ``name = "package.module:COMMAND"``, a `mmoe.cli.Command` (``mmoe name ...``);
- ``mmoe.shards``: ``name = "package.module:SOURCE"``, a `mmoe.cli.Command` for ``mmoe shards name ...``;
- ``mmoe.benchmarks``: ``name = "package.module:function"``, the family's groups of ``mmoe bench model``
  (`mmoe.tools.model_bench`).

No module of `mmoe` imports a family; this module finds them by name, standard library only, and imports
one only when it is used.
"""

from __future__ import annotations

__all__ = ["family_entry_points", "load_entry_point"]


def family_entry_points(group: str) -> dict:
    """``{name: EntryPoint}`` of an entry-point group (``mmoe.commands``, ``mmoe.shards``, ``mmoe.tasks``);
    nothing is imported."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=group)}


def load_entry_point(ep, what: str):
    """``ep.load()``, with an import failure of the family turned into one explained line."""
    from .errors import MMoEError

    try:
        return ep.load()
    except ImportError as err:
        raise MMoEError(f"{what} comes from {ep.value}, which cannot be imported ({err}); is that package "
                        "installed (pip install -e .)?") from None
