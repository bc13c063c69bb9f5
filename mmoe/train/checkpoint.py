"""Checkpoints: atomic, safetensors weights, every rank's experts, reloadable under another EP size.

Layout of one checkpoint (``<run>/checkpoints/step_0000100/``)::

    model.safetensors              every non-expert parameter and buffer (rank 0)
    experts-ep0-of2.safetensors    expert parameters held by expert-parallel rank 0 (dim 0 = its experts)
    experts-ep1-of2.safetensors    ... one file per expert-parallel rank
    optim-rank0.pt, optim-rank1.pt optimizer state of each rank (ZeRO partitions are per rank)
    optim-dense.safetensors        the same state as whole tensors (AdamW moments and step per parameter name,
    optim-experts-ep0-of2.safetensors  experts by expert-parallel rank): what a resume under another world size,
                                   EP size or ZeRO stage reads (`load_portable_optimizer`)
    rank0.pt, rank1.pt             RNG states, data position of each rank
    meta.json                      written last: step, world/EP sizes, ZeRO stage, scheduler, task state,
                                   and the size and SHA-256 of every file above

Atomicity: every rank writes into ``step_0000100.tmp``; after a barrier rank 0 writes ``meta.json``,
fsyncs, renames the folder to ``step_0000100`` and then updates the ``latest`` pointer with an atomic
``os.replace``. A crash at any point leaves the previous checkpoint intact: a folder without a complete
``meta.json`` (or with a missing / short file) is never picked by `find_latest`.

Integrity: loading a checkpoint (`full_state_dict`, hence `load_model_state`) first checks every file's
SHA-256 against ``meta.json`` (`verify_checkpoint`); a mismatch is a `CheckpointError` naming the file.
`find_latest` follows the ``latest`` pointer (a pointer to a folder that does not exist is an error, not a
silent choice of another checkpoint); `checkpoint_candidates` lists the ones to try, newest first, for a
resume that falls back past a damaged checkpoint (`mmoe.train.engine.Trainer.resume` says so).

Expert parameters of expert-parallel rank ``p`` of ``P`` are rows ``[p*E/P, (p+1)*E/P)`` of the full
``[E, ...]`` tensor, so `load_model_state` concatenates the shards and re-slices them for any new
EP size (including 1: `full_state_dict` gives the unsharded model, e.g. for evaluation or export).
"""

from __future__ import annotations

import hashlib
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


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 4 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


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
                    keep_last: int | None = None, portable_optimizer: bool = True) -> Path:
    """Write checkpoint ``step`` under ``root`` collectively (every rank calls it).

    ``expert_writer``: this rank writes its experts' file (one rank per expert-parallel position).
    ``barrier``: callable synchronising the ranks (None for one process).
    ``portable_optimizer``: also write the optimizer state as whole tensors by parameter name
    (`mmoe.train.deepspeed.full_optimizer_state`, a collective under ZeRO), for a resume on another layout.
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
    mine: list[Path] = []  # the files this rank writes (it syncs those alone: another rank's may be mid-write)

    def save_tensors(tensors: dict, name: str, metadata: dict) -> None:
        save_file(tensors, str(tmp / name), metadata=metadata)
        mine.append(tmp / name)

    def save_object(obj: Any, name: str) -> None:
        torch.save(obj, tmp / name)
        mine.append(tmp / name)

    if rank == 0:
        dense = {k: v.detach().cpu().contiguous() for k, v in state.items() if k not in experts}
        save_tensors(dense, "model.safetensors", {"format": "mmoe"})
    shard_meta = {"ep_rank": str(ep_rank), "ep_size": str(ep_size)}
    if expert_writer and experts:
        ex = {k: state[k].detach().cpu().contiguous() for k in experts}
        save_tensors(ex, f"experts-ep{ep_rank}-of{ep_size}.safetensors", shard_meta)
    if optimizer is not None:
        save_object(optimizer.state_dict(), f"optim-rank{rank}.pt")
        if portable_optimizer:
            from .deepspeed import full_optimizer_state

            whole = full_optimizer_state(optimizer, list(model.named_parameters()))
            is_expert = {k: k.rsplit("/", 1)[0] in experts for k in whole}
            if rank == 0:
                save_tensors({k: v.contiguous() for k, v in whole.items() if not is_expert[k]},
                             "optim-dense.safetensors", {"format": "mmoe"})
            if expert_writer and experts:
                save_tensors({k: v.contiguous() for k, v in whole.items() if is_expert[k]},
                             f"optim-experts-ep{ep_rank}-of{ep_size}.safetensors", shard_meta)
    save_object({"rng": rng_state(), **(rank_state or {})}, f"rank{rank}.pt")
    for f in mine:
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if barrier:
        barrier()
    if rank == 0:
        files = {f.name: {"bytes": f.stat().st_size, "sha256": file_sha256(f)} for f in sorted(tmp.iterdir())}
        info = {"step": step, "world_size": world_size, "ep_size": ep_size, "files": files,
                "has_experts": bool(experts), **(meta or {})}
        _write_atomic(tmp / "meta.json", _sealed_meta(info))
        _fsync_dir(tmp)
        replaced = None
        if final.exists():  # a step saved again (after a resume from an older checkpoint): swap by two renames,
            replaced = final.with_name(f".replaced-{final.name}-{os.getpid()}")  # so a kill leaves no real gap
            shutil.rmtree(replaced, ignore_errors=True)
            os.rename(final, replaced)
        os.rename(tmp, final)
        _fsync_dir(root)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        _write_atomic(root / "latest", final.name.encode())
        if keep_last:  # the newest keep_last, this one always among them
            older = [c for c in list_checkpoints(root) if c != final]
            for old in older[:max(0, len(older) - (keep_last - 1))]:
                shutil.rmtree(old, ignore_errors=True)
    if barrier:
        barrier()
    return final


def _sealed_meta(info: dict) -> bytes:
    """``meta.json``'s bytes: ``info`` as JSON plus ``meta_sha256``, the SHA-256 of the JSON without it."""
    plain = json.loads(json.dumps(info, default=str))
    body = json.dumps(plain, indent=1)
    return json.dumps({**plain, "meta_sha256": hashlib.sha256(body.encode()).hexdigest()}, indent=1).encode()


