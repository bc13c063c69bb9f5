"""Strict YAML configurations over dataclasses.

A run's configuration is a tree of dataclasses (the training engine and every task family define
their own; `mmoe.MoEConfig` works as a section). A YAML file fills that tree, single values can be
overridden on the command line, and every mistake is an error that names the file, the line, the
key and the problem instead of falling back to a silent default::

    # configs/tiny.yaml
    base: common.yaml          # optional: load common.yaml (relative to this file) first
    optim:
      lr: 3e-4                 # floats may be written 1e-3 (PyYAML alone would read a string)
      milestones: [100, 200]
    moe:                       # a `mmoe.MoEConfig` section, validated by its own __post_init__
      dim: 64
      num_experts: 8
      router: xmoe
    model:                     # a field typed dict[str, Any]: passed through as is
      depth: 4

::

    @dataclass
    class Optim:
        lr: float = 1e-3
        milestones: list[int] = field(default_factory=list)

    @dataclass
    class Run:
        optim: Optim = field(default_factory=Optim)
        moe: MoEConfig | None = None
        model: dict[str, Any] = field(default_factory=dict)

    cfg = load_config(Run, "configs/tiny.yaml", ["optim.lr=1e-4", "moe.top_k=1"])
    save_config(cfg, "runs/x/config.yaml")          # the resolved config; load_config reads it back

Rules
    * Sections: a field whose type is a dataclass is filled from a YAML mapping. When the field has a
      dataclass default (``field(default_factory=Optim)``) a mapping that sets only some keys changes
      only those keys; the rest keep the default's values. Validation errors raised by the section's
      ``__post_init__`` (``ValueError``) are re-raised as `ConfigError` with the key path, e.g.
      ``configs/tiny.yaml:9: moe.top_k: must be <= num_experts=8 (got 9)``.
    * Types: ``int``, ``float``, ``str``, ``bool``, ``pathlib.Path``, ``Enum`` subclasses (by value or
      name), ``Optional[X]`` / ``X | None`` (``null``), other unions (first alternative that fits),
      ``Literal[...]`` (the error lists the allowed values), ``list[X]``, ``tuple[X, ...]``,
      ``tuple[X, Y]``, ``set[X]``, ``dict[K, V]`` and ``Any``. An ``int`` is accepted for a ``float``,
      and so is a string in scientific notation (``"1e-3"``); a ``bool`` is never an ``int`` or a
      ``float``; a string is accepted for a ``Path``. There are no other coercions: ``"0.5"`` (a quoted
      string) for a float and ``2.0`` for an int are errors.
    * ``Any`` and ``dict[str, Any]`` pass their content through unvalidated (deep-copied). A task can
      validate such a section later with ``from_dict(TaskCfg, cfg.model, source=..., path="model")``
      so its messages carry the same key path.
    * Unknown keys are errors that suggest close matches (``optim.lrr: unknown key (did you mean
      'lr'?)``); a field without a default must be given (``missing required key``).
    * Line numbers: values read from a file are reported as ``file:line`` of their key. `load_config` leaves
      the origins on the object it returns (``cfg._origins``) for sections validated later.
    * Overrides (``load_config(..., overrides)`` / `apply_overrides`): ``a.b.c=value``; the value is
      parsed with YAML scalar rules (``lr=3e-4`` float, ``ep_size=2`` int, ``router=xmoe`` str,
      ``milestones=[1,2]`` list, ``capacity_factor=null`` None; quote to force a string:
      ``name='2'``). An override may set a key that the file did not set (intermediate mappings are
      created); an override of a key the dataclasses do not have is an error naming the override.
    * Inheritance: a top-level ``base: other.yaml`` (or ``_base_:``; a list of files is merged in
      order) loads that file first, path relative to the including file, and deep-merges this file
      over it (mappings merge key by key; any other value, lists included, replaces). Inheritance
      cycles are errors. ``base`` / ``_base_`` are therefore reserved at the top level of a file.
    * `save_config` writes the resolved configuration (after inheritance, overrides and defaults);
      ``load_config(type(cfg), saved) == cfg``.

Every user-facing problem raises `ConfigError` (a ``ValueError``); it also carries ``.origin``
(``file:line``, the file, or the override), ``.key`` (the dotted key path) and ``.problem``.
"""

