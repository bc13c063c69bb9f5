"""``mmoe demo``: a ViT-MoE and a dense ViT of equal active compute, trained side by side on real images.

The images are the 1,797 handwritten digits (8x8, grey) that scikit-learn ships, written as WebDataset
shards with a held-out test split (20%, by key hash). Both models are timm ViTs of the same width and
depth, trained by the mmoe engine with the same data order, schedule and augmentation:

* ViT-MoE: every other block's MLP is an `mmoe.MoE` with MH-MoE sub-tokens (``heads=2``) and Default
  MoE's dense router gradient (``dense_backprop="default"``), 8 experts, top-2 per sub-token;
* dense ViT: every MLP as wide as the MoE blocks' active compute averaged over blocks
  (`vision.dense_mlp_ratio_for`), so both spend the same multiply-adds per token.

It prints test top-1 accuracy, parameters and training throughput of both, and writes
``OUT/loss_curves.png`` (training and test loss of both runs), ``OUT/expert_load.png`` (tokens per expert
per MoE layer at the end), ``OUT/results.json`` and the two runs under ``OUT/runs/`` (checkpoints that
``mmoe predict`` and ``mmoe eval`` take).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

DEFAULT_STEPS = 500
QUICK_STEPS = 60


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"optimizer steps per model (default {DEFAULT_STEPS}; --quick: {QUICK_STEPS})")
    parser.add_argument("--quick", action="store_true", help="a short smoke run (accuracy will be low)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of both runs (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def model_sections(embed_dim: int = 64, depth: int = 4) -> tuple[dict, dict]:
    """The ``model:`` sections of the two runs (ViT-MoE, equal-compute dense ViT)."""
    from .models import dense_mlp_ratio_for
    from .tasks import ClassifierConfig, build_classifier

    common = dict(num_classes=10, img_size=16, in_chans=1, drop_path_rate=0.0)
    kwargs = dict(patch_size=4, embed_dim=embed_dim, depth=depth, num_heads=4)
    moe = dict(arch="vit_moe_tiny_patch16_224", moe_layers="every_2", kwargs=kwargs,
               moe=dict(num_experts=8, top_k=2, heads=2, dense_backprop="default"), **common)
    ratio = dense_mlp_ratio_for(build_classifier(ClassifierConfig(**moe)))
    dense = dict(arch="vit_tiny_patch16_224", kwargs=dict(kwargs, mlp_ratio=ratio), **common)
    return moe, dense


def train_config(model: dict, data_dir: Path, run_dir: Path, steps: int, batch_size: int, seed: int,
                 progress: bool):
    from mmoe.train.configfile import from_dict
    from mmoe.train.config import TrainConfig

    return from_dict(TrainConfig, {
        "task": "image_classification",
        "model": model,
        "task_options": {"scale": [0.75, 1.0], "ratio": [0.9, 1.1], "hflip": 0.0, "color_jitter": 0.0,
                         "interpolation": "bilinear", "crop_pct": 1.0, "label_smoothing": 0.1, "per_class": True},
        "data": {"train": str(data_dir), "train_split": "train", "val": str(data_dir), "val_split": "val",
                 "batch_size": batch_size, "shuffle_buffer": 500},
        "optim": {"lr": 3e-3, "weight_decay": 0.05, "warmup_steps": max(1, steps // 15), "schedule": "cosine"},
        "train": {"max_steps": steps, "log_every": 10, "eval_every": max(1, steps // 5), "stats_every": steps,
                  "save_every": 0, "keep_last": 1, "progress": progress},
        "run": {"dir": str(run_dir), "seed": seed, "tensorboard": True},
    }, source="mmoe demo")


def _throughput(run_dir: Path) -> float:
    """Median logged training throughput (images/s, data loading included) after the first logs."""
    import statistics

    from mmoe.train.runlog import read_jsonl

    vals = [r["throughput"] for r in read_jsonl(run_dir / "metrics.jsonl") if "throughput" in r]
    vals = vals[2:] or vals
    return float(statistics.median(vals)) if vals else float("nan")


def run(args: argparse.Namespace) -> int:
    import os

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from mmoe import count_params, routing_stats
    from mmoe.errors import CLIError
    from mmoe.train.runlog import plot_curves
    from mmoe.train.engine import Trainer
    from vision.digits import write_digits_shards

    steps = args.steps or (QUICK_STEPS if args.quick else DEFAULT_STEPS)
    if steps < 1 or args.batch_size < 2 or args.batch_size % 2:
        raise CLIError("--steps must be >= 1 and --batch-size an even number >= 2")
    out = Path(args.out)
    data = out / "data"
    t_start = time.perf_counter()
    if not (data / "manifest.json").is_file():
        print(f"mmoe demo: writing scikit-learn's digits as shards to {data} (80% train, 20% test)")
        write_digits_shards(data, samples_per_shard=300, val_fraction=0.2)
    moe_model, dense_model = model_sections()
    results = {}
    runs = {}
    for name, model in (("vit_moe", moe_model), ("vit_dense", dense_model)):
        run_dir = out / "runs" / name
        if run_dir.exists():
            shutil.rmtree(run_dir)
        cfg = train_config(model, data, run_dir, steps, args.batch_size, args.seed, not args.no_progress)
        print(f"mmoe demo: training {name} ({model['arch']}) for {steps} steps")
        t0 = time.perf_counter()
        trainer = Trainer(cfg, config_source="mmoe demo")
        metrics = trainer.fit()
        wall = time.perf_counter() - t0
        module = trainer.engine.module
        params = count_params(module)
        entry = {"test_acc": metrics.get("acc"), "test_loss": metrics.get("loss"), "params": params.total,
                 "active_params": params.active, "throughput": _throughput(run_dir), "wall_s": wall,
                 "per_class": {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("acc_class/")}}
        stats = routing_stats(module)
        if stats:
            entry["moe_layers"] = {n: {"activation": s.activation, "entropy": s.entropy,
                                       "max_load_share": float(s.load.max())}
                                   for n, s in stats.items()}
            plots = sorted((run_dir / "plots").glob("expert_load_step*.png"))
            if plots:
                shutil.copyfile(plots[-1], out / "expert_load.png")
        results[name] = entry
        runs[name] = run_dir
    plot_curves([runs["vit_moe"], runs["vit_dense"]], out / "loss_curves.png", keys=["loss", "val/loss", "val/acc"],
                labels=["ViT-MoE (MH-MoE + Default MoE)", "dense ViT (equal active compute)"], smooth={"loss": 5})
    results["total_s"] = time.perf_counter() - t_start
    results["steps"] = steps
    (out / "results.json").write_text(json.dumps(results, indent=1))
    m, d = results["vit_moe"], results["vit_dense"]
    print()
    print(f"{'model':<34}{'test top-1':>11}{'params':>10}{'active':>10}{'images/s':>10}")
    for label, r in (("ViT-MoE (MH-MoE h=2, Default MoE)", m), ("dense ViT, equal active compute", d)):
        print(f"{label:<34}{100 * r['test_acc']:>10.1f}%{r['params'] / 1e3:>9.0f}k{r['active_params'] / 1e3:>9.0f}k"
              f"{r['throughput']:>10.0f}")
    print(f"throughput ratio MoE/dense: {m['throughput'] / d['throughput']:.2f}; test split: the held-out 20% "
          "of scikit-learn's 1,797 digits")
    if m.get("moe_layers"):
        act = ", ".join(f"{v['activation']:.2f}" for v in m["moe_layers"].values())
        print(f"MH-MoE activation (fraction of experts a token's sub-tokens use), per MoE layer: {act}")
    print(f"wrote {out / 'loss_curves.png'}, {out / 'expert_load.png'}, {out / 'results.json'}; "
          f"checkpoints under {out / 'runs'}  ({results['total_s']:.0f} s)")
    return 0
