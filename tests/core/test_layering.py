"""The architecture's import rules, checked on the source (README "Architecture"):

- the core (`mmoe` top level) imports neither the engine, the tools, the data layer nor a task family;
- no module of `mmoe` imports `vision`, `language` or `multimodal` (families plug in by entry points), and
  no family imports another;
- only `mmoe/train/deepspeed.py` imports DeepSpeed;
- there is no import cycle between modules (imports inside functions count too);
- ``mmoe --help`` and ``mmoe CMD --help`` import neither torch nor DeepSpeed.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("mmoe", "vision", "language", "multimodal")
FAMILIES = ("vision", "language", "multimodal")
# the torch-only core and its light helpers: everything directly in mmoe/
CORE = {p.stem for p in (ROOT / "mmoe").glob("*.py")} - {"__init__", "__main__", "cli"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            out[_module_name(path)] = path
    return out


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports (top level and inside functions; ``if TYPE_CHECKING`` blocks excluded)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                found.add(mod)
                for a in child.names:  # `from . import checkpoint` names a module
                    found.add(f"{mod}.{a.name}")
            visit(child)

    visit(tree)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path) for name, path in mods.items()}


def test_core_imports_no_engine_tools_data_or_family(graph):
    for mod in sorted(f"mmoe.{c}" for c in CORE):
        bad = sorted(m for m in graph[mod]
                     if m.split(".")[0] in FAMILIES or m.startswith(("mmoe.train", "mmoe.tools", "mmoe.data", "mmoe.cli")))
        assert not bad, f"{mod} (core) imports {bad}"


def test_mmoe_never_imports_a_family(graph):
    for mod, imps in sorted(graph.items()):
        if mod.split(".")[0] == "mmoe":
            bad = sorted(m for m in imps if m.split(".")[0] in FAMILIES)
            assert not bad, f"{mod} imports task families {bad}"


def test_no_family_imports_another(graph):
    for mod, imps in sorted(graph.items()):
        family = mod.split(".")[0]
        if family in FAMILIES:
            bad = sorted(m for m in imps if m.split(".")[0] in FAMILIES and m.split(".")[0] != family)
            assert not bad, f"{mod} imports another task family: {bad} (shared code belongs in mmoe)"


def test_only_train_deepspeed_imports_deepspeed(graph):
    users = sorted(mod for mod, imps in graph.items() if any(m.split(".")[0] == "deepspeed" for m in imps))
    assert users == ["mmoe.train.deepspeed"], users


def test_no_import_cycles(graph):
    mods = set(_modules())
    edges = {m: {i for i in graph[m] if i in mods and i != m} for m in mods}
    # a package's __init__ importing its own submodules is not a cycle with them (the submodules import
    # siblings, not the package): drop edges from a module to its own parent packages
    for m in mods:
        edges[m] = {i for i in edges[m] if not m.startswith(i + ".")}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:  # Tarjan
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(mods):
        if v not in index:
            strong(v)
    assert not cycles, f"import cycles: {cycles}"


def test_layering_checks_can_fail(tmp_path):
    """The import scanner sees function-level and relative imports (so the checks above can fail)."""
    f = tmp_path / "m.py"
    f.write_text("from .layer import MoE\n\ndef f():\n    import deepspeed\n    from vision.models import x\n")
    got = _imports("mmoe.m", f)
    assert {"mmoe.layer", "deepspeed", "vision.models"} <= got, got


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["demo", "--help"], ["bench", "layer", "--help"],
                                  ["shards", "digits", "--help"], ["generate", "--help"]])
def test_help_imports_no_torch(argv):
    code = ("import sys, runpy; sys.argv = ['mmoe', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('mmoe', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'deepspeed', 'timm'))\n"
            "print('HEAVY', heavy[:5])")
    env = dict(os.environ)
    p = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=60,
                       cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert "usage: mmoe" in p.stdout
    assert "HEAVY []" in p.stdout, p.stdout[-500:]
