"""``mmoe predict CHECKPOINT IMAGE [IMAGE ...]``: predictions of a trained vision run on image files.

An image classifier prints the top-k classes with their scores. A detection run (``task: detection``)
draws the boxes, class names, scores and masks on each image, and a semantic-segmentation run
(``task: semantic_segmentation``) writes the colour-coded label map: PNGs in ``--out`` (default
``predictions``), one line (or, with ``--json``, one JSON object) per image on stdout. Any task with a
``predict(model, paths, out_dir)`` method is served the same way. A retrieval run (``task: retrieval``) ranks
the captions given with ``--captions`` (or ``--captions-file``, one per line) for each image, and the
images for each caption (the task's ``rank(model, paths, captions, topk)``).

A file that is missing or not a readable image gets one line on stderr
(``mmoe predict: PATH: not a readable image (REASON)``); the other images are still predicted, and the
command then exits with status 2.

``CHECKPOINT`` is a checkpoint folder (``RUN/checkpoints/step_NNNNNNN``), a run's ``checkpoints`` folder or
the run folder itself (then its latest complete checkpoint). The model is rebuilt from the run's
``config.yaml`` (or ``--config``); images go through the task's evaluation transform; class names come
from the checkpoint (read from the training shards' manifest at training time). When the run kept a
weight EMA and was saved by one process, the EMA weights are used unless ``--no-ema``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint folder, a run's checkpoints folder, or a run folder")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--config", default=None, help="the run's YAML config (default: RUN/config.yaml)")
    parser.add_argument("--topk", type=int, default=5, help="classes to show per image (default 5)")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights even if an EMA was kept")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image")
    parser.add_argument("--captions", nargs="+", default=None, metavar="TEXT",
                        help="retrieval runs: the captions to rank for each image (and to rank the images for)")
    parser.add_argument("--captions-file", default=None, metavar="FILE",
                        help="retrieval runs: a text file of captions, one per line")
    parser.add_argument("--out", default="predictions",
                        help="folder for the drawn PNGs of detection / segmentation runs (default: predictions)")


def resolve_checkpoint(path: str | Path) -> Path:
    from mmoe.errors import CLIError
    from mmoe.train import checkpoint as ckpt_lib

    try:
        return ckpt_lib.resolve_checkpoint(path)
    except ckpt_lib.CheckpointError as err:
        raise CLIError(str(err)) from None


def image_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be predicted on (``"no such image file"``, ``"not a readable image (REASON)"``), or
    None when it is a file that PIL opens and decodes."""
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        return "no such image file"
    try:
        with Image.open(p) as image:
            image.load()
    except Exception as err:  # PIL raises many types for bad files (OSError, SyntaxError, ValueError, ...)
        return f"not a readable image ({_reason(err)})"
    return None


def _reason(err: BaseException) -> str:
    if type(err).__name__ == "UnidentifiedImageError":
        return "not an image format PIL can identify"
    msg = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {msg}" if msg else type(err).__name__


