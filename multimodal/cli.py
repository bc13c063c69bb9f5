"""The multimodal family's shard source (``mmoe shards shapes``), found by ``mmoe`` through the
``mmoe.shards`` entry point. Standard library only at module level."""

from __future__ import annotations

import argparse

from mmoe.cli import Command


def _add_shapes_args(p: argparse.ArgumentParser) -> None:
    from mmoe.data.cli import add_generator_args

    add_generator_args(p, num=(2000, "pairs"), img_size=32)
    p.add_argument("--hard", action="store_true",
                   help="the retrieval variant: 2-3 shapes with type, size, fill and colour, three captions per "
                        "image and two distractor captions (multimodal.data.hard_shapes_sample)")


def _write_shapes(args: argparse.Namespace) -> int:
    from mmoe.data.cli import split_summary

    from .data import write_shapes

    manifest = write_shapes(args.out, num_samples=args.num, img_size=args.img_size, seed=args.seed,
                            val_fraction=args.val_fraction, hard=args.hard, samples_per_shard=args.samples_per_shard,
                            progress=not args.quiet)
    print(split_summary(manifest))
    return 0


SHAPES_SHARDS = Command(_add_shapes_args, _write_shapes,
                        "generated image-caption pairs: N images of one or two coloured shapes with captions "
                        "that name them and their relation, deterministic for a seed (configs/beit3_moe_shapes.yaml); "
                        "--hard: the retrieval variant (configs/retrieval_shapes.yaml)")
