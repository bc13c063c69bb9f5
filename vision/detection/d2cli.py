"""``mmoe d2 train`` / ``mmoe d2 eval``: detectron2's own training loop on a LazyConfig (``.py``) file.

The loop is detectron2's ``tools/lazyconfig_train_net.py``: ``LazyConfig.load`` -> ``apply_overrides`` ->
``default_setup`` -> instantiate the model, optimizer and train loader -> ``create_ddp_model`` ->
``AMPTrainer`` (``train.amp.enabled`` on CUDA) or ``SimpleTrainer`` -> ``DetectionCheckpointer`` -> hooks
(IterationTimer, LRScheduler, PeriodicCheckpointer, `vision.detection.d2.MoEHook`, EvalHook with
``inference_on_dataset(model, dataloader.test, dataloader.evaluator)``, PeriodicWriter) -> resume or load
``train.init_checkpoint`` -> train. `MoEHook` adds what ``mmoe train`` writes for MoE layers:
``routing.jsonl`` and ``plots/expert_load_step*.png`` every ``train.eval_period`` steps and at the end.

``train.init_checkpoint`` may be a detectron2 checkpoint (loaded by ``DetectionCheckpointer``), or a
classification ViT of this project (a run or checkpoint folder of ``mmoe train``) or a timm / MAE ViT
file: those go through `vision.detection.backbone.load_backbone_weights` into the backbone (position
and patch embeddings resized; ``train.init_upcycle=True`` copies dense MLPs into the experts).

``--num-gpus N`` / ``--num-machines M`` start detectron2's ``launch`` (one process per GPU); one process
(the default) also runs on CPU. Standard library only at module level: ``mmoe d2 --help`` needs no
detectron2, and without it every subcommand says how to install it (exit 2).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

_LAUNCH_KEYS = ("num_gpus", "num_machines", "machine_rank", "dist_url")


def add_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="d2_command", metavar="{train,eval}", required=True)
    t = sub.add_parser("train", help="train with detectron2's loop (CONFIG.py [key=value ...])",
                       description="train a detectron2 LazyConfig model (e.g. configs/detection/*.py)")
    e = sub.add_parser("eval", help="evaluate a detectron2 checkpoint on dataloader.test",
                       description="evaluate a checkpoint with the config's test loader and evaluator")
    for q in (t, e):
        q.add_argument("config", help="a detectron2 LazyConfig .py file (configs/detection/...)")
        q.add_argument("overrides", nargs="*", metavar="key=value",
                       help="LazyConfig overrides, e.g. train.max_iter=100 data.root=/path")
        q.add_argument("--output", default=None, help="output directory (sets train.output_dir)")
        q.add_argument("--num-gpus", type=int, default=1, help="processes per machine (default 1)")
        q.add_argument("--num-machines", type=int, default=1)
        q.add_argument("--machine-rank", type=int, default=0)
        q.add_argument("--dist-url", default="auto", help="tcp://host:port of machine 0 (several machines)")
    t.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint in the output directory (if there is one)")
    e.add_argument("--checkpoint", required=True, help="a detectron2 checkpoint, e.g. RUN/model_final.pth")


def run(args: argparse.Namespace) -> int:
    from mmoe.errors import CLIError

    from .d2 import require_detectron2

    try:
        require_detectron2()
    except ImportError as err:
        raise CLIError(str(err)) from None
    config = Path(args.config)
    if not config.is_file():
        raise CLIError(f"{config}: no such config file")
    if config.suffix != ".py":
        raise CLIError(f"{config}: mmoe d2 takes a detectron2 LazyConfig .py file (mmoe train takes the YAML ones)")
    if args.d2_command == "eval" and not Path(args.checkpoint).is_file():
        raise CLIError(f"--checkpoint {args.checkpoint}: no such file")
    opts = argparse.Namespace(
        d2_command=args.d2_command, config_file=str(config), overrides=list(args.overrides or []),
        output=args.output, resume=bool(getattr(args, "resume", False)),
        checkpoint=getattr(args, "checkpoint", None), eval_only=args.d2_command == "eval",
        **{k: getattr(args, k) for k in _LAUNCH_KEYS})
    if opts.num_gpus * opts.num_machines > 1:
        from detectron2.engine import launch

        launch(_main, opts.num_gpus, num_machines=opts.num_machines, machine_rank=opts.machine_rank,
               dist_url=opts.dist_url, args=(opts,))
        return 0
    return _main(opts)


# ------------------------------------------------------------------------------------------------ the loop
def load_config(path: str, overrides: list[str], output: str | None = None):
    """``LazyConfig.load`` + ``apply_overrides`` (+ ``train.output_dir``), errors as `ConfigError`."""
    from detectron2.config import LazyConfig

    from mmoe.errors import ConfigError

    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError("command line", bad[0], "an override is key=value")
    cfg = LazyConfig.load(path)
    try:
        cfg = LazyConfig.apply_overrides(cfg, overrides)
    except Exception as err:  # noqa: BLE001 - omegaconf / detectron2 errors, re-raised as one line
        raise ConfigError(path, "", f"override {' '.join(overrides)}: {type(err).__name__}: {err}") from None
    for key in ("model", "train"):
        if key not in cfg:
            raise ConfigError(path, key, "missing (a detectron2 LazyConfig for mmoe d2 defines model, "
                                         "dataloader, optimizer, lr_multiplier and train)")
    if output:
        cfg.train.output_dir = str(output)
    return cfg


def _device(cfg) -> str:
    import torch

    from mmoe.errors import ConfigError

    device = str(cfg.train.get("device", "cuda"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("", "train.device", f"{device!r} but CUDA is not available here (set train.device=cpu)")
    return device


def _build_model(cfg, device: str):
    from detectron2.config import instantiate
    from detectron2.utils import comm

    from mmoe import moe_layers

    model = instantiate(cfg.model)
    model.to(device)
    if comm.get_world_size() > 1:  # the balance loss and balance-bias loads over all ranks, as mmoe train
        import torch.distributed as dist

        for _, m in moe_layers(model):
            m.dp_group = dist.group.WORLD
    return model


def _ddp(model, cfg, device: str):
    from detectron2.engine.defaults import create_ddp_model

    kwargs = dict(cfg.train.get("ddp", {}))
    if not device.startswith("cuda"):
        kwargs["device_ids"] = None  # CPU (gloo) processes
    return create_ddp_model(model, **kwargs)


def _is_classification_vit(path: str) -> bool:
    """A run / checkpoint folder of this project, or a file whose state dict is a ViT's (timm, MAE)."""
    p = Path(path)
    if p.is_dir():
        return True
    if not p.is_file():
        return False
    try:
        from timm.models import load_state_dict

        state = load_state_dict(str(p), use_ema=True)
    except Exception:  # noqa: BLE001 - not a timm-readable file: detectron2's checkpointer reads it
        return False
    return "pos_embed" in state and "patch_embed.proj.weight" in state


