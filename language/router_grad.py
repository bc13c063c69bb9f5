"""``mmoe router-grad RUN``: the dense-backprop estimators' router gradient against the exact dense one, by
micro-batch size, on a language-model run's validation documents (`mmoe.tools.router_grad`).

The run's final checkpoint (or ``--init``: the model as the run's seed initialises it) is put in training
mode; ``--batches`` global batches of ``--batch-size`` validation documents are read from the run's
``data.val`` shards in order (no shuffling: the same documents every time), and for every estimator and
micro-batch size the gradient of the batch's mean token loss with respect to every router parameter,
accumulated over micro-batches of that many documents (each packed on its own, as training with
``train.grad_accum`` packs its micro-batches), is compared with the dense oracle's: cosine similarity and
relative error, all MoE layers together and per layer.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path


def _micro_batches(text: str) -> list[int]:
    from mmoe.argtypes import int_list
    from mmoe.errors import CLIError

    try:
        return int_list(text, example="16,4,1")
    except argparse.ArgumentTypeError:
        raise CLIError(f"--micro-batch: expected integers >= 1 separated by commas, got {text!r}") from None


def add_args(parser: argparse.ArgumentParser) -> None:
    from mmoe.argtypes import positive_int

    parser.add_argument("checkpoint", help="a language-model run folder, its checkpoints folder or one checkpoint")
    parser.add_argument("--micro-batch", default="16,4,1",
                        help="micro-batch sizes in documents, comma-separated (default 16,4,1)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="documents per global batch (default 16)")
    parser.add_argument("--batches", type=positive_int, default=4, help="global batches averaged over (default 4)")
    parser.add_argument("--estimators", default="none,expert_group",
                        help="estimators compared with the dense oracle (default none,expert_group)")
    parser.add_argument("--init", action="store_true",
                        help="measure the model as the run's seed initialises it instead of the checkpoint")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")


def _load(args: argparse.Namespace):
    from mmoe.errors import CLIError
    from mmoe.train.checkpoint import CheckpointError
    from mmoe.train.config import load_train_config
    from mmoe.train.configfile import ConfigError

    from .generate import load_lm

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=UserWarning)
            lm = load_lm(args.checkpoint)
        cfg = load_train_config(str(lm.checkpoint.parent.parent / "config.yaml"))
    except (FileNotFoundError, ValueError, ConfigError, CheckpointError) as err:
        raise CLIError(str(err)) from None
    model = lm.model
    if args.init:
        import torch

        torch.manual_seed(cfg.run.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lm.task.build_model()
    if not cfg.data.val or cfg.data.val == "synthetic":
        raise CLIError(f"{lm.checkpoint}: the run has no validation shards (data.val) to read documents from")
    return lm, cfg, model


def run(args: argparse.Namespace) -> int:
    """Prints one Markdown table row per (estimator, micro-batch); returns the exit status."""
    from itertools import islice

    from mmoe.data import ShardLoader
    from mmoe.errors import CLIError
    from mmoe.tools.router_grad import ESTIMATORS, router_grad_fidelity

    from .tasks import IGNORE_INDEX

    micro = _micro_batches(args.micro_batch)
    estimators = [e.strip() for e in args.estimators.split(",") if e.strip()]
    bad = [e for e in estimators if e not in ESTIMATORS]
    if bad or not estimators:
        raise CLIError(f"--estimators: unknown {bad or args.estimators!r}; choose from {', '.join(ESTIMATORS)}")
    lm, cfg, model = _load(args)
    task = lm.task
    loader = ShardLoader(cfg.data.val, split=cfg.data.val_split, batch_size=args.batch_size,
                         decode=task.decode_eval, collate=list, shuffle_buffer=0, epochs=1, drop_last=True)
    batches = list(islice(loader, args.batches))
    if not batches:
        raise CLIError(f"{cfg.data.val}: fewer than {args.batch_size} validation documents")

    def loss_fn(m, docs):  # the task's own training loss (mean over target tokens), back to a sum
        batch = task.collate(docs)
        loss, _, _ = task.loss(m, batch)
        count = int((batch["labels"] != IGNORE_INDEX).sum())
        return loss * count, count

    model.train()
    rows = router_grad_fidelity(model, batches, loss_fn, estimators=estimators, micro_batches=micro)
    tokens = sum(len(d[0]) for b in batches for d in b) / sum(len(b) for b in batches)
    what = "initialisation" if args.init else str(lm.checkpoint)
    print(f"router gradient against the dense oracle's: {what}, {len(batches)} batch(es) of {args.batch_size} "
          f"validation documents ({tokens:.0f} tokens each on average)\n")
    print("| estimator | micro-batch (documents) | cosine (mean) | cosine (min) | relative error | per layer (cosine) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        per = ", ".join(f"{v:.3f}" for v in r["layers"].values())
        print(f"| {r['estimator']} | {r['micro_batch']} | {r['cos']:.3f} | {r['cos_min']:.3f} | {r['rel_err']:.3f} | {per} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": what, "batch_size": args.batch_size,
                                               "batches": len(batches), "rows": rows}, indent=1))
    return 0
