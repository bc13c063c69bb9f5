"""The optional detectron2 adapter of the ViT-MoE detection backbone (dense-vision.md §2).

detectron2 is not a dependency: it is imported only when one of the classes below is first used, and its
absence is an `ImportError` that says how to install it (`INSTALL_HINT`). This module itself imports
without it, so configs and the ``mmoe d2`` command can explain what is missing.

- `D2ViTMoE`: `ViTDetMoE` + `SimpleFeaturePyramid` (`vision.detection.backbone`) as a detectron2
  ``Backbone``. Its keyword arguments are the `BackboneConfig` fields (``L(D2ViTMoE)(embed_dim=192,
  moe={"num_experts": 4})`` in a LazyConfig, which ``LazyConfig.save`` dumps as is), plus
  ``square_pad`` (ViTDet's square padding of every batch; 0 = none). Features ``p2 ... p6`` for patch 16
  (``p<log2 stride>``, `output_shape`); `padding_constraints` carries ``size_divisibility`` under the key
  ``ImageList.from_tensors`` reads (detectron2's own ViTDet misspells it, so there only ``square_pad``
  pads), so every batch is padded to a multiple of the coarsest stride and no border is dropped.
- `MoEGeneralizedRCNN` / `MoESemanticSegmentor`: detectron2's meta-architectures whose training loss dict
  gains ``loss_moe_aux = mmoe.aux_loss(self.backbone)`` (the balance / z-losses of every MoE layer of that
  forward); pending aux terms are dropped before each training forward and after inference, so nothing
  leaks into a later loss.
- `MoEHook`: a trainer hook that calls `mmoe.update_balance_bias` after every step and writes our
  routing statistics (``routing.jsonl``) and expert-load heatmaps (``plots/expert_load_step*.png``), as
  ``mmoe train`` does, every ``period`` steps and at the last one.
- `register_shapes_det`: registers a split of the generated set of ``mmoe shards shapes-det ROOT``
  (instances for COCOEvaluator, or label maps for SemSegEvaluator) and returns its name, so a LazyConfig
  can name a data root that ``key=value`` overrides change.

DDP: the experts of a layer are stacked parameters (``Experts.w1 [E, D, H]`` ...), so an expert that
gets no token in a step still has a (zero) gradient slice and no parameter is unused:
``create_ddp_model(find_unused_parameters=False)`` (detectron2's default) is fine. Task-specific routers
(``moe.num_tasks > 1``) would be unused in a step that has no token of their task; the adapter passes no
task id, so keep ``num_tasks = 1`` here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

INSTALL_CMD = "python -m pip install 'git+https://github.com/facebookresearch/detectron2.git'"
INSTALL_HINT = ("detectron2 is not installed (an optional extra, not on PyPI); install it from source, the official "
                f"way, after torch: {INSTALL_CMD}")

# the classes that subclass detectron2's: defined on first access (module __getattr__)
_LAZY = ("D2ViTMoE", "MoEGeneralizedRCNN", "MoESemanticSegmentor", "MoEHook")

__all__ = ["INSTALL_HINT", "INSTALL_CMD", "require_detectron2", "register_shapes_det", *_LAZY]


def require_detectron2() -> None:
    """Import detectron2 (and its compiled ops), or raise an `ImportError` saying how to install it."""
    try:
        import detectron2  # noqa: F401
    except ImportError as err:
        if isinstance(err, ModuleNotFoundError) and err.name == "detectron2":
            raise ImportError(INSTALL_HINT) from err
        raise ImportError(f"detectron2 cannot be imported ({type(err).__name__}: {err}); reinstall it: "
                          f"{INSTALL_CMD}") from err
    try:
        import detectron2._C  # noqa: F401
    except ImportError as err:
        raise ImportError(f"detectron2 is installed without its compiled ops ({err}); reinstall it: "
                          f"{INSTALL_CMD}") from err


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        classes = _define()
        globals().update(classes)
        return classes[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _plain(value: Any) -> Any:
    """omegaconf containers (what LazyConfig's instantiate passes) as plain dicts and lists."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf comes with detectron2
        return value
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _define() -> dict[str, type]:
    """The classes that subclass detectron2's (defined once, on first use)."""
    require_detectron2()
    import torch
    from detectron2.engine import HookBase
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import Backbone, GeneralizedRCNN, SemanticSegmentor
    from detectron2.utils import comm

    from mmoe import aux_loss, clear_aux, routing_stats, update_balance_bias
    from mmoe.errors import ConfigError

    from .backbone import BackboneConfig, build_backbone

    class D2ViTMoE(Backbone):
        """The ViT-MoE and its simple feature pyramid as a detectron2 ``Backbone`` (module docstring).

        Keyword arguments: the `BackboneConfig` fields, and ``square_pad`` (pad every batch to a square of
        this side, ViTDet's ``square_pad``; 0 = only to `size_divisibility`). ``forward(x)`` takes the
        normalised, padded ``[B, 3, H, W]`` batch and returns ``{"p2": ..., "p6": ...}``.
        """

        def __init__(self, *, square_pad: int = 0, **fields: Any) -> None:
            super().__init__()
            fields = {k: _plain(v) for k, v in fields.items()}
            try:
                cfg = BackboneConfig(**fields)
            except ConfigError as err:  # relative to the section (e.g. moe.top_k)
                raise ConfigError(err.origin, ".".join(p for p in ("model.backbone", err.key) if p),
                                  err.problem) from None
            except (TypeError, ValueError) as err:
                raise ConfigError("", "model.backbone", str(err)) from None
            self.cfg = cfg
            self.square_pad = int(square_pad)
            self.pyramid = build_backbone(cfg)
            names, strides = self.pyramid.names, self.pyramid.strides
            self._out_features = list(names)
            self._out_feature_strides = dict(zip(names, strides))
            self._out_feature_channels = {n: cfg.out_channels for n in names}

        @property
        def vit(self):
            """The `ViTDetMoE` inside (what `load_backbone_weights` and `lr_decay_scales` take)."""
            return self.pyramid.net

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return dict(self.pyramid(x))

        def output_shape(self) -> dict[str, ShapeSpec]:
            return {n: ShapeSpec(channels=self._out_feature_channels[n], stride=self._out_feature_strides[n])
                    for n in self._out_features}

        @property
        def size_divisibility(self) -> int:
            return self.pyramid.size_divisibility

        @property
        def padding_constraints(self) -> dict[str, int]:
            # "size_divisibility", spelled as ImageList.from_tensors reads it
            return {"size_divisibility": self.size_divisibility, "square_size": self.square_pad}

    class MoEGeneralizedRCNN(GeneralizedRCNN):
        """detectron2's ``GeneralizedRCNN`` (Mask R-CNN ...) whose training losses include
        ``loss_moe_aux``, the MoE layers' aux losses of the forward."""

        def forward(self, batched_inputs):
            if not self.training:
                return self.inference(batched_inputs)
            clear_aux(self.backbone)  # forwards that were never part of a loss
            losses = super().forward(batched_inputs)
            losses["loss_moe_aux"] = aux_loss(self.backbone)
            return losses

        def inference(self, *args, **kwargs):
            try:
                return super().inference(*args, **kwargs)
            finally:
                clear_aux(self.backbone)

    class MoESemanticSegmentor(SemanticSegmentor):
        """detectron2's ``SemanticSegmentor`` whose training losses include ``loss_moe_aux``."""

        def forward(self, batched_inputs):
            clear_aux(self.backbone)
            try:
                out = super().forward(batched_inputs)
                if self.training:
                    out["loss_moe_aux"] = aux_loss(self.backbone)
                return out
            finally:
                if not self.training:
                    clear_aux(self.backbone)

    class MoEHook(HookBase):
        """After every step: `mmoe.update_balance_bias` (aux-loss-free balancing; a no-op without it).
        Every ``period`` steps and at the last one, on the main process: the routing statistics of that
        step's training forward to ``output_dir/routing.jsonl`` and the expert-load heatmap to
        ``output_dir/plots/expert_load_step<step>.png`` (`mmoe.train.runlog.RunLogger.log_routing`; a
        step is an iteration done, so iteration 99 is step 100). A resumed run drops the lines after its
        start step, as ``mmoe train`` does.

        Register it before the ``EvalHook``: the statistics are those of the latest forward.
        """

        def __init__(self, model: torch.nn.Module, output_dir: str, period: int) -> None:
            self.model = model.module if hasattr(model, "module") else model  # not the DDP wrapper
            self.output_dir = output_dir
            self.period = int(period)
            self.log = None

        def before_train(self) -> None:
            from mmoe.train.runlog import RunLogger

            self.log = RunLogger(self.output_dir, total_steps=self.trainer.max_iter,
                                 start_step=self.trainer.start_iter, enabled=comm.is_main_process(),
                                 tensorboard=False, progress=False)

        def after_step(self) -> None:
            update_balance_bias(self.model)
            step = self.trainer.iter + 1
            if (self.period > 0 and step % self.period == 0) or step == self.trainer.max_iter:
                stats = routing_stats(self.model)
                if stats and self.log is not None:
                    self.log.log_routing(step, stats)

        def after_train(self) -> None:
            if self.log is not None:
                self.log.close()

    classes = {"D2ViTMoE": D2ViTMoE, "MoEGeneralizedRCNN": MoEGeneralizedRCNN,
               "MoESemanticSegmentor": MoESemanticSegmentor, "MoEHook": MoEHook}
    for name, cls in classes.items():  # importable (pickle, LazyConfig.save) as vision.detection.d2.<name>
        cls.__module__, cls.__qualname__ = __name__, name
    return classes


# ------------------------------------------------------------------------------------------------- data
def _semantic_dicts(root: Path, split: str) -> list[dict]:
    """The split's images (from ``instances_<split>.json``) with their label maps, for SemSegEvaluator."""
    coco = root / "coco"
    doc = json.loads((coco / "annotations" / f"instances_{split}.json").read_text(encoding="utf-8"))
    out = []
    for img in doc["images"]:
        sem = img.get("sem_seg_file_name", img["file_name"])
        out.append({"file_name": str(coco / "images" / img["file_name"]),
                    "sem_seg_file_name": str(coco / "semantic" / sem),
                    "height": img["height"], "width": img["width"], "image_id": img["id"]})
    return out


def register_shapes_det(root: str, split: str = "train", kind: str = "instances") -> str:
    """Register one split of the generated set that ``mmoe shards shapes-det ROOT`` wrote and return its
    detectron2 name.

    ``kind="instances"``: ``shapes_det_<split>`` from ``ROOT/coco/annotations/instances_<split>.json`` and
    ``ROOT/coco/images`` (`register_coco_instances`: boxes, RLE masks, COCOEvaluator). ``kind="sem_seg"``:
    ``shapes_det_sem_seg_<split>``, the same images with their label maps ``ROOT/coco/semantic`` (classes
    background, square, circle, triangle, cross = 0..4; ignore label 255; SemSegEvaluator). Registering
    a name again with the same root does nothing; with another root it replaces the registration.
    """
    require_detectron2()
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    from mmoe.errors import DataError

    from ..detection_data import CATEGORIES

    if kind not in ("instances", "sem_seg"):
        raise ValueError(f"register_shapes_det: kind must be 'instances' or 'sem_seg', got {kind!r}")
    base = Path(str(root)).expanduser()
    json_file = base / "coco" / "annotations" / f"instances_{split}.json"
    if not json_file.is_file():
        raise DataError(f"{json_file}: no such file; write the set with `mmoe shards shapes-det {root}` "
                        "(or set data.root=... to where it is)")
    name = f"shapes_det_{split}" if kind == "instances" else f"shapes_det_sem_seg_{split}"
    key = str(base.resolve())
    if name in DatasetCatalog.list():
        if getattr(MetadataCatalog.get(name), "mmoe_root", None) == key:
            return name
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    if kind == "instances":
        register_coco_instances(name, {"mmoe_root": key}, str(json_file), str(base / "coco" / "images"))
    else:
        DatasetCatalog.register(name, lambda: _semantic_dicts(base, split))
        classes = ["background", *(c["name"] for c in CATEGORIES)]  # label-map values 0..C
        MetadataCatalog.get(name).set(stuff_classes=classes, ignore_label=255, evaluator_type="sem_seg",
                                      image_root=str(base / "coco" / "images"), sem_seg_root=str(base / "coco" / "semantic"), mmoe_root=key)
    return name