class Predictor:
    """A vision run rebuilt from a checkpoint: ``predict(paths, topk)`` (classifiers) -> list of results, or
    ``predict_files(paths, out_dir)`` (detection / segmentation: ``dense`` is True)."""

    def __init__(self, checkpoint: str | Path, config: str | Path | None = None, use_ema: bool = True) -> None:
        import torch

        from mmoe.errors import CLIError
        from mmoe.train.configfile import ConfigError
        from mmoe.train import checkpoint as ckpt_lib
        from mmoe.train.config import load_train_config
        from mmoe.train.tasks import get_task

        self.checkpoint = resolve_checkpoint(checkpoint)
        cfg_path = Path(config) if config else self.checkpoint.parent.parent / "config.yaml"
        if not cfg_path.is_file():
            raise CLIError(f"{cfg_path}: config not found (pass --config, the run's config.yaml)")
        try:
            cfg = load_train_config(str(cfg_path))
        except ConfigError as err:
            raise CLIError(str(err)) from None
        meta = ckpt_lib.read_meta(self.checkpoint)
        from mmoe.train.configfile import from_dict

        task_cls = get_task(cfg.task)
        try:
            options = task_cls.parse_options(cfg.task_options, source=str(cfg_path),
                                             origins=getattr(cfg, "_origins", None))
        except ConfigError as err:
            raise CLIError(str(err)) from None
        model_cfg = from_dict(task_cls.ModelConfig, cfg.model, source=str(cfg_path), path="model")
        if getattr(model_cfg, "init", None):
            import dataclasses

            # the checkpoint holds every weight: the model's start (model.init) is not needed to rebuild it
            off = {"init": None, **({"upcycle": False} if isinstance(getattr(model_cfg, "upcycle", None), bool) else {})}
            model_cfg = dataclasses.replace(model_cfg, **off)
        self.task = task_cls(model_cfg, options)
        self.task_name = cfg.task
        self.retrieval = callable(getattr(self.task, "rank", None))  # ranks captions and images
        self.dense = cfg.task != "image_classification" and not self.retrieval  # writes its predictions
        if self.dense and not callable(getattr(self.task, "predict", None)):
            raise CLIError(f"{cfg_path}: task {cfg.task!r} has no image predictions (not an image classifier, "
                           "detector or segmenter)")
        self.task.load_state_dict(meta.get("task_state", {}))
        torch.manual_seed(0)
        model = self.task.build_model()
        ckpt_lib.load_model_state(model, self.checkpoint, ep_rank=0, ep_size=1)
        self.used_ema = False
        if use_ema and getattr(self.task.options, "ema_decay", None) is not None:
            if meta.get("world_size") != 1:
                import sys

                print(f"mmoe predict: {self.checkpoint} was saved by {meta.get('world_size')} ranks; their weight "
                      "EMAs are not merged, using the raw weights", file=sys.stderr)
            else:  # the task's own EMA: restored from the rank state and swapped in, as for evaluation
                self.task.model_ready(model)
                self.task.load_rank_state_dict(ckpt_lib.load_rank_state(self.checkpoint, 0).get("task") or {})
                if self.task.ema is not None and self.task.ema.updates:
                    self.task.ema.swap_in(model)
                    self.used_ema = True
        self.model = model.eval()
        n = getattr(self.task.model_cfg, "num_classes", 0)
        self.classes = getattr(self.task, "classes", None) or [str(i) for i in range(n)]

    def rank(self, images, captions: list[str], topk: int = 5) -> dict[str, list]:
        """A retrieval run: the captions ranked for each image and the images for each caption."""
        from mmoe.errors import CLIError

        for img in images:
            if not Path(img).is_file():
                raise CLIError(f"{img}: no such image file")
        if not captions:
            raise CLIError("a retrieval run ranks captions: give them with --captions TEXT ... or --captions-file")
        try:
            return self.task.rank(self.model, [str(i) for i in images], list(captions), topk)
        except ValueError as err:  # an image that does not decode, an empty caption
            raise CLIError(str(err)) from None

    def predict_files(self, images, out_dir: str | Path) -> list[dict]:
        """A detection / segmentation run's predictions: PNGs written into ``out_dir`` by ``task.predict``."""
        from mmoe.errors import CLIError

        for img in images:
            if not Path(img).is_file():
                raise CLIError(f"{img}: no such image file")
        try:
            return self.task.predict(self.model, [str(i) for i in images], Path(out_dir))
        except OSError as err:  # PIL's UnidentifiedImageError is an OSError
            raise CLIError(f"cannot read the images ({err})") from None

    def predict(self, images, topk: int = 5) -> list[dict]:
        import torch

        from mmoe.errors import CLIError
        from mmoe.data import DataError

        xs = []
        for img in images:
            p = Path(img)
            if not p.is_file():
                raise CLIError(f"{p}: no such image file")
            from mmoe.data.decode import IMAGE_EXTENSIONS

            ext = p.suffix.lower().lstrip(".")
            ext = ext if ext in IMAGE_EXTENSIONS else "png"  # PIL reads the content whatever the name
            try:
                x, _ = self.task.decode_eval({"__key__": p.stem, "__url__": str(p), ext: p.read_bytes(), "cls": 0})
            except (DataError, OSError, SyntaxError, ValueError) as err:  # PIL's UnidentifiedImageError: OSError
                raise CLIError(f"{p}: not a readable image ({_reason(err)})") from None
            xs.append(x)
        with torch.no_grad():
            probs = self.model(torch.stack(xs)).float().softmax(-1)
        k = max(1, min(topk, probs.shape[-1]))
        top = probs.topk(k, dim=-1)
        return [{"image": str(img), "top": [{"class": self.classes[int(i)], "index": int(i), "score": float(s)}
                                             for s, i in zip(top.values[r], top.indices[r])]}
                for r, img in enumerate(images)]


def run(args: argparse.Namespace) -> int:
    import sys

    pred = Predictor(args.checkpoint, args.config, use_ema=not args.no_ema)
    images = []
    for img in args.images:  # a bad file is reported on its own line; the others are still predicted
        problem = image_problem(img)
        if problem is None:
            images.append(img)
        else:
            print(f"mmoe predict: {img}: {problem}", file=sys.stderr)
    status = 0 if len(images) == len(args.images) else 2
    if not images:
        return status
    if pred.retrieval:
        captions = list(args.captions or [])
        if args.captions_file:
            from mmoe.errors import CLIError

            try:
                captions += [line.strip() for line in Path(args.captions_file).read_text().splitlines() if line.strip()]
            except OSError as err:
                raise CLIError(f"{args.captions_file}: cannot read the captions ({err.strerror})") from None
        ranked = pred.rank(images, captions, args.topk)
        for kind, rows in (("image", ranked["images"]), ("caption", ranked["captions"])):
            for r in rows:
                if args.json:
                    print(json.dumps({kind: r[kind], "top": r["top"]}))
                else:
                    other = "caption" if kind == "image" else "image"
                    print(f"{kind} {r[kind]!r}: " + "; ".join(f"{t[other]!r} {t['score']:.3f}" for t in r["top"]))
        return status
    if pred.dense:
        for r in pred.predict_files(images, args.out):
            if args.json:
                print(json.dumps(r))
            else:
                found = r.get("detections", r.get("classes_present"))
                print(f"{r['image']}: {r['output']} ({len(found)} {'detections' if 'detections' in r else 'classes'})")
        return status
    results = pred.predict(images, args.topk)
    for r in results:
        if args.json:
            print(json.dumps(r))
        else:
            print(f"{r['image']}: " + ", ".join(f"{t['class']} {t['score']:.3f}" for t in r["top"]))
    return status
