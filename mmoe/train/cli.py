"""``mmoe train CONFIG [key.sub=value ...]`` and ``mmoe eval CONFIG --checkpoint PATH``.

Both run as one process, or under DeepSpeed's launcher for several ranks::

    mmoe train configs/tiny.yaml
    deepspeed --num_gpus 2 --module mmoe train configs/tiny.yaml dist.ep_size=2

(on a CPU-only machine, ``DS_ACCELERATOR=cpu`` makes the launcher start CPU ranks with gloo).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def add_train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                        help="resume from the latest complete checkpoint of the run (or from CHECKPOINT)")
    parser.add_argument("--overwrite", action="store_true",
                        help="run.dir holds another run: move it aside (to RUN.old-<time>) and start afresh")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # DeepSpeed launcher


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file (the run's config.yaml works)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint folder (step_NNNNNNN), or a run's checkpoints folder (its latest)")
    parser.add_argument("--split", default=None, help="shards to evaluate (default: data.val)")
    parser.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)


def _setup_env() -> None:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _load(args):
    from ..errors import CLIError
    from .config import load_train_config

    if os.path.isdir(args.config):
        raise CLIError(f"{args.config}: is a directory, not a YAML config file (a run's config is RUN/config.yaml)")
    if not os.path.isfile(args.config):
        raise CLIError(f"config file not found: {args.config}")
    return load_train_config(args.config, args.overrides)  # a ConfigError names file:line and key


def run_train(args) -> int:
    _setup_env()
    from ..errors import CLIError
    from .deepspeed import finish
    from .engine import Trainer

    if args.resume not in (None, "latest") and "=" in args.resume and not os.path.exists(args.resume):
        # `--resume key=value`: the override was taken for the optional checkpoint argument
        args.overrides.append(args.resume)
        args.resume = "latest"
    cfg = _load(args)
    # config, data, checkpoint and training errors are `mmoe.errors.MMoEError`s: `mmoe.cli.main` prints them
    if args.resume and args.overwrite:
        raise CLIError("--resume and --overwrite exclude each other")
    trainer = Trainer(cfg, config_source=args.config, overwrite=args.overwrite,
                      resume=(True if args.resume == "latest" else args.resume) if args.resume else False)
    if args.resume and getattr(trainer, "_resumed_from", None) is None and trainer.rank == 0:
        print(f"mmoe: no checkpoint under {trainer.ckpt_dir} yet; starting from step 0", file=sys.stderr)
    metrics = trainer.fit()
    if trainer.rank == 0:
        print(json.dumps({"step": trainer.step, **{f"val_{k}": v for k, v in metrics.items()}}))
    finish()
    return 0


def run_eval(args) -> int:
    _setup_env()
    from pathlib import Path

    from . import checkpoint as ckpt_lib
    from .deepspeed import finish
    from .engine import Trainer

    cfg = _load(args)
    path = ckpt_lib.resolve_checkpoint(args.checkpoint)  # damaged files are named when the weights load
    trainer = Trainer(cfg, config_source=args.config, train=False)
    trainer.load_for_eval(path)
    metrics = trainer.evaluate(split=args.split)
    if trainer.rank == 0:
        out = {"checkpoint": str(path), **metrics}
        print(json.dumps(out))
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))
    finish()
    return 0