def load_init(model, checkpointer, path: str, upcycle: bool) -> None:
    """``train.init_checkpoint``: a classification ViT into the backbone, or a detectron2 checkpoint."""
    from mmoe.errors import CheckpointError

    from .backbone import load_backbone_weights

    if not path:
        return
    if not _is_classification_vit(path):
        if "://" not in path and not Path(path.split("?")[0]).exists():
            raise CheckpointError(f"train.init_checkpoint: {path}: no such file or folder")
        checkpointer.load(path, checkpointables=[])
        return
    inner = model.module if hasattr(model, "module") else model
    backbone = getattr(inner, "backbone", None)
    if not hasattr(backbone, "vit"):
        raise CheckpointError(f"train.init_checkpoint: {path}: a classification ViT, but model.backbone is not a "
                              "D2ViTMoE")
    try:
        report = load_backbone_weights(backbone.vit, path, upcycle=upcycle, what="train.init_checkpoint: ")
    except (FileNotFoundError, ValueError) as err:
        raise CheckpointError(str(err).replace("set model.upcycle: true", "set train.init_upcycle=True")) from None
    logging.getLogger("detectron2").info(
        f"mmoe d2: backbone initialised from {path} (skipped {len(report['skipped'])} keys, "
        f"fresh: {report['fresh'][:8]}{' ...' if len(report['fresh']) > 8 else ''})")


def _evaluate(cfg, model) -> dict:
    from detectron2.config import instantiate
    from detectron2.evaluation import inference_on_dataset, print_csv_format

    if "evaluator" not in cfg.dataloader:
        return {}
    ret = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    print_csv_format(ret)
    return ret


def _summary(results: dict) -> str:
    parts = []
    for task, metrics in results.items():
        if isinstance(metrics, dict):
            keys = [k for k in ("AP", "AP50", "AP75", "mIoU", "fwIoU", "pACC") if k in metrics] or list(metrics)[:4]
            parts.append(f"{task}: " + ", ".join(f"{k}={float(metrics[k]):.2f}" for k in keys))
    return "; ".join(parts) or "no evaluation results"


def _main(opts: argparse.Namespace) -> int:
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import instantiate
    from detectron2.engine import AMPTrainer, SimpleTrainer, default_setup, default_writers, hooks
    from detectron2.utils import comm

    from .d2 import MoEHook

    cfg = load_config(opts.config_file, opts.overrides, opts.output)
    default_setup(cfg, opts)
    device = _device(cfg)
    model = _build_model(cfg, device)

    if opts.eval_only:
        model = _ddp(model, cfg, device)
        DetectionCheckpointer(model).load(opts.checkpoint)
        results = _evaluate(cfg, model)
        if comm.is_main_process():
            print(_summary(results), flush=True)
        return 0

    cfg.optimizer.params.model = model
    optim = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)
    model = _ddp(model, cfg, device)
    amp = bool(cfg.train.get("amp", {}).get("enabled", False)) and device.startswith("cuda")
    if cfg.train.get("amp", {}).get("enabled", False) and not amp:
        logging.getLogger("detectron2").warning("mmoe d2: train.amp.enabled needs CUDA; training in fp32")
    trainer = (AMPTrainer if amp else SimpleTrainer)(model, train_loader, optim)
    output_dir = cfg.train.output_dir
    checkpointer = DetectionCheckpointer(model, output_dir, trainer=trainer)
    main = comm.is_main_process()
    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if main else None,
        MoEHook(model, output_dir, cfg.train.eval_period),
        hooks.EvalHook(cfg.train.eval_period, lambda: _evaluate(cfg, model)),
        hooks.PeriodicWriter(default_writers(output_dir, cfg.train.max_iter), period=cfg.train.log_period)
        if main else None,
    ])
    if opts.resume and checkpointer.has_checkpoint():
        checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=True)
        # the checkpoint stores the iteration that just finished
        start_iter = trainer.iter + 1
    else:
        load_init(model, checkpointer, str(cfg.train.get("init_checkpoint", "") or ""),
                  bool(cfg.train.get("init_upcycle", False)))
        start_iter = 0
    trainer.train(start_iter, cfg.train.max_iter)
    return 0
