"""The vision family's commands (``mmoe demo``, ``mmoe predict``) and shard sources (``mmoe shards digits``,
``mmoe shards shapes-det``, ``mmoe shards shapes-cls``),
found by ``mmoe`` through the ``mmoe.commands`` / ``mmoe.shards`` entry points. Standard library only at
module level: ``mmoe demo --help`` loads no torch."""

from __future__ import annotations

import argparse

from mmoe.cli import Command, lazy


def _add_digits_args(p: argparse.ArgumentParser) -> None:
    from mmoe.data.cli import add_generator_args

    add_generator_args(p, samples_per_shard=200)


def _write_digits(args: argparse.Namespace) -> int:
    from mmoe.data.cli import split_summary

    from .digits import write_digits_shards

    manifest = write_digits_shards(args.out, samples_per_shard=args.samples_per_shard,
                                   val_fraction=args.val_fraction, progress=not args.quiet)
    print(split_summary(manifest))
    return 0


def _add_shapes_det_args(p: argparse.ArgumentParser) -> None:
    from mmoe.data.cli import add_generator_args

    add_generator_args(p, num=(1000, "images"), img_size=128,
                       out_help="output directory (coco/ folder, shards + manifest.json)")


def _write_shapes_det(args: argparse.Namespace) -> int:
    from mmoe.data.cli import split_summary

    from .detection_data import write_shapes_det

    manifest = write_shapes_det(args.out, num_images=args.num, img_size=args.img_size, seed=args.seed,
                                val_fraction=args.val_fraction, samples_per_shard=args.samples_per_shard,
                                progress=not args.quiet)
    print(split_summary(manifest))
    return 0


def _add_shapes_cls_args(p: argparse.ArgumentParser) -> None:
    from mmoe.data.cli import add_generator_args

    add_generator_args(p, num=(2000, "images"), img_size=64)


def _write_shapes_cls(args: argparse.Namespace) -> int:
    from mmoe.data.cli import split_summary

    from .detection_data import write_shapes_cls

    manifest = write_shapes_cls(args.out, num_images=args.num, img_size=args.img_size, seed=args.seed,
                                val_fraction=args.val_fraction, samples_per_shard=args.samples_per_shard,
                                progress=not args.quiet)
    print(split_summary(manifest))
    return 0


DEMO = Command(lazy("vision.demo", "add_args"), lazy("vision.demo", "run"),
               "train a ViT-MoE (MH-MoE + Default MoE) and a dense ViT of equal active compute on "
               "scikit-learn's digits; accuracies, throughput, expert-load heatmap, loss curves")
PREDICT = Command(lazy("vision.predict", "add_args"), lazy("vision.predict", "run"),
                  "predictions of a trained checkpoint on image files: top-k classes, drawn detections or label "
                  "maps, or (retrieval runs, --captions) the captions ranked per image and the images per caption")
DIGITS_SHARDS = Command(_add_digits_args, _write_digits,
                        "the 8x8 handwritten digits that scikit-learn ships (no download): PNGs with 'cls' "
                        "labels, split into train-* and val-* by key hash (--val-fraction, default 0.2)")
SHAPES_DET_SHARDS = Command(_add_shapes_det_args, _write_shapes_det,
                            "generated detection / segmentation set: shapes of 4 classes with occlusion, "
                            "visible-instance masks (COCO RLE), boxes and label maps on textured backgrounds; "
                            "a COCO folder under OUT/coco plus its shards, deterministic for a seed")
SHAPES_CLS_SHARDS = Command(_add_shapes_cls_args, _write_shapes_cls,
                            "generated classification set of the shapes world: 1-3 shapes, labelled with the "
                            "class of the largest visible one (4 classes); the classification task of "
                            "configs/multitask_shapes.yaml")
D2 = Command(lazy("vision.detection.d2cli", "add_args"), lazy("vision.detection.d2cli", "run"),
             "detectron2's training loop on a LazyConfig (mmoe d2 train|eval CONFIG.py [key=value ...]); "
             "needs the optional detectron2")
