"""The ``mmoe`` command line.

Every subcommand is one entry of `COMMANDS`: ``name -> Command(add_args, run, help)``. ``add_args`` fills
the subcommand's argparse parser, ``run`` takes the parsed namespace and returns an exit code. A new
subcommand (``train``, ``eval``, ``shards``, ``demo``) is one more entry; its heavy imports (torch, the
core, DeepSpeed) belong inside ``run`` so that ``mmoe --help`` stays fast.

Errors meant for the user are raised as `CLIError` (or reported by argparse) and come out as one line on
stderr with a non-zero exit status; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NamedTuple, NoReturn, Sequence

PROG = "mmoe"

# `mmoe bench layer` sizes: the full run and --quick (explicit flags override either).
BENCH_LAYER_FULL = dict(tokens=8192, dim=512, experts=[8, 32, 128], topk=[1, 2], repeats=5)
BENCH_LAYER_QUICK = dict(tokens=1024, dim=128, experts=[4, 8], topk=[1, 2], repeats=2)


class CLIError(Exception):
    """A mistake or missing prerequisite on the user's side; printed as one line, exit status 1."""


class Command(NamedTuple):
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    help: str


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line: ``mmoe bench layer: error: ... (see --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# ------------------------------------------------------------------------------------------------
# bench


def int_list(text: str, minimum: int = 1, example: str = "8,32,128") -> list[int]:
    """``"8,32,128"`` -> ``[8, 32, 128]`` (integers >= ``minimum``, no duplicates), for argparse types."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like {example}, got {text!r}")
    if not values or any(v < minimum for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= {minimum} like {example}, got {text!r}")
    return list(dict.fromkeys(values))


def _int_list(text: str) -> list[int]:
    return int_list(text)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _csv(values: list[int]) -> str:
    return ",".join(map(str, values))


def _add_bench_args(parser: argparse.ArgumentParser) -> None:
    full, quick = BENCH_LAYER_FULL, BENCH_LAYER_QUICK
    targets = parser.add_subparsers(dest="target", metavar="TARGET", required=True, parser_class=_Parser)
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
    layer.add_argument("--experts", type=_int_list, metavar="E,E,..",
                       help=f"expert counts (default {_csv(full['experts'])})")
    layer.add_argument("--topk", type=_int_list, metavar="K,K,..",
                       help=f"experts per token (default {_csv(full['topk'])})")
    layer.add_argument("--tokens", type=_positive_int, help=f"tokens per batch (default {full['tokens']})")
    layer.add_argument("--dim", type=_positive_int, help=f"model width (default {full['dim']})")
    layer.add_argument("--expert-hidden", type=_positive_int, metavar="H",
                       help="hidden width of one expert (default 2*dim); the dense FFN gets k*H")
    layer.add_argument("--repeats", type=_positive_int, metavar="N",
                       help=f"timed repetitions (default {full['repeats']})")
    layer.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="where to run (default: cuda if available, else cpu)")
    layer.add_argument("--bf16", action="store_true", help="run forward and loss under bf16 autocast")
    layer.add_argument("--no-deepspeed", action="store_true", help="leave DeepSpeed's MoE out")
    layer.add_argument("--threads", type=_positive_int, metavar="N",
                       help="torch intra-op threads (default: torch's own choice)")
    layer.add_argument("--heads", type=_positive_int, default=2,
                       help="MH-MoE heads of the FLOP-matched overhead row (default 2)")
    layer.add_argument("--seed", type=int, default=0, help="seed for weights and inputs (default 0)")
    layer.add_argument("--json", metavar="PATH", help="also write every raw number to this JSON file")


def _run_bench(args: argparse.Namespace) -> int:
    if args.target == "layer":
        from mmoe import bench  # torch and the core load here, not at `mmoe --help`

        return bench.run_layer_bench(bench.layer_settings_from_args(args))
    raise CLIError(f"unknown bench target {args.target!r}")


def _lazy(module: str, attr: str) -> Callable:
    """A function that imports ``module`` only when called (keeps ``mmoe --help`` fast)."""

    def call(*args, **kwargs):
        import importlib

        return getattr(importlib.import_module(module), attr)(*args, **kwargs)

    return call


COMMANDS: dict[str, Command] = {
    "demo": Command(_lazy("vision.demo", "add_args"), _lazy("vision.demo", "run"),
                    "train a ViT-MoE (MH-MoE + Default MoE) and a dense ViT of equal active compute on "
                    "scikit-learn's digits; accuracies, throughput, expert-load heatmap, loss curves"),
    "bench": Command(_add_bench_args, _run_bench, "benchmarks (mmoe bench layer)"),
    "shards": Command(_lazy("mmoe.data.cli", "add_args"), _lazy("mmoe.data.cli", "run"),
                      "write WebDataset shards (image folder, COCO, text, image-text pairs) and verify them"),
    "train": Command(_lazy("mmoe.train.cli", "add_train_args"), _lazy("mmoe.train.cli", "run_train"),
                     "train a model from a YAML config (mmoe train CONFIG [key.sub=value ...])"),
    "predict": Command(_lazy("vision.predict", "add_args"), _lazy("vision.predict", "run"),
                       "classify image files with a trained checkpoint (top-k classes with scores)"),
    "tokenizer": Command(_lazy("language.cli", "add_args"), _lazy("language.cli", "run"),
                         "train a multilingual SentencePiece tokenizer from text shards or .txt files"),
    "compare": Command(_lazy("mmoe.compare", "add_args"), _lazy("mmoe.compare", "run"),
                       "train one config with several routing variants and seeds; table and validation-loss plot"),
    "generate": Command(_lazy("language.generate", "add_args"), _lazy("language.generate", "run"),
                        "generate text from a trained language-model checkpoint (greedy or sampled)"),
    "eval": Command(_lazy("mmoe.train.cli", "add_eval_args"), _lazy("mmoe.train.cli", "run_eval"),
                    "evaluate a checkpoint (mmoe eval CONFIG --checkpoint PATH)"),
}


# ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="mmoe: one Mixture-of-Experts core for vision, language and "
                     "multimodal models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    for name, command in COMMANDS.items():
        command.add_args(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mmoe`` console script and of ``python -m mmoe``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # DeepSpeed's launcher puts --local_rank=N before the subcommand; the rank is in LOCAL_RANK too
    argv = [a for a in argv if not a.startswith("--local_rank=")]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # `key=value` overrides after an option (`mmoe train CFG --resume a.b=1`) land here
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*(args.overrides or []), *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return COMMANDS[args.command].run(args)
    except CLIError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
