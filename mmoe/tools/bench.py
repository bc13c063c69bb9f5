"""``mmoe bench``: the command's flags and dispatch (standard library only: ``mmoe bench --help`` loads no
torch). The measurements live in `mmoe.tools.layer_bench`, `mmoe.tools.model_bench` and
`mmoe.tools.threads_bench`."""

from __future__ import annotations

import argparse

from ..argtypes import int_list, positive_int

__all__ = ["LAYER_FULL", "LAYER_QUICK", "add_args", "run"]

# `mmoe bench layer` sizes: the full run and --quick (explicit flags override either).
LAYER_FULL = dict(tokens=8192, dim=512, experts=[8, 32, 128], topk=[1, 2], repeats=5)
LAYER_QUICK = dict(tokens=1024, dim=128, experts=[4, 8], topk=[1, 2], repeats=2)


def _csv(values: list[int]) -> str:
    return ",".join(map(str, values))


def add_args(parser: argparse.ArgumentParser) -> None:
    """Fill the ``mmoe bench`` parser (one sub-parser per target)."""
    full, quick = LAYER_FULL, LAYER_QUICK
    targets = parser.add_subparsers(dest="target", metavar="TARGET", required=True, parser_class=type(parser))
    layer = targets.add_parser(
        "layer",
        help="one MoE layer vs a dense FFN of equal active compute and DeepSpeed's MoE (fwd+bwd time, memory)",
        description="Forward+backward time and peak memory of one MoE layer: a dense GELU FFN with the "
        "same active compute (hidden k*H), mmoe dropless, mmoe with capacity factor 1.25 and DeepSpeed's "
        "MoE (capacity factor 1.25), measured side by side in one run with interleaved repetitions "
        "(median). Also the overhead of MH-MoE (--heads, FLOP-matched) and the dense-backprop estimators "
        "over plain top-k at one setting.",
    )
    layer.add_argument("--quick", action="store_true",
                       help=f"small run: --tokens {quick['tokens']} --dim {quick['dim']} --experts "
                       f"{_csv(quick['experts'])} --topk {_csv(quick['topk'])} --repeats {quick['repeats']}")
    layer.add_argument("--experts", type=int_list, metavar="E,E,..",
                       help=f"expert counts (default {_csv(full['experts'])})")
    layer.add_argument("--topk", type=int_list, metavar="K,K,..",
                       help=f"experts per token (default {_csv(full['topk'])})")
    layer.add_argument("--tokens", type=positive_int, help=f"tokens per batch (default {full['tokens']})")
    layer.add_argument("--dim", type=positive_int, help=f"model width (default {full['dim']})")
    layer.add_argument("--expert-hidden", type=positive_int, metavar="H",
                       help="hidden width of one expert (default 2*dim); the dense FFN gets k*H")
    layer.add_argument("--repeats", type=positive_int, metavar="N",
                       help=f"timed repetitions (default {full['repeats']})")
    layer.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="where to run (default: cuda if available, else cpu)")
    layer.add_argument("--bf16", action="store_true", help="run forward and loss under bf16 autocast")
    layer.add_argument("--no-deepspeed", action="store_true", help="leave DeepSpeed's MoE out")
    layer.add_argument("--threads", type=positive_int, metavar="N",
                       help="torch intra-op threads (default: torch's own choice)")
    layer.add_argument("--heads", type=positive_int, default=2,
                       help="MH-MoE heads of the FLOP-matched overhead row (default 2)")
    layer.add_argument("--seed", type=int, default=0, help="seed for weights and inputs (default 0)")
    layer.add_argument("--json", metavar="PATH", help="also write every raw number to this JSON file")
    layer.add_argument("--loop", choices=("both", "tuned", "plain"), default="both",
                       help="CPU only. tuned: this process with mmoe.train.perf.tune_cpu_allocator applied (as "
                       "`mmoe train` runs); plain: glibc's defaults, the way a user's own training script runs; "
                       "both (default): the plain cells in a child process first, then the tuned run, and a table "
                       "of both side by side")
    layer.add_argument("--skip-overhead", action="store_true", help=argparse.SUPPRESS)  # the plain child
    layer.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # a child run: no children

    model = targets.add_parser(
        "model",
        help="whole models, MoE vs dense of equal active compute (and DeepSpeed's MoE layer): training and "
        "decoding throughput",
        description="Training images/s of a ViT-MoE (top-2, and MH-MoE + Default MoE) against the dense ViT of "
        "equal active compute and the same ViT with DeepSpeed's MoE layer, at the demo's size and at ViT-S/16 "
        "224, and LM decoding tokens/s with the KV cache, MoE against dense; interleaved rounds, median, "
        "paired ratios. The groups come from the installed families (entry points mmoe.benchmarks).",
    )
    model.add_argument("--sizes", metavar="S,S", help="ViT sizes: demo (17 tokens, width 64, batch 64), vit_s "
                       "(197 tokens, width 384, batch 32) (default both; --quick: demo)")
    model.add_argument("--quick", action="store_true", help="demo size only, tiny LM, 2 rounds")
    model.add_argument("--rounds", type=positive_int, help="timed rounds (default 5; --quick 2)")
    model.add_argument("--threads", type=positive_int, metavar="N", help="torch intra-op threads")
    model.add_argument("--tuned", action="store_true", help="apply mmoe.train.perf.tune_cpu_allocator first")
    model.add_argument("--no-deepspeed", action="store_true", help="leave the DeepSpeed-layer rows out")
    model.add_argument("--seed", type=int, default=0, help="seed for weights and inputs (default 0)")
    model.add_argument("--json", metavar="PATH", help="also write every raw number to this JSON file")

    threads = targets.add_parser(
        "threads",
        help="training throughput quiet and beside busy processes, default vs fixed intra-op threads",
        description="Runs `mmoe train CONFIG` four times: quiet and beside --busy processes that each spin on "
        "one CPU, with the default threads (they follow the CPUs other processes leave free) and with the "
        "thread count fixed at the usable CPUs. Prints the median throughput of each and busy / quiet.",
    )
    threads.add_argument("config", help="training config (e.g. configs/tiny.yaml, configs/vit_moe_digits.yaml)")
    threads.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    threads.add_argument("--steps", type=positive_int, default=60, help="training steps per run (default 60)")
    threads.add_argument("--warmup", type=int, default=10, help="steps left out of the median (default 10)")
    threads.add_argument("--busy", type=positive_int, default=1, help="busy processes beside the run (default 1)")
    threads.add_argument("--json", metavar="PATH", help="also write every raw number to this JSON file")


def run(args: argparse.Namespace) -> int:
    from ..errors import CLIError

    if args.target == "layer":
        from . import layer_bench  # torch and the core load here, not at `mmoe bench --help`

        sizes = LAYER_QUICK if args.quick else LAYER_FULL
        return layer_bench.run_layer_bench(layer_bench.layer_settings_from_args(args, sizes))
    if args.target == "model":
        from . import model_bench

        return model_bench.run(args)
    if args.target == "threads":
        from . import threads_bench

        return threads_bench.run(args)
    raise CLIError(f"unknown bench target {args.target!r}")
