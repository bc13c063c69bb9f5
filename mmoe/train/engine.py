"""The training engine: one trainer for every task, on DeepSpeed.

`Trainer(cfg)` sets up ``torch.distributed`` (gloo on CPU, NCCL on GPUs), the expert-parallel groups,
the task's model with its experts sharded (`mmoe.train.sharding.shard_experts`), MoE-aware parameter
groups (weight decay off for norms, biases and routers unless configured; expert parameters in
DeepSpeed "moe" groups so they are reduced over the expert-data-parallel group only), a DeepSpeed
engine (ZeRO 0/1/2, gradient clipping and accumulation, bf16 where the device has it), the shard
loaders with exact resume, checkpoints, and logging. ``Trainer.fit()`` trains; ``Trainer.evaluate()``
evaluates (the task's `mmoe.train.tasks.Evaluator`, gathered over the ranks).

Everything DeepSpeed-specific (start-up, expert groups, the generated DeepSpeed config, teaching its engine
that `mmoe.MoE` is an MoE layer) is in `mmoe.train.deepspeed`, the only module that imports DeepSpeed.

Non-finite losses: the decision is global (all ranks agree, so expert-parallel collectives stay in
step). A micro-batch whose loss is NaN/inf is dropped before backward — DeepSpeed never sees it, so the
optimizer step waits for a good micro-batch and nothing it did leaks into the weights; buffers its
forward updated (the Default-MoE EMA, balance-bias loads) are restored; it is logged as an event, and ``train.max_bad_steps`` consecutive bad micro-batches stop the run with a clear message.

Run folders: a fresh run (no ``resume``) refuses a ``run.dir`` that holds another run's checkpoints or logs
(``overwrite=True``, the CLI's ``--overwrite``, moves that run aside to ``<dir>.old-<time>``). A resume
takes the checkpoint ``latest`` points at; a damaged one (SHA-256 mismatch, missing or short file) is passed
over for the previous good one, on the console and as a ``checkpoint_fallback`` event in ``events.jsonl``.

Portable resume: under another world size, EP size or ZeRO stage the optimizer state is resharded from the
checkpoint's whole tensors (`mmoe.train.checkpoint.load_portable_optimizer`) and the data position is kept
whenever the global batch is unchanged (`mmoe.train.layout`); what starts fresh is said once (a
``resume_topology`` event).
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


from ..data.mixing import MultiBatch, SourcedBatch
from ..errors import TrainingError
from ..layer import aux_loss, clear_aux, moe_layers, set_grad_buffers, update_balance_bias
from . import checkpoint as ckpt_lib
from . import deepspeed as ds
from .layout import DataLayout, LayoutLoader, plan as layout_plan, stream_states
from .optim import lr_lambda, param_groups
from .sharding import shard_experts
from .config import TrainConfig
from .tasks import Task, TaskContext, get_task


# ---------------------------------------------------------------------------------------- setup
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class SyntheticLoader:
    """Deterministic batches from ``task.synthetic_example(global_index)`` for tests and benchmarks.

    Rank ``r`` of ``W`` at step ``s`` gets global samples ``[(s*W + r)*B, (s*W + r + 1)*B)``, so a run on
    W ranks with batch B sees exactly the samples of one rank with batch W*B.
    """

    def __init__(self, task: Task, batch_size: int, rank: int, world: int, collate=None) -> None:
        self.task, self.B, self.rank, self.world, self.step = task, batch_size, rank, world, 0
        self.collate = collate or task.collate
        self.errors: dict[str, int] = {}

    def __iter__(self):
        while True:
            start = (self.step * self.world + self.rank) * self.B
            self.step += 1
            yield self.collate([self.task.synthetic_example(start + i) for i in range(self.B)])

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def _manifest_split(urls, split: str | None) -> str | None:
    """``split`` where ``urls`` is a shard directory or manifest (the only inputs with splits), else None."""
    where = Path(str(urls))
    return split if where.is_dir() or where.suffix == ".json" else None


def _shard_loader(cfg: TrainConfig, task: Task, rank: int, world: int, urls: str, *, split: str | None,
                  train: bool, seed: int, decode, batch_size: int | None = None, what: str = "data", collate=None):
    """A `ShardLoader` over ``urls`` (``split`` applies to a shard directory or manifest): endless and shuffled
    for training, one ordered pass for evaluation. ``batch_size``: a source's own (default: ``data``'s). A layout
    the loader refuses (e.g. fewer shards than ranks) is a `TrainingError` naming ``what`` (the config key).
    ``collate``: instead of the task's (``list`` for the virtual streams of `mmoe.train.layout`)."""
    from ..data import ShardLoader

    d = cfg.data
    if batch_size is None:
        batch_size = d.batch_size if train else (d.eval_batch_size or d.batch_size)
    try:
        return ShardLoader(urls, split=_manifest_split(urls, split), batch_size=batch_size,
                           decode=decode, collate=collate or task.collate,
                           shuffle_buffer=d.shuffle_buffer if train else 0, seed=seed,
                           rank=rank, world_size=world, num_workers=d.num_workers,
                           resampled=d.resampled if train else False, epochs=None if train else 1,
                           drop_last=train, on_error=d.on_error)
    except ValueError as err:  # e.g. too few shards for the ranks: the user's layout, said in one line
        raise TrainingError(f"{what} ({urls}): {err}") from None


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` (tensors, possibly nested in lists, tuples and dicts) on ``device``; other values as they are."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


class LabelledDecode:
    """``decode`` that first sets ``sample["__task__"]`` to its source's label (picklable for workers)."""

    def __init__(self, decode, label: str | None) -> None:
        self.decode, self.label = decode, label

    def __call__(self, sample: dict) -> Any:
        sample["__task__"] = self.label
        return self.decode(sample)


def _mixed_loader(cfg: TrainConfig, task: Task, rank: int, world: int, *, batch_size: int | None = None,
                  collate=None):
    """``data.sources``: one endless loader per source (source ``i`` seeded ``run.seed + i``), mixed by weight
    with `mmoe.data.MixedLoader` (the choice seeded by ``run.seed``, the same on every rank), or, with
    ``data.mix: all``, zipped by `mmoe.data.AllLoader` (every micro-batch one batch of each)."""
    from ..data import AllLoader, MixedLoader

    sources = cfg.data.sources
    labelled = cfg.data.labelled_sources
    loaders = []
    for i, src in enumerate(sources):
        bs = src.batch_size or batch_size or cfg.data.batch_size
        if src.path == "synthetic":
            if not hasattr(task, "synthetic_example"):
                raise TrainingError(f"data.sources[{i}].path: task {cfg.task!r} has no synthetic data")
            loaders.append(SyntheticLoader(task, bs, rank, world, collate=collate))
            continue
        decode = LabelledDecode(task.decode, src.task) if labelled else task.decode
        loaders.append(_shard_loader(cfg, task, rank, world, src.path, split=src.split, train=True,
                                     seed=cfg.run.seed + i, decode=decode, batch_size=bs,
                                     what=f"data.sources[{i}]", collate=collate))
    if cfg.data.mix == "all":
        return AllLoader(loaders, [s.task for s in sources])
    return MixedLoader(loaders, [s.weight for s in sources], seed=cfg.run.seed, tasks=[s.task for s in sources])


# ---------------------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, cfg: TrainConfig, *, config_source: str = "<config>", resume: bool | str = False,
                 train: bool = True, overwrite: bool = False) -> None:
        from .configfile import from_dict, save_config

        self.cfg = cfg
        ds.init_distributed(cfg.dist.backend)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
        self.threads = None  # CPU: intra-op threads follow the CPUs other processes leave free (perf.py)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        else:
            from .perf import ThreadGovernor, tune_cpu_allocator

            tune_cpu_allocator()
            self.threads = ThreadGovernor()
        ep = cfg.dist.ep_size
        if self.world % ep:
            raise TrainingError(f"dist.ep_size={ep} does not divide the world size {self.world}")
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_dir = self.run_dir / "checkpoints"

        try:
            task_cls = get_task(cfg.task)
        except KeyError as err:
            raise TrainingError(f"{config_source}: task: {err.args[0]}") from None
        model_cfg = from_dict(task_cls.ModelConfig, cfg.model, source=config_source, path="model",
                              origins=getattr(cfg, "_origins", None))
        # task_options is a plain mapping in the YAML: validated here, with the file:line of its keys
        options = task_cls.parse_options(cfg.task_options, source=config_source,
                                         origins=getattr(cfg, "_origins", None))
        self.task: Task = task_cls(model_cfg, options)
        try:
            self.task.setup(TaskContext.from_config(cfg, rank=self.rank, world_size=self.world))
        except ValueError as err:
            raise TrainingError(f"{config_source}: {err}") from None

        # the same seed on every rank: identical full model, then each rank keeps its experts
        seed_everything(cfg.run.seed)
        model = self.task.build_model()
        self.ep_group, expert_dp_group = ds.expert_groups(ep)
        self.ep_rank = dist.get_rank(self.ep_group)
        self.expert_dp_rank = dist.get_rank(expert_dp_group)
        shard_experts(model, self.ep_group)
        for _, m in moe_layers(model):
            m.dp_group = dist.group.WORLD if self.world > 1 else None
            m.set_check_finite(False)  # non-finite losses are caught globally in `fit`
        model.to(self.device)
        buffers = cfg.train.grad_buffers
        set_grad_buffers(model, False if buffers is None and cfg.dist.zero_stage >= 2 else buffers)
        self.model = model
        self.task.model_ready(model)

        self.bf16 = cfg.train.precision == "bf16" or (
            cfg.train.precision == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported())
        if self.bf16 and self.device.type == "cpu":
            raise TrainingError("train.precision=bf16 needs a GPU here; use fp32 (or auto) on CPU")
        groups_ = param_groups(model, cfg.optim, self.task.lr_scales(model))
        opt = torch.optim.AdamW(groups_, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
        for g in opt.param_groups:
            g["lr"] = cfg.optim.lr * g.get("lr_scale", 1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.optim, cfg.train.max_steps))
        ds_config = ds.deepspeed_config(micro_batch=cfg.data.batch_size, grad_accum=cfg.train.grad_accum,
                                        grad_clip=cfg.train.grad_clip, zero_stage=cfg.dist.zero_stage, bf16=self.bf16)
        self.engine, self.optimizer, self.scheduler = ds.initialize(model, opt, sched, ds_config)

        # per-rank randomness for dropout / jitter / sampling from here on
        seed_everything(cfg.run.seed + 1_000_003 * self.rank)
        self.step = 0
        self.source: int | None = None  # index in data.sources of the latest training micro-batch
        self.train_loader = self._make_loader(train=True) if train else None
        # the data order this run's loaders follow (kept from the first run through resumes on other layouts)
        self.data_layout = DataLayout(self.world, cfg.data.batch_size, cfg.train.grad_accum)
        if train:
            self._check_val_data()
        self.logger = None
        self._pending_events: list[tuple[int, str, str]] = []  # (step, kind, message) before the logger exists
        if train:
            if not resume:
                self._claim_run_dir(overwrite)
            if self.rank == 0:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                save_config(cfg, self.run_dir / "config.yaml")
            if resume:
                where = resume if isinstance(resume, str) else None
                self.resume(where)

    def _claim_run_dir(self, overwrite: bool) -> None:
        """A fresh run needs a run folder without another run's logs or checkpoints: refused with a one-line
        error, or (``overwrite``) the old run is moved aside to ``<dir>.old-<time>`` (rank 0; all ranks wait)."""
        d = self.run_dir
        held = [n for n in ("metrics.jsonl", "events.jsonl") if (d / n).is_file() and (d / n).stat().st_size]
        if self.ckpt_dir.is_dir() and any(self.ckpt_dir.iterdir()):
            held.insert(0, "checkpoints")
        if held:
            if not overwrite:
                raise TrainingError(f"{d}: holds another run ({', '.join(held)}); continue it with --resume, "
                                    "give a new run.dir=..., or pass --overwrite to move it aside")
            if self.rank == 0:
                aside = d.with_name(f"{d.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
                n = 1
                while aside.exists():
                    aside = d.with_name(f"{d.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
                    n += 1
                d.rename(aside)
                print(f"mmoe: moved the earlier run in {d} to {aside}", file=sys.stderr)
                self._pending_events.append((0, "overwrite", f"the earlier run in {d} was moved to {aside}"))
        self._barrier()

    def _note(self, kind: str, message: str, step: int = 0) -> None:
        """A warning that matters: printed now (rank 0), and written to events.jsonl once the run logs."""
        if self.rank == 0:
            print(f"mmoe: warning: {message}", file=sys.stderr)
        self._pending_events.append((step, kind, message))

    # ------------------------------------------------------------------ data
    def _make_loader(self, train: bool, split: str | None = None, *, stream: tuple[int, int] | None = None,
                     batch_size: int | None = None, collate=None):
        """The training loader (``train``) or an evaluation loader of ``split`` (default ``data.val``).
        ``stream``: ``(rank, world)`` of a virtual training stream of a saved layout (`mmoe.train.layout`),
        with that layout's ``batch_size`` and ``collate=list``; default this rank's own."""
        d = self.cfg.data
        rank, world = stream or (self.rank, self.world)
        if train and d.sources:
            return _mixed_loader(self.cfg, self.task, rank, world, batch_size=batch_size, collate=collate)
        urls = d.train if train else (split or d.val)
        if urls == "synthetic":
            if not hasattr(self.task, "synthetic_example"):
                raise TrainingError(f"data: task {self.cfg.task!r} has no synthetic data")
            return SyntheticLoader(self.task, batch_size or d.batch_size, rank, world, collate=collate)
        if not urls:
            raise TrainingError("data.train: no training shards given" if train else "data.val: no validation shards given")
        return _shard_loader(self.cfg, self.task, rank, world, urls,
                             split=d.train_split if train else d.val_split, train=train, seed=self.cfg.run.seed,
                             decode=self.task.decode if train else self.task.decode_eval, batch_size=batch_size,
                             what="data.train" if train else ("--split" if split else "data.val"), collate=collate)

    def _check_val_data(self) -> None:
        """Resolve the validation shards before training starts, so that a wrong ``data.val`` or
        ``data.val_split`` is said now rather than after the first ``eval_every`` steps."""
        from ..data import resolve_urls

        d = self.cfg.data
        checks = [(f"data.val_sources[{i}]", s.path, s.split) for i, s in enumerate(d.val_sources)]
        if not checks and d.val and d.val != "synthetic":
            checks = [("data.val", d.val, d.val_split)]
        for what, urls, split in checks:
            try:
                resolve_urls(urls, _manifest_split(urls, split))
            except ValueError as err:
                raise TrainingError(f"{what} ({urls}): {err}") from None

    def _next_batch(self, it) -> Any:
        """The next training micro-batch on this device. From ``data.sources``: records the source in
        ``self.source`` (its index) and hands the task a `SourcedBatch` when the sources carry task labels
        (`mmoe.train.config.DataSource`), else the plain batch."""
        item = next(it)
        if isinstance(item, MultiBatch):
            return MultiBatch({t: self._to_device(b) for t, b in item.batches.items()})
        if not isinstance(item, SourcedBatch):
            return self._to_device(item)
        self.source = item.source
        data = self._to_device(item.data)
        if self.cfg.data.labelled_sources:
            return SourcedBatch(data, item.source, item.task)
        return data

    def _to_device(self, batch: Any) -> Any:
        return to_device(batch, self.device)

    # ------------------------------------------------------------------ checkpoints
    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def save(self) -> Path:
        meta = {"zero_stage": self.cfg.dist.zero_stage, "scheduler": self.scheduler.state_dict(),
                "task_state": self.task.state_dict(), "task": self.cfg.task,
                "ds_global_steps": self.engine.global_steps, "ds_global_samples": self.engine.global_samples,
                "data_layout": self.data_layout.to_dict()}
        rank_state = {"loader": self.train_loader.state_dict() if self.train_loader is not None else None,
                      "task": self.task.rank_state_dict()}
        path = ckpt_lib.save_checkpoint(
            self.ckpt_dir, self.step, model=self.engine.module, optimizer=self.optimizer, rank=self.rank,
            world_size=self.world, ep_rank=self.ep_rank, ep_size=self.cfg.dist.ep_size,
            expert_writer=self.expert_dp_rank == 0, rank_state=rank_state, meta=meta, barrier=self._barrier,
            keep_last=self.cfg.train.keep_last)
        if self.logger:
            self.logger.event(self.step, "checkpoint", f"saved {path}")
        return path

    def load_weights(self, path: str | Path) -> dict:
        ckpt_lib.load_model_state(self.engine.module, path, ep_rank=self.ep_rank, ep_size=self.cfg.dist.ep_size)
        return ckpt_lib.read_meta(path)

    def load_for_eval(self, path: str | Path) -> dict:
        """Weights, task state and (under the same world and EP size) this rank's task tensors such as the
        weight EMA, for evaluation or inference."""
        meta = self.load_weights(path)
        self.task.load_state_dict(meta.get("task_state", {}))
        if meta.get("world_size") == self.world and meta.get("ep_size") == self.cfg.dist.ep_size:
            rs = ckpt_lib.load_rank_state(path, self.rank)
            self.task.load_rank_state_dict(rs.get("task") or {})
        return meta

    def resume(self, path: str | Path | None = None) -> bool:
        """Restore ``path``, or the latest checkpoint (the ``latest`` pointer's); a damaged or incomplete one is
        passed over for the previous good one, said on the console and in ``events.jsonl``. False when there is
        none. An explicit ``path`` that is damaged is an error naming the file."""
        if path:
            path = Path(path)
            ckpt_lib.verify_checkpoint(path)
        else:
            path = None
            for cand in ckpt_lib.checkpoint_candidates(self.ckpt_dir):
                try:
                    ckpt_lib.verify_checkpoint(cand)
                except ckpt_lib.CheckpointError as err:
                    self._note("checkpoint_fallback", f"{err}; passed over for an older checkpoint")
                    continue
                path = cand
                break
            if path is None:
                return False
        meta = self.load_weights(path)
        saved = (f"world_size={meta.get('world_size')}, ep_size={meta.get('ep_size')}, "
                 f"zero_stage={meta.get('zero_stage')}")
        now = f"{self.world}/{self.cfg.dist.ep_size}/{self.cfg.dist.zero_stage}"
        same_world = meta.get("world_size") == self.world
        same_topology = (same_world and meta.get("ep_size") == self.cfg.dist.ep_size
                         and meta.get("zero_stage") == self.cfg.dist.zero_stage)
        kept: list[str] = ["weights", "schedule and step"]  # what is restored and what starts fresh, said once
        fresh: list[str] = []
        if same_topology:
            ckpt_lib.load_optimizer_state(self.optimizer, path, self.rank)
        else:
            self._load_portable_optimizer(path, kept, fresh)
        rs = ckpt_lib.load_rank_state(path, self.rank) if same_world else None
        if rs is not None:
            ckpt_lib.set_rng_state(rs["rng"])
        else:
            fresh.append("the RNG streams (dropout and other per-rank randomness)")
        if self.train_loader is not None:
            self._resume_data(path, meta, rs, kept, fresh)
        if same_world and meta.get("ep_size") == self.cfg.dist.ep_size:
            self.task.load_rank_state_dict(rs.get("task") or {})
        elif any(self.task.rank_state_dict()):  # the task keeps per-rank state (no need to read it back)
            fresh.append("the task's per-rank state (e.g. the weight EMA)")
        if not same_topology:
            msg = f"{path}: saved with {saved}; running with {now}: restored {', '.join(kept)}"
            msg += ("; starting fresh: " + "; ".join(fresh)) if fresh else ""
            self._note("resume_topology", msg, int(meta["step"]))
        elif fresh:
            self._note("resume_data", f"{path}: starting fresh: {', '.join(fresh)}", int(meta["step"]))
        self.scheduler.load_state_dict(meta["scheduler"])
        if not same_topology:  # the native optimizer state restores the groups' lr; the portable one does not
            for g, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr()):
                g["lr"] = lr
        self.task.load_state_dict(meta.get("task_state", {}))
        self.step = int(meta["step"])
        self.engine.global_steps = int(meta.get("ds_global_steps", self.step))
        self.engine.global_samples = int(meta.get("ds_global_samples", 0))
        self._resumed_from = path
        return True

    def _load_portable_optimizer(self, path: Path, kept: list[str], fresh: list[str]) -> None:
        """The optimizer state from the checkpoint's whole tensors, resharded for this EP size and ZeRO stage
        (`mmoe.train.checkpoint.load_portable_optimizer`); older checkpoints without them start it fresh."""
        model = self.engine.module
        if ckpt_lib.has_portable_optimizer(path):
            missing = ckpt_lib.load_portable_optimizer(self.optimizer, model, path, ep_rank=self.ep_rank,
                                                       ep_size=self.cfg.dist.ep_size)
            trained = [n for n, p in model.named_parameters() if p.requires_grad]
            if missing and len(missing) == len(trained):
                fresh.append("the optimizer state (none saved)")
                return
            kept.append("the optimizer state (resharded)")
            if missing:
                fresh.append(f"the optimizer state of {len(missing)} parameter(s) new since the save")
        else:
            ds.set_full_optimizer_state(self.optimizer, list(model.named_parameters()), {})  # ZeRO's fp32 copy
            fresh.append("the optimizer state (the checkpoint predates portable optimizer state)")

    def _resume_data(self, path: Path, meta: dict, rs: dict | None, kept: list[str], fresh: list[str]) -> None:
        """The training data position: kept whenever the global batch is unchanged (`mmoe.train.layout`),
        through virtual streams of the saved layout when the world size changed; else started fresh."""
        saved = DataLayout.from_dict(meta.get("data_layout"))
        if saved is None and meta.get("world_size") == self.world:  # older checkpoints: the run's own layout
            saved = self.data_layout
        how = layout_plan(saved, self.data_layout, self.rank) if saved is not None else "the checkpoint has no data layout"
        if isinstance(how, str):
            fresh.append(f"the data position ({how})")
            return
        if rs is not None and how.natural and not (isinstance(rs.get("loader"), dict)
                                                   and rs["loader"].get("kind") == "layout"):
            states = {self.rank: rs.get("loader")}
        else:
            states = stream_states([ckpt_lib.load_rank_state(path, r) for r in range(int(meta["world_size"]))])
        if any(states.get(v) is None for v in how.streams):
            fresh.append("the data position (not saved)")
            return
        try:
            if how.natural:
                self.train_loader.load_state_dict(states[self.rank])
            else:
                loaders = {v: self._make_loader(train=True, stream=(v, saved.world), batch_size=saved.batch_size,
                                                collate=list) for v in how.streams}
                self.train_loader = LayoutLoader(loaders, self.task.collate, how)
                self.train_loader.load_state_dict({"streams": {str(v): states[v] for v in how.streams}})
        except ValueError as err:  # e.g. data.sources added, removed or reweighted since the save
            raise ckpt_lib.CheckpointError(f"{path}: cannot resume the training data position: {err}") from None
        self.data_layout = saved
        kept.append("the data position" + ("" if how.natural else f" (in the order of the {saved.world}-rank layout: "
                                                                   "mmoe.train.layout)"))

    # ------------------------------------------------------------------ training
    def _all_finite(self, value: torch.Tensor) -> bool:
        flag = torch.tensor([1.0 if bool(torch.isfinite(value.detach()).all()) else 0.0])
        if self.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() > 0)

    @torch.no_grad()
    def _clip_grads(self, max_norm: float) -> float:
        """Clip by the global gradient norm (ZeRO 0): replicated parameters once, every expert once.

        Called after DeepSpeed's gradient all-reduce, so replicated gradients are identical on every rank;
        expert gradients differ per expert-parallel rank and their squares are summed over the group.
        """
        dense = torch.zeros((), dtype=torch.float64, device=self.device)
        expert = torch.zeros((), dtype=torch.float64, device=self.device)
        params = [p for p in self.engine.module.parameters() if p.grad is not None]
        for p in params:
            sq = p.grad.detach().double().pow(2).sum()
            if getattr(p, "allreduce", True) is False:
                expert += sq
            else:
                dense += sq
        if self.cfg.dist.ep_size > 1:
            dist.all_reduce(expert, group=self.ep_group)
        norm = float((dense + expert).sqrt())
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            for p in params:
                p.grad.mul_(coef)
        return norm

    def _sum_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        if self.world == 1 or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        return dict(zip(keys, t.tolist()))

    def _mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        return {k: v / self.world for k, v in self._sum_over_ranks(values).items()}

    def fit(self) -> dict[str, float]:
        from .runlog import RunLogger

        cfg = self.cfg
        tl = cfg.train
        self.logger = RunLogger(self.run_dir, total_steps=tl.max_steps, start_step=self.step,
                                enabled=self.rank == 0, tensorboard=cfg.run.tensorboard,
                                progress=tl.progress, unit=self.task.unit, desc=f"train {cfg.task}")
        self.task.logger = self.logger  # for tasks that log their own events and metrics (e.g. after_step)
        for step, kind, message in self._pending_events:  # already printed
            self.logger.event(step, kind, message, echo=False)
        self._pending_events.clear()
        engine = self.engine
        it = iter(self.train_loader)
        bad_in_a_row = 0
        last_eval: dict[str, float] = {}
        try:
            while self.step < tl.max_steps:
                t0 = time.perf_counter()
                lr = self.optimizer.param_groups[0]["lr"]  # the lr this step uses
                engine.train()
                sums: dict[str, float] = {}
                units = 0
                good = 0
                while good < tl.grad_accum:
                    batch = self._next_batch(it)
                    # buffers a forward updates (Default-MoE EMA, balance-bias load, norm statistics) are
                    # restored if this micro-batch turns out non-finite, so a bad batch leaves no trace
                    saved = [(b, b.detach().clone()) for b in engine.module.buffers() if b.is_floating_point()]
                    clear_aux(engine.module)  # only this micro-batch's forwards count (not eval or earlier ones)
                    loss, scalars, n = self.task.loss(engine, batch)
                    aux = aux_loss(engine.module)  # every forward the task ran
                    total = loss + aux
                    if not self._all_finite(total):
                        with torch.no_grad():
                            for b, copy in saved:
                                b.copy_(copy)
                        bad_in_a_row += 1
                        msg = (f"non-finite loss ({float(loss.detach())}, aux {float(aux.detach())}) at step "
                               f"{self.step}: micro-batch skipped ({bad_in_a_row} in a row)")
                        self.logger.event(self.step, "nonfinite_loss", msg, loss=float(loss.detach()))
                        if bad_in_a_row >= tl.max_bad_steps:
                            raise TrainingError(f"{bad_in_a_row} consecutive non-finite losses at step {self.step}: "
                                                "training stopped (lower optim.lr, check the data, or raise "
                                                "train.max_bad_steps)")
                        continue
                    bad_in_a_row = 0
                    engine.backward(total)
                    if cfg.dist.zero_stage == 0 and tl.grad_clip > 0 and engine.is_gradient_accumulation_boundary():
                        self._grad_norm = self._clip_grads(tl.grad_clip)
                    engine.step()
                    good += 1
                    units += n
                    if self.source is not None:  # data.sources: the step's share of micro-batches per source
                        scalars = {**scalars, f"source/{self.source}": 1.0}
                    for k, v in {"loss": float(loss.detach()), "aux_loss": float(aux.detach()), **scalars}.items():
                        sums[k] = sums.get(k, 0.0) + v / tl.grad_accum
                update_balance_bias(engine.module)
                self.step += 1
                dt = time.perf_counter() - t0  # the training step alone (a task's after_step work is not in it)
                change = self.threads.tick() if self.threads is not None else None
                if change is not None:
                    _, n, other = change
                    self.logger.event(self.step, "threads", f"intra-op threads -> {n} (other processes keep "
                                      f"{other:.1f} of {self.threads.cpus} CPUs busy)", echo=False,
                                      threads=n, other_cpus=round(other, 2))
                self.task.after_step(engine.module, self.step)
                if self.step % tl.log_every == 0 or self.step == tl.max_steps:
                    vals = self._mean_over_ranks(sums)
                    gn = engine.get_global_grad_norm() if cfg.dist.zero_stage > 0 else getattr(self, "_grad_norm", None)
                    if gn is not None:
                        vals["grad_norm"] = _safe_float(gn)
                    if self.threads is not None:
                        vals["threads"] = float(self.threads.threads)
                    self.logger.log(self.step, **vals, lr=lr, throughput=units * self.world / max(dt, 1e-9))
                if tl.stats_every and (self.step % tl.stats_every == 0 or self.step == tl.max_steps):
                    for tag, stats in self.task.routing_groups(engine.module).items():
                        if stats:
                            self.logger.log_routing(self.step, stats, tag=tag)
                errors = getattr(self.train_loader, "errors", None)
                if errors and sum(errors.values()) != getattr(self, "_logged_errors", 0):
                    self._logged_errors = sum(errors.values())
                    self.logger.event(self.step, "data_skipped", f"skipped so far: {dict(errors)}", **errors)
                if self.cfg.data.has_val and tl.eval_every and self.step % tl.eval_every == 0 and self.step < tl.max_steps:
                    last_eval = self.evaluate()
                if tl.save_every and self.step % tl.save_every == 0 and self.step < tl.max_steps:
                    self.save()
            self.save()
            if self.cfg.data.has_val:
                last_eval = self.evaluate()
        finally:
            self.logger.close()
            self.task.logger = None
            if self.threads is not None:
                self.threads.close()
        if self.rank == 0:
            from .runlog import plot_curves

            keys = ["loss"] + (["val/loss"] if last_eval else [])
            plot_curves([self.run_dir], self.run_dir / "plots" / "loss.png", keys=keys)
        return last_eval

    @torch.no_grad()
    def evaluate(self, split: str | None = None) -> dict[str, float]:
        """Validation metrics (every rank the same), logged as ``val/<name>``. ``split``: other shards than
        ``data.val``. With ``data.val_sources`` (and no ``split``) the task's evaluator passes over every
        source in turn and gets `SourcedBatch` items (``train.eval_batches`` caps each source)."""
        engine = self.engine
        engine.eval()
        d = self.cfg.data
        if d.val_sources and split is None:
            loaders = []
            for i, src in enumerate(d.val_sources):
                loaders.append((i, src.task, _shard_loader(
                    self.cfg, self.task, self.rank, self.world, src.path, split=src.split, train=False,
                    seed=self.cfg.run.seed, decode=LabelledDecode(self.task.decode_eval, src.task),
                    batch_size=src.batch_size, what=f"data.val_sources[{i}]")))
        else:
            loaders = [(None, None, self._make_loader(train=False, split=split))]
        self.task.eval_begin(engine.module)
        try:
            ev = self.task.evaluator()
            ev.reset()
            for i, label, loader in loaders:
                self._evaluate_pass(engine, ev, loader, source=i, label=label)
            ev.gather(dist.group.WORLD if self.world > 1 else None)
            metrics = ev.summarize()
            if self.logger is not None and metrics:
                self.logger.log(self.step, **{f"val/{k}": v for k, v in metrics.items()})
            return metrics
        finally:
            self.task.eval_end(engine.module)
            engine.train()

    def _evaluate_pass(self, engine, ev, loader, *, source: int | None = None, label: str | None = None) -> None:
        """The task's evaluator (`mmoe.train.tasks.Evaluator`) over this rank's share of one split (batches
        wrapped in `SourcedBatch` when ``source`` is given)."""
        cap = self.cfg.train.eval_batches
        # every rank must take part in each expert-parallel forward: a rank whose shards are done repeats
        # the forward of its last batch (outputs dropped, never processed) until every rank is done
        batches = iter(loader)
        i = 0
        last = None
        while True:
            batch = None if (cap is not None and i >= cap) else next(batches, None)
            more = torch.tensor([0.0 if batch is None else 1.0])
            if self.world > 1:
                dist.all_reduce(more, op=dist.ReduceOp.MAX)
            if more.item() == 0:
                break
            if batch is None:
                if last is not None and self.cfg.dist.ep_size > 1:
                    ev.run(engine, last)
                i += 1
                continue
            last = self._to_device(batch)
            if source is not None:
                last = SourcedBatch(last, source, label)
            ev.process(last, ev.run(engine, last))
            i += 1
        errors = getattr(loader, "errors", None)  # data.on_error=skip: logged like training skips
        if errors and self.logger is not None:
            what = f"data.val_sources[{source}]" if source is not None else "validation"
            self.logger.event(self.step, "val_data_skipped", f"{what}: skipped on rank {self.rank}: {dict(errors)} "
                              "(the metrics leave these samples out)", echo=False, **errors)


def _safe_float(x) -> float:
    try:
        return float(x) if x is not None else float("nan")
    except (TypeError, ValueError):
        return float("nan")