from __future__ import annotations

import collections.abc as cabc
import copy
import dataclasses
import difflib
import enum
import os
import re
import types
import typing
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar, Union

import yaml

from ..errors import ConfigError

__all__ = [
    "ConfigError",
    "from_dict",
    "locate_error",
    "to_dict",
    "load_config",
    "apply_overrides",
    "save_config",
    "parse_override",
    "load_yaml",
]

T = TypeVar("T")

BASE_KEYS = ("base", "_base_")

# PyYAML implements YAML 1.1, whose float pattern needs a dot and a signed exponent: "1e-3" and "3e5"
# load as strings. The loader and dumper used here also resolve scientific notation as floats.
_SCI_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` / ``3e5`` as floats."""


class _Dumper(yaml.SafeDumper):
    """SafeDumper whose resolver matches `_Loader` (quotes strings such as ``"1e-3"``)."""

    def ignore_aliases(self, data: Any) -> bool:  # never write &anchors / *aliases
        return True


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _SCI_FLOAT, list("-+0123456789."))


# ---------------------------------------------------------------------------------------- helpers
def _join(path: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _parents(path: str):
    """``a.b[2].c`` -> ``a.b[2].c``, ``a.b[2]``, ``a.b``, ``a``."""
    while path:
        yield path
        cut = max(path.rfind("."), path.rfind("["))
        path = path[:cut] if cut > 0 else ""


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def _suggest(word: Any, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=3, cutoff=0.6)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    return "valid keys: " + ", ".join(choices) if choices else "this section takes no keys"


class _Ctx:
    """Where values came from: ``origins`` maps key paths to ``file:line`` (or override) strings."""

    def __init__(self, source: str, origins: Mapping[str, str] | None) -> None:
        self.source = source
        self.origins = origins or {}

    def origin(self, path: str) -> str:
        for p in _parents(path):
            if p in self.origins:
                return self.origins[p]
        return self.source

    def error(self, path: str, problem: str) -> ConfigError:
        return ConfigError(self.origin(path), path, problem)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """Resolved field types of dataclass ``cls`` (string annotations evaluated)."""
    if cls not in _HINTS:
        try:
            _HINTS[cls] = typing.get_type_hints(cls)
        except Exception as e:  # a programming error in the dataclass, not in the config
            raise TypeError(f"cannot resolve the field types of {cls.__qualname__}: {e}") from e
    return _HINTS[cls]


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _init_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _describe(tp: Any) -> str:
    """Human name of a type for messages: ``a float or null``."""
    if tp is Any or tp is object:
        return "anything"
    if tp is type(None):
        return "null"
    if tp is bool:
        return "a bool (true/false)"
    if tp is int:
        return "an int"
    if tp is float:
        return "a float"
    if tp is str:
        return "a string"
    if isinstance(tp, type) and issubclass(tp, os.PathLike):
        return "a path (string)"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    if _is_dataclass_type(tp):
        return f"a mapping (section {tp.__name__})"
    if _is_union(tp):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple, set, frozenset, cabc.Sequence, cabc.MutableSequence, cabc.Set) or tp in (
        list,
        tuple,
        set,
        frozenset,
    ):
        return "a list"
    if origin in (dict, cabc.Mapping, cabc.MutableMapping) or tp is dict:
        return "a mapping"
    return f"a {getattr(tp, '__name__', tp)}"


# ---------------------------------------------------------------------------------------- from_dict
def from_dict(
    cls: type[T],
    data: Mapping,
    *,
    source: str = "<dict>",
    path: str = "",
    origins: Mapping[str, str] | None = None,
) -> T:
    """Build dataclass ``cls`` from a plain mapping, strictly (see the module docstring for the rules).

    Args:
        cls: a dataclass type (nested dataclass fields are built recursively).
        data: the mapping (e.g. a YAML document, or one section of it).
        source: where ``data`` came from, used in messages (a file name, ``"<dict>"``).
        path: key path of ``data`` inside a larger document (``"model"``), prefixed to messages.
        origins: optional map from full key paths to ``file:line`` strings for messages (what
            `load_yaml` returns); `load_config` passes it.

    Raises:
        ConfigError: unknown or missing keys, ill-typed values, or a ``ValueError`` raised by a
            dataclass's ``__post_init__`` (re-raised with the key path).
    """
    if not _is_dataclass_type(cls):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    return _build(cls, data, path, _Ctx(source, origins))


def _build(cls: type, data: Any, path: str, ctx: _Ctx) -> Any:
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ctx.error(path, f"expected a mapping (section {cls.__name__}), got {_show(data)}")
    fields = _init_fields(cls)
    hints = _hints(cls)
    for key in data:
        if key not in fields:
            kpath = _join(path, key)
            if not isinstance(key, str):
                raise ctx.error(kpath, f"keys must be strings, got {_show(key)}")
            if any(f.name == key for f in dataclasses.fields(cls)):
                raise ctx.error(kpath, "cannot be set (computed field)")
            raise ctx.error(kpath, f"unknown key ({_suggest(key, list(fields))})")
    kwargs = {}
    for name, f in fields.items():
        fpath = _join(path, name)
        tp = hints.get(name, Any)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ctx.error(fpath, f"missing required key (expected {_describe(tp)})")
            continue
        value = data[name]
        default = _default_of(f)
        if isinstance(value, Mapping) and dataclasses.is_dataclass(default) and not isinstance(default, type):
            # a partial section changes only the keys it sets: fill the rest from the default
            base = to_dict(default)
            value = _deep_merge(base, value) if isinstance(base, dict) else value
        kwargs[name] = _convert(tp, value, fpath, ctx)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if e.origin:
            raise
        raise _locate(e, path, ctx) from None
    except (ValueError, TypeError) as e:
        raise _section_error(cls, e, path, ctx) from None


def _locate(err: ConfigError, path: str, ctx: _Ctx) -> ConfigError:
    # a section's own validation names a key relative to the section: give it its path and file:line
    return ctx.error(_join(path, err.key) if err.key else path, err.problem)


def locate_error(err: ConfigError, *, path: str, source: str = "<dict>",
                 origins: Mapping[str, str] | None = None) -> ConfigError:
    """``err`` (raised by a section's own validation with an empty origin and a key relative to the section,
    e.g. by `mmoe.moe_config_from_section`) re-targeted to the section at ``path``: the full key and, from
    ``origins``, its ``file:line`` (what `from_dict` does for sections it builds)."""
    return _locate(err, path, _Ctx(source, origins))


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        try:
            return f.default_factory()
        except Exception:
            return None
    return None


def _section_error(cls: type, err: Exception, path: str, ctx: _Ctx) -> ConfigError:
    """A dataclass's own validation error, re-targeted to the key path of the field it names."""
    msg = str(err)
    names = _init_fields(cls)
    # "MoEConfig.top_k: problem" or "top_k: problem"
    m = re.match(r"^\s*(?:(\w+)\.)?(\w+)\s*:\s*(.*)$", msg, re.S)
    if m and m.group(2) in names and m.group(1) in (None, cls.__name__):
        return ctx.error(_join(path, m.group(2)), m.group(3))
    return ctx.error(path, f"{cls.__name__}: {msg}" if path else f"invalid {cls.__name__}: {msg}")


def _convert(tp: Any, value: Any, path: str, ctx: _Ctx, strict: bool = False) -> Any:
    """``value`` checked / converted to type ``tp``; ConfigError at ``path`` when it does not fit.

    ``strict`` turns off the lenient conversions (int/"1e-3" -> float, str -> Path); unions try the
    strict pass first so ``float | str`` keeps ``"1e-3"`` a string.
    """
    if tp is Any or tp is object:
        return copy.deepcopy(value)
    if tp is type(None):
        if value is None:
            return None
        raise ctx.error(path, f"expected null, got {_show(value)}")
    if isinstance(tp, typing.TypeVar):
        return copy.deepcopy(value)
    if _is_union(tp):
        return _convert_union(tp, value, path, ctx, strict)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        for a in args:
            if value == a and type(value) is type(a):
                return a
        hint = ""
        if isinstance(value, str):
            close = difflib.get_close_matches(value, [a for a in args if isinstance(a, str)], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
        allowed = ", ".join(repr(a) for a in args)
        raise ctx.error(path, f"expected one of {allowed}; got {_show(value)}{hint}")
    if typing.get_origin(tp) is typing.Annotated:
        return _convert(args[0], value, path, ctx, strict)
    if _is_dataclass_type(tp):
        return _build(tp, value, path, ctx)
    if origin in (list, cabc.Sequence, cabc.MutableSequence, cabc.Iterable, cabc.Collection) or tp in (list,):
        return _convert_seq(list, args[0] if args else Any, value, path, ctx, strict)
    if origin in (set, frozenset, cabc.Set, cabc.MutableSet) or tp in (set, frozenset):
        kind = frozenset if (origin is frozenset or tp is frozenset) else set
        return kind(_convert_seq(list, args[0] if args else Any, value, path, ctx, strict))
    if origin is tuple or tp is tuple:
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            return tuple(_convert_seq(list, args[0] if args else Any, value, path, ctx, strict))
        if args == ((),):  # tuple[()]
            args = ()
        items = _convert_seq(list, Any, value, path, ctx, strict)
        if len(items) != len(args):
            raise ctx.error(path, f"expected a list of {len(args)} items, got {len(items)}: {_show(value)}")
        return tuple(_convert(a, v, _join(path, i), ctx, strict) for i, (a, v) in enumerate(zip(args, items)))
    if origin in (dict, cabc.Mapping, cabc.MutableMapping) or tp is dict:
        ktp, vtp = (args if len(args) == 2 else (Any, Any))
        if not isinstance(value, Mapping):
            raise ctx.error(path, f"expected a mapping, got {_show(value)}")
        out = {}
        for k, v in value.items():
            kpath = _join(path, k if isinstance(k, str) else repr(k))
            key = _convert(ktp, k, kpath, ctx, strict) if ktp is not Any else copy.deepcopy(k)
            out[key] = _convert(vtp, v, kpath, ctx, strict)
        return out
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, float):
            return value
        if not strict and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not strict and isinstance(value, str) and _SCI_FLOAT.match(value.strip()):
            return float(value.strip().replace("_", ""))
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        for m in tp:
            if m.value == value and type(m.value) is type(value):
                return m
        if isinstance(value, str) and value in tp.__members__:
            return tp[value]
    elif isinstance(tp, type) and issubclass(tp, Path):
        if isinstance(value, tp):
            return value
        if not strict and isinstance(value, (str, os.PathLike)):
            return tp(value)
    elif isinstance(tp, type):
        if isinstance(value, tp):
            return copy.deepcopy(value)
    else:
        raise TypeError(f"{path}: unsupported field type {tp!r} in a config dataclass")
    raise ctx.error(path, f"expected {_describe(tp)}, got {_show(value)}")


def _convert_seq(kind, item_tp, value, path, ctx, strict):
    if not isinstance(value, (list, tuple)):
        raise ctx.error(path, f"expected a list, got {_show(value)}")
    return kind(_convert(item_tp, v, _join(path, i), ctx, strict) for i, v in enumerate(value))


def _convert_union(tp, value, path, ctx, strict):
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    arms = [a for a in args if a is not type(None)]
    errors: list[ConfigError] = []
    passes = (True,) if strict else (True, False)
    for strict_pass in passes:
        for a in arms:
            try:
                return _convert(a, value, path, ctx, strict_pass)
            except ConfigError as e:
                errors.append(e)
    # an error inside a nested section / container says more than "expected X or Y"
    deeper = [e for e in errors if e.key != path]
    if deeper:
        raise deeper[-1] if len(arms) == 1 else deeper[0]
    if len(arms) == 1 and errors and not errors[-1].problem.startswith("expected "):
        raise errors[-1]
    raise ctx.error(path, f"expected {_describe(tp)}, got {_show(value)}")


# ---------------------------------------------------------------------------------------- to_dict
def to_dict(obj: Any) -> dict:
    """A dataclass instance as a plain dict of YAML-able values (recursive).

    Nested dataclasses become dicts, tuples and sets lists, ``Path`` strings, enums their values.
    Only init fields are written (computed ``init=False`` fields cannot be loaded back).
    """
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        if isinstance(obj, Mapping):
            return {k: _plain(v) for k, v in obj.items()}
        raise TypeError(f"to_dict needs a dataclass instance, got {type(obj).__name__}")
    return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}


def _plain(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return to_dict(v)
    if isinstance(v, enum.Enum):
        return _plain(v.value)
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    if isinstance(v, Mapping):
        return {_plain(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (set, frozenset)):
        items = [_plain(x) for x in v]
        try:
            return sorted(items)
        except TypeError:
            return items
    return v


# ---------------------------------------------------------------------------------------- YAML files
def _walk_lines(node: yaml.Node, path: str, where: str, origins: dict[str, str]) -> None:
    """Record ``file:line`` of every key (and list item) below ``node``; reject duplicate keys."""
    if isinstance(node, yaml.MappingNode):
        seen: set = set()
        for knode, vnode in node.value:
            if not isinstance(knode, yaml.ScalarNode):
                continue
            key = knode.value
            if key == "<<":  # YAML merge key: its content is merged by the constructor
                continue
            line = knode.start_mark.line + 1
            kpath = _join(path, key)
            if key in seen:
                raise ConfigError(f"{where}:{line}", kpath, "duplicate key")
            seen.add(key)
            origins[kpath] = f"{where}:{line}"
            _walk_lines(vnode, kpath, where, origins)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            ipath = _join(path, i)
            origins[ipath] = f"{where}:{item.start_mark.line + 1}"
            _walk_lines(item, ipath, where, origins)


def _read_one(path: Path, where: str) -> tuple[dict, dict[str, str]]:
    """One YAML file (no inheritance) as ``(data, origins)``."""
    try:
        if path.is_dir():
            raise ConfigError(where, "", "is a directory, not a YAML config file")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(where, "", "file not found") from None
    except UnicodeDecodeError as e:
        raise ConfigError(where, "", f"not a YAML text file (byte {e.start} is not UTF-8)") from None
    except OSError as e:
        raise ConfigError(where, "", f"cannot read: {e}") from None
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        origins: dict[str, str] = {}
        if node is None:
            return {}, origins
        _walk_lines(node, "", where, origins)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f"{where}:{mark.line + 1}" if mark else where
        problem = " ".join(p for p in (e.context, e.problem) if p)
        raise ConfigError(at, "", f"invalid YAML: {problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(where, "", f"invalid YAML: {e}") from None
    finally:
        loader.dispose()
    if data is None:
        return {}, origins
    if not isinstance(data, dict):
        raise ConfigError(where, "", f"the document must be a mapping of keys to values, got {_show(data)}")
    return data, origins


def _deep_merge(base: dict, over: Mapping) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _merge_origins(base: dict[str, str], over: dict[str, str], over_data: Mapping, path: str = "") -> dict:
    """Origins after `_deep_merge`: the overlay's keys win; a replaced non-mapping drops the base's."""
    out = dict(base)

    def drop_below(p: str) -> None:
        for k in [k for k in out if k.startswith(p + ".") or k.startswith(p + "[")]:
            del out[k]

    def walk(data: Mapping, p: str) -> None:
        for k, v in data.items():
            kp = _join(p, k)
            if not isinstance(v, Mapping):
                drop_below(kp)
            else:
                walk(v, kp)

    walk(over_data, path)
    out.update(over)
    return out


def load_yaml(path: str | os.PathLike, *, _stack: tuple[Path, ...] = ()) -> tuple[dict, dict[str, str]]:
    """A YAML config file with its ``base`` files merged in: ``(data, origins)``.

    ``origins`` maps each dotted key path to ``"file:line"`` of the file that set it (for messages; pass
    it to `from_dict`). Most code wants `load_config` instead.
    """
    path = Path(path)
    where = str(path)
    resolved = path.resolve()
    if resolved in _stack:
        chain = " -> ".join(p.name for p in (*_stack, resolved))
        raise ConfigError(where, "base", f"inheritance cycle: {chain}")
    data, origins = _read_one(path, where)
    present = [k for k in BASE_KEYS if k in data]
    if not present:
        return data, origins
    if len(present) > 1:
        raise ConfigError(origins.get(present[1], where), present[1], f"give either {BASE_KEYS[0]!r} or {BASE_KEYS[1]!r}, not both")
    bkey = present[0]
    bases = data.pop(bkey)
    borigin = origins.pop(bkey, where)
    if isinstance(bases, (str, os.PathLike)):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(borigin, bkey, f"expected a file name or a list of file names, got {_show(bases)}")
    merged: dict = {}
    merged_origins: dict[str, str] = {}
    for b in bases:
        bpath = Path(os.path.expanduser(b))
        if not bpath.is_absolute():
            bpath = path.parent / bpath
        if bpath.resolve() in (*_stack, resolved):
            chain = " -> ".join(p.name for p in (*_stack, resolved, bpath.resolve()))
            raise ConfigError(borigin, bkey, f"inheritance cycle: {chain}")
        if not bpath.exists():
            raise ConfigError(borigin, bkey, f"base file not found: {bpath}")
        bdata, borigins = load_yaml(bpath, _stack=(*_stack, resolved))
        merged_origins = _merge_origins(merged_origins, borigins, bdata)
        merged = _deep_merge(merged, bdata)
    origins = _merge_origins(merged_origins, origins, data)
    return _deep_merge(merged, data), origins


# ---------------------------------------------------------------------------------------- overrides
def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=3e-4"`` -> ``(["optim", "lr"], 0.0003)``; the value is parsed as a YAML scalar/flow.

    Raises:
        ConfigError: no ``=``, an empty key part, or a value that is not valid YAML.
    """
    where = f"override {text!r}"
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(where, "", "expected key.sub=value")
    key, _, raw = text.partition("=")
    keys = key.strip().split(".")
    if not key.strip() or any(not k.strip() or k != k.strip() for k in keys):
        raise ConfigError(where, "", "expected key.sub=value with non-empty keys separated by dots")
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(where, key.strip(), f"invalid value {raw!r}: {problem}") from None
    return keys, value


def _check_override_path(cls: type, keys: list[str], where: str) -> None:
    """The keys of an override exist in dataclass ``cls`` (sections typed Any / dict are open)."""
    tp: Any = cls
    path = ""
    for k in keys:
        while _is_union(tp):
            arms = [a for a in typing.get_args(tp) if a is not type(None)]
            sections = [a for a in arms if _is_dataclass_type(a)]
            tp = sections[0] if sections else (arms[0] if len(arms) == 1 else Any)
        if typing.get_origin(tp) is typing.Annotated:
            tp = typing.get_args(tp)[0]
        kpath = _join(path, k)
        if _is_dataclass_type(tp):
            fields = _init_fields(tp)
            if k not in fields:
                raise ConfigError(where, kpath, f"unknown key ({_suggest(k, list(fields))})")
            tp = _hints(tp).get(k, Any)
        elif typing.get_origin(tp) in (dict, cabc.Mapping, cabc.MutableMapping) or tp is dict:
            args = typing.get_args(tp)
            tp = args[1] if len(args) == 2 else Any
        elif tp is Any or tp is object:
            return
        else:
            raise ConfigError(where, kpath, f"{path!r} is {_describe(tp)}, not a section with keys")
        path = kpath


def _set_path(data: dict, keys: list[str], value: Any, where: str) -> None:
    node = data
    for i, k in enumerate(keys[:-1]):
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        elif not isinstance(nxt, dict):
            p = ".".join(keys[: i + 1])
            raise ConfigError(where, ".".join(keys), f"{p!r} is {_show(nxt)}, not a mapping, so it has no key {keys[i + 1]!r}")
        node = nxt
    node[keys[-1]] = value


def apply_overrides(
    data: Mapping,
    overrides: Sequence[str] | str,
    *,
    source: str = "command line",
    cls: type | None = None,
    origins: dict[str, str] | None = None,
) -> dict:
    """A deep copy of ``data`` with ``key.sub=value`` overrides applied (see `parse_override`).

    Missing intermediate mappings are created. With ``cls`` (the config dataclass) every override key
    is checked against the dataclasses first, so an unknown key is reported with the override text
    and a suggestion; `load_config` passes it. ``origins`` (optional) is updated so later messages
    about an overridden key name the override.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    out = copy.deepcopy(dict(data))
    for text in overrides:
        where = f"{source}: override {text!r}" if source else f"override {text!r}"
        try:
            keys, value = parse_override(text)
        except ConfigError as e:
            raise ConfigError(where, e.key, e.problem) from None
        if cls is not None:
            _check_override_path(cls, keys, where)
        _set_path(out, keys, value, where)
        if origins is not None:
            kpath = ".".join(keys)
            for k in [k for k in origins if k.startswith(kpath + ".") or k.startswith(kpath + "[")]:
                del origins[k]
            origins[kpath] = where
    return out


# ---------------------------------------------------------------------------------------- load / save
def load_config(cls: type[T], path: str | os.PathLike, overrides: Sequence[str] = ()) -> T:
    """Load dataclass ``cls`` from a YAML file (with ``base`` inheritance) and ``key=value`` overrides.

    The returned object carries ``_origins`` (not a field: ``==``, `to_dict` and `save_config` ignore it), the
    map from key paths to ``file:line`` / override, so that a section typed ``dict[str, Any]`` and validated
    later (``task_options``, ``model``) can still be reported at its line:
    ``from_dict(Cls, cfg.model, source=..., path="model", origins=getattr(cfg, "_origins", None))``.

    Raises:
        ConfigError: any problem in the file(s) or the overrides, with file, line, key and problem.
    """
    data, origins = load_yaml(path)
    data = apply_overrides(data, overrides, cls=cls, origins=origins)
    obj = from_dict(cls, data, source=str(path), origins=origins)
    try:
        object.__setattr__(obj, "_origins", dict(origins))  # also on a frozen dataclass
    except AttributeError:  # a slots dataclass has no room for it: callers fall back to the file name
        pass
    return obj


def save_config(obj: Any, path: str | os.PathLike) -> Path:
    """Write the resolved configuration (a dataclass instance, or a mapping) as YAML; returns the path.

    The file loads back with ``load_config(type(obj), path) == obj``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.dump(to_dict(obj), Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
