"""Checkpoints: atomic, safetensors weights, every rank's experts, reloadable under another EP size.

Layout of one checkpoint (``<run>/checkpoints/step_0000100/``)::

    model.safetensors              every non-expert parameter and buffer (rank 0)
    experts-ep0-of2.safetensors    expert parameters held by expert-parallel rank 0 (dim 0 = its experts)
    experts-ep1-of2.safetensors    ... one file per expert-parallel rank
    optim-rank0.pt, optim-rank1.pt optimizer state of each rank (ZeRO partitions are per rank)
    rank0.pt, rank1.pt             RNG states, data position of each rank
    meta.json                      written last: step, world/EP sizes, ZeRO stage, scheduler, task state,
                                   and the size of every file above

Atomicity: every rank writes into ``step_0000100.tmp``; after a barrier rank 0 writes ``meta.json``,
fsyncs, renames the folder to ``step_0000100`` and then updates the ``latest`` pointer with an atomic
``os.replace``. A crash at any point leaves the previous checkpoint intact: a folder without a complete
``meta.json`` (or with a missing / short file) is never picked by `find_latest`.

Expert parameters of expert-parallel rank ``p`` of ``P`` are rows ``[p*E/P, (p+1)*E/P)`` of the full
``[E, ...]`` tensor, so `load_model_state` concatenates the shards and re-slices them for any new
EP size (including 1: `full_state_dict` gives the unsharded model, e.g. for evaluation or export).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import CheckpointError

STEP_RE = re.compile(r"^step_(\d+)$")
EXPERT_FILE_RE = re.compile(r"^experts-ep(\d+)-of(\d+)\.safetensors$")


def _expert_param_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if getattr(p, "expert", False)}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: str | Path, step: int, *, model: nn.Module, optimizer=None, rank: int = 0,
                    world_size: int = 1, ep_rank: int = 0, ep_size: int = 1, expert_writer: bool = True,
                    rank_state: dict | None = None, meta: dict | None = None, barrier=None,
                    keep_last: int | None = None) -> Path:
    """Write checkpoint ``step`` under ``root`` collectively (every rank calls it).

    ``expert_writer``: this rank writes its experts' file (one rank per expert-parallel position).
    ``barrier``: callable synchronising the ranks (None for one process).
    """
    from safetensors.torch import save_file

    root = Path(root)
    final = root / f"step_{step:07d}"
    tmp = root / f"step_{step:07d}.tmp"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    if barrier:
        barrier()
    experts = _expert_param_names(model)
    state = model.state_dict()
    if rank == 0:
        dense = {k: v.detach().cpu().contiguous() for k, v in state.items() if k not in experts}
        save_file(dense, str(tmp / "model.safetensors"), metadata={"format": "mmoe"})
    if expert_writer and experts:
        ex = {k: state[k].detach().cpu().contiguous() for k in experts}
        save_file(ex, str(tmp / f"experts-ep{ep_rank}-of{ep_size}.safetensors"),
                  metadata={"ep_rank": str(ep_rank), "ep_size": str(ep_size)})
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / f"optim-rank{rank}.pt")
    torch.save({"rng": rng_state(), **(rank_state or {})}, tmp / f"rank{rank}.pt")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if barrier:
        barrier()
    if rank == 0:
        files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}
        info = {"step": step, "world_size": world_size, "ep_size": ep_size, "files": files,
                "has_experts": bool(experts), **(meta or {})}
        _write_atomic(tmp / "meta.json", json.dumps(info, indent=1, default=str).encode())
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        _write_atomic(root / "latest", final.name.encode())
        if keep_last:
            for old in list_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    if barrier:
        barrier()
    return final


def read_meta(ckpt: str | Path) -> dict:
    """``meta.json`` of a checkpoint, checking that every file it lists is present and complete."""
    ckpt = Path(ckpt)
    meta_path = ckpt / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{ckpt}: not a complete checkpoint (no meta.json; interrupted while saving?)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{meta_path}: unreadable ({err})") from err
    for name, size in meta.get("files", {}).items():
        f = ckpt / name
        if not f.is_file():
            raise CheckpointError(f"{ckpt}: file {name} listed in meta.json is missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"{ckpt}: file {name} has {f.stat().st_size} bytes, meta.json says {size}")
    return meta


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = STEP_RE.match(d.name)
        if m and d.is_dir():
            try:
                read_meta(d)
            except CheckpointError:
                continue
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def find_latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (incomplete or damaged ones are passed over)."""
    cps = list_checkpoints(root)
    return cps[-1] if cps else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a checkpoint folder, a run's ``checkpoints`` folder or a run folder (then
    its latest complete checkpoint); `CheckpointError` naming the path when there is none."""
    p = Path(path)
    if (p / "meta.json").is_file():
        return p
    for root in (p, p / "checkpoints"):
        if root.is_dir():
            latest = find_latest(root)
            if latest is not None:
                return latest
    raise CheckpointError(f"{p}: no complete checkpoint there (expected a step_NNNNNNN folder with meta.json, "
                          "a run's checkpoints folder or a run folder)")


def full_state_dict(ckpt: str | Path) -> dict[str, Tensor]:
    """The whole model's state dict (expert shards concatenated to ``[E, ...]``)."""
    from safetensors.torch import load_file

    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    state = load_file(str(ckpt / "model.safetensors"))
    if meta.get("has_experts"):
        P = int(meta["ep_size"])
        shards = []
        for p in range(P):
            f = ckpt / f"experts-ep{p}-of{P}.safetensors"
            if not f.is_file():
                raise CheckpointError(f"{ckpt}: expert shard {f.name} is missing")
            shards.append(load_file(str(f)))
        for k in shards[0]:
            state[k] = torch.cat([s[k] for s in shards], 0)
    return state


def load_model_state(model: nn.Module, ckpt: str | Path, *, ep_rank: int = 0, ep_size: int = 1,
                     strict: bool = True) -> None:
    """Load a checkpoint into ``model`` whose experts are sharded ``ep_rank`` of ``ep_size`` (any sizes)."""
    state = full_state_dict(ckpt)
    experts = _expert_param_names(model)
    for k in experts:
        if k not in state:
            continue
        full = state[k]
        E = full.shape[0]
        if E % ep_size:
            raise CheckpointError(f"{ckpt}: {k} has {E} experts, not divisible by ep_size={ep_size}")
        El = E // ep_size
        state[k] = full[ep_rank * El:(ep_rank + 1) * El]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise CheckpointError(f"{ckpt}: does not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}")


def load_rank_state(ckpt: str | Path, rank: int) -> dict[str, Any]:
    f = Path(ckpt) / f"rank{rank}.pt"
    if not f.is_file():
        raise CheckpointError(f"{ckpt}: no state for rank {rank} ({f.name}); saved with another world size?")
    return torch.load(f, weights_only=False)


def load_optimizer_state(optimizer, ckpt: str | Path, rank: int) -> None:
    f = Path(ckpt) / f"optim-rank{rank}.pt"
    if not f.is_file():
        raise CheckpointError(f"{ckpt}: no optimizer state for rank {rank}")
    optimizer.load_state_dict(torch.load(f, weights_only=False))
