"""Semantic FPN on the tiny ViT-MoE of mask_rcnn_vitmoe_tiny_shapes.py, on the generated set's label maps.

Data: the same folder as the detection config (``mmoe shards shapes-det data/shapes_det --num 1000
--img-size 128``): images ``coco/images``, label maps ``coco/semantic`` (0 = background, 1..4 = square,
circle, triangle, cross), the train / val split of ``instances_train.json`` / ``instances_val.json``.
    mmoe d2 train configs/detection/semantic_fpn_vitmoe_tiny_shapes.py [data.root=/path] [key=value ...]

Model: `MoESemanticSegmentor` (loss_moe_aux added in training) with detectron2's SemSegFPNHead (Panoptic
FPN's semantic branch: per level 3x3 conv + GN + ReLU + 2x up to stride 4, summed, 1x1 to 5 classes, 4x
up, cross-entropy, ignore 255) on p2..p5 of the same backbone. LSJ-like augmentation, AdamW, cosine
schedule and trainer settings as the detection config. Evaluation: detectron2's SemSegEvaluator on the
val split (mIoU = mean over the classes present in the ground truth, fwIoU, mACC, pACC; the background is
a class).
"""

import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.data import DatasetMapper, build_detection_test_loader, build_detection_train_loader
from detectron2.data import get_detection_dataset_dicts
from detectron2.evaluation import SemSegEvaluator
from detectron2.layers import ShapeSpec
from detectron2.modeling.meta_arch.semantic_seg import SemSegFPNHead
from omegaconf import OmegaConf

from vision.detection.d2 import MoESemanticSegmentor, register_shapes_det

# data (root, image_size), optimizer, schedule and trainer settings as the detection config
from .mask_rcnn_vitmoe_tiny_shapes import C, data, lr_multiplier, optimizer, train  # noqa: F401
from .mask_rcnn_vitmoe_tiny_shapes import model as _detection

model = L(MoESemanticSegmentor)(
    backbone=_detection.backbone,
    sem_seg_head=L(SemSegFPNHead)(
        input_shape={f"p{i}": L(ShapeSpec)(channels=C, stride=2 ** i) for i in (2, 3, 4, 5)},
        num_classes=5,  # background + the 4 shapes
        conv_dims=64,
        common_stride=4,
        norm="GN",
        ignore_value=255,
        loss_weight=1.0,
    ),
    pixel_mean=_detection.pixel_mean,
    pixel_std=_detection.pixel_std,
)

dataloader = OmegaConf.create()
dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(
        names=L(register_shapes_det)(root="${data.root}", split="train", kind="sem_seg"), filter_empty=False),
    mapper=L(DatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.RandomFlip)(horizontal=True),
            L(T.ResizeScale)(min_scale=0.5, max_scale=2.0, target_height="${data.image_size}",
                             target_width="${data.image_size}"),
            L(T.FixedSizeCrop)(crop_size=("${data.image_size}", "${data.image_size}"), pad=False),
        ],
        image_format="RGB",
    ),
    total_batch_size=4,
    num_workers=0,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(
        names=L(register_shapes_det)(root="${data.root}", split="val", kind="sem_seg"), filter_empty=False),
    mapper=L(DatasetMapper)(
        is_train=False,
        augmentations=[
            L(T.ResizeShortestEdge)(short_edge_length="${data.image_size}", max_size="${data.image_size}"),
        ],
        image_format="RGB",
    ),
    num_workers=0,
)
dataloader.evaluator = L(SemSegEvaluator)(dataset_name="${..test.dataset.names}", output_dir=None)

train.output_dir = "runs/d2/semantic_fpn_vitmoe_tiny_shapes"