def _check_seal(meta: dict, raw: bytes, meta_path: Path) -> None:
    """``meta.json`` must be exactly what `_sealed_meta` wrote (content hash and bytes): any change is caught."""
    if not any(isinstance(e, dict) for e in meta.get("files", {}).values()) and "meta_sha256" not in meta:
        return  # written before checksums (sizes only)
    plain = {k: v for k, v in meta.items() if k != "meta_sha256"}
    body = json.dumps(plain, indent=1)
    if hashlib.sha256(body.encode()).hexdigest() != meta.get("meta_sha256") or _sealed_meta(plain) != raw:
        raise CheckpointError(f"{meta_path}: damaged (its content does not match its meta_sha256)")


def _file_entry(entry: Any) -> tuple[int, str | None]:
    """``(bytes, sha256 or None)`` of a ``meta.json`` files entry (older checkpoints list the size only)."""
    if isinstance(entry, dict):
        return int(entry["bytes"]), entry.get("sha256")
    return int(entry), None


def read_meta(ckpt: str | Path, verify: bool = False) -> dict:
    """``meta.json`` of a checkpoint, checking that every file it lists is present and complete; with
    ``verify`` also that its content matches the SHA-256 in ``meta.json`` (`CheckpointError` naming the file)."""
    ckpt = Path(ckpt)
    meta_path = ckpt / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{ckpt}: not a complete checkpoint (no meta.json; interrupted while saving?)")
    try:
        raw = meta_path.read_bytes()
        meta = json.loads(raw.decode("utf-8"))
        entries = {name: _file_entry(e) for name, e in meta.get("files", {}).items()}
        int(meta["step"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{meta_path}: unreadable or damaged ({type(err).__name__}: {err})") from None
    _check_seal(meta, raw, meta_path)
    for name, (size, digest) in entries.items():
        f = ckpt / name
        if not f.is_file():
            raise CheckpointError(f"{ckpt}: file {name} listed in meta.json is missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"{f}: {f.stat().st_size} bytes, meta.json says {size} (truncated or damaged)")
        if verify and digest is not None and file_sha256(f) != digest:
            raise CheckpointError(f"{f}: damaged (its SHA-256 does not match meta.json)")
    return meta


def verify_checkpoint(ckpt: str | Path) -> dict:
    """`read_meta` with every file's SHA-256 checked; the meta on success."""
    return read_meta(ckpt, verify=True)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root`` (every listed file present with its size), oldest first."""
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


def _pointer(root: Path) -> Path | None:
    """The folder ``root/latest`` names; None without a pointer; `CheckpointError` when it names nothing."""
    f = root / "latest"
    if not f.is_file():
        return None
    name = f.read_text().strip()
    target = root / name
    if not STEP_RE.match(name) or not target.is_dir():
        raise CheckpointError(f"{f}: points at {name!r}, which is not a checkpoint folder there (delete the "
                              "pointer to use the newest complete checkpoint)")
    return target


def find_latest(root: str | Path) -> Path | None:
    """The checkpoint ``root/latest`` points at (it must exist), else the newest complete one (incomplete or
    damaged ones are passed over); None when there is none."""
    root = Path(root)
    target = _pointer(root)
    if target is not None:
        return target
    cps = list_checkpoints(root)
    return cps[-1] if cps else None


def checkpoint_candidates(root: str | Path) -> list[Path]:
    """Checkpoints to resume from, best first: the one ``latest`` points at, then every other checkpoint
    folder, newest step first (complete or not: the caller verifies each and says why it passes one over)."""
    root = Path(root)
    first = _pointer(root)
    rest = sorted((d for d in root.iterdir() if STEP_RE.match(d.name) and d.is_dir()),
                  key=lambda d: -int(STEP_RE.match(d.name).group(1))) if root.is_dir() else []
    return ([first] if first is not None else []) + [d for d in rest if d != first]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a checkpoint folder, a run's ``checkpoints`` folder or a run folder (then
    its latest checkpoint, `find_latest`); `CheckpointError` naming the path when there is none."""
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
    meta = verify_checkpoint(ckpt)
    try:
        state = load_file(str(ckpt / "model.safetensors"))
    except Exception as err:  # a file damaged before its checksum was taken (or an older checkpoint)
        raise CheckpointError(f"{ckpt / 'model.safetensors'}: unreadable ({err})") from None
    if meta.get("has_experts"):
        P = int(meta["ep_size"])
        shards = []
        for p in range(P):
            f = ckpt / f"experts-ep{p}-of{P}.safetensors"
            if not f.is_file():
                raise CheckpointError(f"{ckpt}: expert shard {f.name} is missing")
            try:
                shards.append(load_file(str(f)))
            except Exception as err:
                raise CheckpointError(f"{f}: unreadable ({err})") from None
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


def has_portable_optimizer(ckpt: str | Path) -> bool:
    """Whether the checkpoint carries the optimizer state by parameter name (written since portable resume)."""
    return (Path(ckpt) / "optim-dense.safetensors").is_file()


def portable_optimizer_state(ckpt: str | Path) -> dict[str, Tensor]:
    """The whole optimizer state of a checkpoint by ``<parameter>/<key>`` (experts concatenated to
    ``[E, ...]``; their ``/step`` is one value), from ``optim-dense`` and ``optim-experts-*`` files."""
    from safetensors.torch import load_file

    ckpt = Path(ckpt)
    meta = read_meta(ckpt)

    def load(f: Path) -> dict[str, Tensor]:
        try:
            return load_file(str(f))
        except Exception as err:
            raise CheckpointError(f"{f}: unreadable ({err})") from None

    state = load(ckpt / "optim-dense.safetensors")
    if meta.get("has_experts"):
        P = int(meta["ep_size"])
        files = [ckpt / f"optim-experts-ep{p}-of{P}.safetensors" for p in range(P)]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{ckpt}: expert optimizer shard {f.name} is missing")
        shards = [load(f) for f in files]
        for k in shards[0]:
            state[k] = shards[0][k] if k.endswith("/step") else torch.cat([s[k] for s in shards], 0)
    return state


def load_portable_optimizer(optimizer, model: nn.Module, ckpt: str | Path, *, ep_rank: int = 0,
                            ep_size: int = 1) -> list[str]:
    """Restore the optimizer of ``model`` (experts sharded ``ep_rank`` of ``ep_size``, any ZeRO stage) from the
    checkpoint's whole-tensor state, whatever world size, EP size and ZeRO stage wrote it; also sets ZeRO's
    fp32 master weights from the model's (load the weights first). Returns the parameters without saved state."""
    from .deepspeed import set_full_optimizer_state

    state = portable_optimizer_state(ckpt)
    experts = _expert_param_names(model)
    for k in list(state):
        name = k.rsplit("/", 1)[0]
        if name in experts and not k.endswith("/step"):
            full = state[k]
            if full.shape[0] % ep_size:
                raise CheckpointError(f"{ckpt}: {name} has {full.shape[0]} experts, not divisible by ep_size={ep_size}")
            El = full.shape[0] // ep_size
            state[k] = full[ep_rank * El:(ep_rank + 1) * El]
    return set_full_optimizer_state(optimizer, list(model.named_parameters()), state)


def load_optimizer_state(optimizer, ckpt: str | Path, rank: int) -> None:
    f = Path(ckpt) / f"optim-rank{rank}.pt"
    if not f.is_file():
        raise CheckpointError(f"{ckpt}: no optimizer state for rank {rank}")
    optimizer.load_state_dict(torch.load(f, weights_only=False))
