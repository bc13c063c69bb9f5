"""``mmoe shards``: write WebDataset shards from an image folder, COCO, text, image-text pairs or semantic
segmentation folders / COCO masks, and verify a shard directory against its manifest.

::

    mmoe shards imagefolder SRC OUT
    mmoe shards coco ANNOTATIONS.json IMAGE_DIR OUT
    mmoe shards text SRC OUT [--unit line|file|paragraph|section] [--lang xx]
    mmoe shards pairs LIST.jsonl|LIST.tsv OUT [--image-field image] [--caption-field caption]
    mmoe shards segfolder IMAGES LABELS OUT [--label-suffix .png] [--classes a,b,c | --classes classes.txt]
    mmoe shards coco-semantic ANNOTATIONS.json IMAGE_DIR OUT [--keep-crowd]
    mmoe shards verify DIR

Writers share ``--samples-per-shard``, ``--max-shard-size`` (``64MB``, ``512MiB``, bytes), ``--val-fraction``,
``--prefix``, ``--on-error fail|skip`` and ``--quiet``. Module-level imports stay light (``mmoe --help``).
"""

from __future__ import annotations

import argparse

from ..argtypes import positive_int as _positive_int


def _size(text: str) -> int:
    from .writers import parse_size

    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err))


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
    return value


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples-per-shard", type=_positive_int, default=1000, metavar="N",
                        help="at most N samples per shard (default 1000)")
    parser.add_argument("--max-shard-size", type=_size, metavar="SIZE",
                        help="at most SIZE bytes per shard: 64MB (powers of 1000), 512MiB or 512M (powers of "
                        "1024), or a byte count (default: no limit)")
    parser.add_argument("--val-fraction", type=_fraction, default=0.0, metavar="F",
                        help="put a fraction F of the samples, chosen by a hash of their key, into val-* "
                        "shards and the rest into train-* (default 0: one split)")
    parser.add_argument("--prefix", help="shard file prefix (default 'shard', or 'train'/'val' with "
                        "--val-fraction; with both, PREFIX-train/PREFIX-val)")
    parser.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                        help="bad input files or lines: stop with an error (default) or skip them with a "
                        "warning (counted in the manifest)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _classes(text: str) -> list[str]:
    """``--classes``: ``a,b,c``, or a text file with one name per line (blank lines ignored)."""
    from pathlib import Path

    path = Path(text)
    if text.endswith(".txt") or path.is_file():
        try:
            names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise argparse.ArgumentTypeError(f"cannot read the class names file {text}: {err}")
    else:
        names = [name.strip() for name in text.split(",")]
    if not names or not all(names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct, non-empty class names, got {text!r}")
    return names


_BUILTIN = ("imagefolder", "coco", "text", "pairs", "segfolder", "coco-semantic", "verify")


def add_args(parser: argparse.ArgumentParser) -> None:
    """Fill the ``mmoe shards`` parser (one sub-parser per source, plus ``verify``)."""
    sub = parser.add_subparsers(dest="source", metavar="SOURCE", required=True, parser_class=type(parser))

    p = sub.add_parser("imagefolder", help="SRC/<class_name>/<images> (class index = sorted class names)",
                       description="Shard an image folder SRC/<class_name>/<images>: each sample holds the "
                       "original image bytes, 'cls' (index in the sorted class names) and 'json' "
                       "{label, path}.")
    p.add_argument("src", metavar="SRC", help="root folder with one sub-folder per class")
    p.add_argument("out", metavar="OUT", help="output directory (shards + manifest.json)")
    _add_common(p)

    p = sub.add_parser("coco", help="COCO instances json + image directory (one sample per image)",
                       description="Shard a COCO detection set: per image, its bytes and 'json' {image, "
                       "annotations: [{id, bbox, category_id, segmentation, area, iscrowd}]}; categories "
                       "go into the manifest.")
    p.add_argument("annotations", metavar="ANNOTATIONS", help="instances_*.json")
    p.add_argument("image_dir", metavar="IMAGE_DIR", help="folder of the images named in the json")
    p.add_argument("out", metavar="OUT", help="output directory (shards + manifest.json)")
    _add_common(p)

    p = sub.add_parser("text", help="text, HTML or JSON-lines files (optionally .gz), or a folder of them",
                       description="Shard text from .txt, .html/.htm/.xhtml and .jsonl files, each optionally "
                       "gzipped: one document per non-empty line (--unit line), per file (--unit file), or "
                       "paragraphs packed into documents of at most --max-chars (--unit paragraph; --unit "
                       "section also starts one at every heading). The language comes from --lang, a dotted "
                       "part of the file name (book.fr.txt.gz), the stem (en.txt) or a folder (de/news.txt). "
                       "With --val-fraction, paragraph and section documents are split by chapter and file "
                       "with the language left out, so no chapter (in any translation) is in both splits. "
                       "Each sample holds 'txt' and 'json' {lang, source, ...}.")
    p.add_argument("src", metavar="SRC", help="a file, or a folder searched recursively for text files")
    p.add_argument("out", metavar="OUT", help="output directory (shards + manifest.json)")
    p.add_argument("--unit", choices=("line", "file", "paragraph", "section"), default="line",
                   help="documents: one per line (default), per file, packed paragraphs, or sections")
    p.add_argument("--max-chars", type=int, default=2000, metavar="N",
                   help="paragraph/section: at most N characters per document (a longer paragraph stays whole)")
    p.add_argument("--min-chars", type=int, default=100, metavar="N",
                   help="paragraph/section: shorter documents join the next one (dropped at a chapter's end)")
    p.add_argument("--text-field", default="text", metavar="NAME", help=".jsonl: the field with the text")
    p.add_argument("--lang", metavar="XX", help="language tag of every document (default: from file names)")
    p.add_argument("--include", action="append", default=None, metavar="GLOB",
                   help="SRC a folder: only files whose name (or path under SRC) matches this shell pattern, "
                   "e.g. '*.txt.gz' where a book ships as both text and HTML (repeatable)")
    _add_common(p)

    p = sub.add_parser("pairs", help="image-text pairs from a .jsonl or .tsv list",
                       description="Shard image-text pairs listed in LIST (.jsonl objects with an image "
                       "path and a caption or a list of the image's captions, or .tsv lines path<TAB>caption); "
                       "image paths are relative to LIST's folder. Each sample holds the image bytes, 'txt' "
                       "(the captions, one per line) and 'json'.")
    p.add_argument("list", metavar="LIST", help=".jsonl or .tsv list file")
    p.add_argument("out", metavar="OUT", help="output directory (shards + manifest.json)")
    p.add_argument("--image-field", default="image", help="jsonl field with the image path (default image)")
    p.add_argument("--caption-field", default="caption",
                   help="jsonl field with the caption or the list of captions (default caption)")
    _add_common(p)

    p = sub.add_parser("segfolder", help="images + label-map PNGs in two folders (semantic segmentation)",
                       description="Shard a semantic-segmentation folder pair: IMAGES/a/x.jpg goes with "
                       "LABELS/a/x.png (see --label-suffix), a single-channel label map (mode L or P) whose "
                       "pixel values are class indices. Each sample holds the image bytes, 'seg.png' and "
                       "'json' {image}.")
    p.add_argument("images", metavar="IMAGES", help="folder of images (searched recursively)")
    p.add_argument("labels", metavar="LABELS", help="folder of label maps, laid out as IMAGES")
    p.add_argument("out", metavar="OUT", help="output directory (shards + manifest.json)")
    p.add_argument("--label-suffix", default=".png", metavar="SUFFIX",
                   help="label map of IMAGES/a/x.jpg: LABELS/a/x + SUFFIX (default .png)")
    p.add_argument("--classes", type=_classes, metavar="NAMES",
                   help="class names by index, background included: a,b,c or a .txt file with one per line "
                   "(recorded in the manifest for per-class metrics and predictions)")
    _add_common(p)

    p = sub.add_parser("coco-semantic", help="COCO instances json + images -> label maps painted from the masks",
                       description="Shard a COCO instance set for semantic segmentation: per image, its bytes, "
                       "'seg.png' (category i of the file's list -> class i+1, 0 = background; annotations "
                       "painted in file order; crowd regions 255 = ignore unless --keep-crowd) and 'json' "
                       "{image, id}; class names go into the manifest.")
    p.add_argument("annotations", metavar="ANNOTATIONS", help="instances_*.json")
    p.add_argument("image_dir", metavar="IMAGE_DIR", help="folder of the images named in the json")
    p.add_argument("out", metavar="OUT", help="output directory (shards + manifest.json)")
    p.add_argument("--keep-crowd", action="store_true", help="paint crowd regions as their class (default: 255)")
    _add_common(p)

    # sources of the task families (``mmoe.shards`` entry points: ``digits`` from vision, ``shapes`` from
    # multimodal); only the one asked for is loaded
    from ..plugins import family_entry_points, load_entry_point

    for name, ep in family_entry_points("mmoe.shards").items():
        if name in _BUILTIN:
            continue
        source = load_entry_point(ep, f"shard source {name!r}")
        q = sub.add_parser(name, help=source.help, description=source.help)
        source.add_args(q)
        q.set_defaults(_write=source.run)

    p = sub.add_parser("verify", help="re-check shard sizes, checksums and sample counts against manifest.json",
                       description="Re-check every shard listed in DIR/manifest.json: present, same size, "
                       "same SHA-256, same number of samples. Exit status 1 if any shard fails.")
    p.add_argument("dir", metavar="DIR", help="shard directory (or its manifest.json)")


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def run(args: argparse.Namespace) -> int:
    """Run ``mmoe shards SOURCE ...``; user mistakes and bad data become one-line `CLIError`s."""
    from mmoe.errors import CLIError

    try:
        if args.source == "verify":
            return _verify(args)
        return _write(args)
    except (FileNotFoundError, NotADirectoryError, PermissionError) as err:
        raise CLIError(str(err)) from None


def _write(args: argparse.Namespace) -> int:
    from . import writers

    if getattr(args, "_write", None) is not None:  # a family's source
        return args._write(args)
    options = dict(prefix=args.prefix, samples_per_shard=args.samples_per_shard,
                   max_shard_bytes=args.max_shard_size, val_fraction=args.val_fraction, progress=not args.quiet)
    if args.source == "imagefolder":
        manifest = writers.write_imagefolder(args.src, args.out, on_error=args.on_error, **options)
    elif args.source == "coco":
        manifest = writers.write_coco(args.annotations, args.image_dir, args.out, on_error=args.on_error, **options)
    elif args.source == "text":
        manifest = writers.write_text(args.src, args.out, unit=args.unit, lang=args.lang, on_error=args.on_error,
                                      max_chars=args.max_chars, min_chars=args.min_chars,
                                      text_field=args.text_field, include=args.include, **options)
    elif args.source == "pairs":
        manifest = writers.write_pairs(args.list, args.out, image_field=args.image_field,
                                       caption_field=args.caption_field, on_error=args.on_error, **options)
    elif args.source == "segfolder":
        manifest = writers.write_segfolder(args.images, args.labels, args.out, label_suffix=args.label_suffix,
                                           classes=args.classes, on_error=args.on_error, **options)
    elif args.source == "coco-semantic":
        manifest = writers.write_coco_semantic(args.annotations, args.image_dir, args.out,
                                               ignore_crowd=not args.keep_crowd, on_error=args.on_error, **options)
    else:
        from mmoe.errors import CLIError

        raise CLIError(f"unknown shard source {args.source!r}")
    print(split_summary(manifest, with_bytes=True))
    return 0


def split_summary(manifest, *, with_bytes: bool = False) -> str:
    """``wrote N shards, M samples[, SIZE] to DIR (train: a shards/b samples, ...)[; skipped K bad input(s)]``:
    the line a shard writer prints."""
    per_split = ", ".join(f"{name}: {len(split.shards)} shards/{split.samples} samples"
                          for name, split in manifest.splits.items())
    size = f", {_human_bytes(manifest.num_bytes)}" if with_bytes else ""
    skipped = manifest.skipped.get("count", 0)
    return (f"wrote {manifest.num_shards} shards, {manifest.num_samples} samples{size} to {manifest.directory} "
            f"({per_split})" + (f"; skipped {skipped} bad input(s)" if skipped else ""))


def add_generator_args(p: argparse.ArgumentParser, *, samples_per_shard: int = 1000,
                       num: tuple[int, str] | None = None, img_size: int | None = None,
                       out_help: str = "output directory (shards + manifest.json)") -> None:
    """The flags of a family's generated shard source (``mmoe shards digits | shapes | shapes-det``): ``OUT``,
    ``--num`` (``num = (default, what)``) with ``--img-size`` and ``--seed`` for generators, and
    ``--samples-per-shard``, ``--val-fraction``, ``--quiet``."""
    p.add_argument("out", metavar="OUT", help=out_help)
    if num is not None:
        p.add_argument("--num", type=int, default=num[0], help=f"number of {num[1]} (default {num[0]})")
    if img_size is not None:
        p.add_argument("--img-size", type=int, default=img_size, help=f"image side in pixels (default {img_size})")
        p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.add_argument("--samples-per-shard", type=int, default=samples_per_shard,
                   help=f"samples per shard (default {samples_per_shard})")
    p.add_argument("--val-fraction", type=float, default=0.2, help="fraction in the val split (default 0.2)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _verify(args: argparse.Namespace) -> int:
    import sys

    from mmoe.errors import CLIError

    from .manifest import Manifest, verify_shards

    manifest = Manifest.load(args.dir)
    problems = verify_shards(manifest.path)
    if problems:
        for line in problems:
            print(line, file=sys.stderr)
        raise CLIError(f"{len(problems)} problem(s) in {manifest.directory} (listed above)")
    print(f"ok: {manifest.num_shards} shards, {manifest.num_samples} samples, {_human_bytes(manifest.num_bytes)} "
          f"in {manifest.directory} match {manifest.path.name}")
    return 0
