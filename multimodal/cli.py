"""The multimodal family's shard source (``mmoe shards shapes``), found by ``mmoe`` through the
``mmoe.shards`` entry point. Standard library only at module level."""

from __future__ import annotations

import argparse

from mmoe.cli import Command


def _add_shapes_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", metavar="OUT", help="output directory (shards + manifest.json)")
    p.add_argument("--num", type=int, default=2000, help="number of pairs (default 2000)")
    p.add_argument("--img-size", type=int, default=32, help="image side in pixels (default 32)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="fraction in the val split (default 0.2)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _write_shapes(args: argparse.Namespace) -> int:
    from mmoe.data.cli import split_summary

    from .data import write_shapes

    manifest = write_shapes(args.out, num_samples=args.num, img_size=args.img_size, seed=args.seed,
                            val_fraction=args.val_fraction, samples_per_shard=args.samples_per_shard,
                            progress=not args.quiet)
    print(split_summary(manifest))
    return 0


SHAPES_SHARDS = Command(_add_shapes_args, _write_shapes,
                        "generated image-caption pairs: N images of one or two coloured shapes with captions "
                        "that name them and their relation, deterministic for a seed (configs/beit3_moe_shapes.yaml)")
