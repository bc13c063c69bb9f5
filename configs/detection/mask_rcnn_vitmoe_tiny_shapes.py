"""Mask R-CNN on a tiny ViT-MoE (ViTDet layout), trained from scratch on CPU on the generated shapes set.

Data (from the repository root; 128 px images, 4 classes, boxes + visible-instance masks):
    mmoe shards shapes-det data/shapes_det --num 1000 --img-size 128
Train / evaluate (detectron2's loop; outputs in train.output_dir or --output):
    mmoe d2 train configs/detection/mask_rcnn_vitmoe_tiny_shapes.py [key=value ...] [--resume]
    mmoe d2 eval configs/detection/mask_rcnn_vitmoe_tiny_shapes.py --checkpoint RUN/model_final.pth
Overrides are detectron2's (LazyConfig.apply_overrides): ``data.root=/path/to/set`` for a set written
elsewhere, ``data.image_size=64`` for the training crop / test size, ``train.max_iter=...``.

The model: ViTDet's Mask R-CNN (common/models/mask_rcnn_vitdet.py: LN heads, 2-conv RPN head, 4conv1fc
box head) on a 4-block ViT-MoE (width 96, patch 16, window 4 with global blocks 1 and 3, relative
positions, MoE of 4 experts top-2 in blocks 1 and 3), a 64-channel pyramid p2..p6 (strides 4..64), anchors
8..128 px for the small images, slimmer heads. Data: LSJ-like (flip, resize 0.5-2x, crop to
data.image_size). AdamW with a cosine schedule (robust to a train.max_iter override); COCOEvaluator bbox
and segm AP on the val split. About 0.4-0.5 s per iteration (batch 4) on one CPU thread, so the 2000
iterations take about 15 minutes; after 1000 (train.max_iter=1000) it reached bbox AP 7.8, segm AP 9.1.
"""

import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import CosineParamScheduler

from vision.detection.d2 import D2ViTMoE, MoEGeneralizedRCNN, register_shapes_det

# where `mmoe shards shapes-det` wrote the set (relative to the working directory) and the image side
data = dict(root="data/shapes_det", image_size=128)

C = 64  # pyramid and head channels

# ---------------------------------------------------------------------------------------------- model
model = model_zoo.get_config("common/models/mask_rcnn_vitdet.py").model
model._target_ = MoEGeneralizedRCNN
model.backbone = L(D2ViTMoE)(
    img_size=128,
    patch_size=16,
    embed_dim=96,
    depth=4,
    num_heads=3,
    mlp_ratio=4.0,
    drop_path_rate=0.0,
    window_size=4,
    global_blocks=[1, 3],
    use_rel_pos=True,
    moe_layers="every_2",
    moe={"num_experts": 4, "top_k": 2},
    out_channels=C,
)
model.proposal_generator.in_features = ["p2", "p3", "p4", "p5", "p6"]
model.proposal_generator.head.in_channels = C
model.proposal_generator.anchor_generator.sizes = [[8], [16], [32], [64], [128]]
model.proposal_generator.pre_nms_topk = (1000, 500)
model.proposal_generator.post_nms_topk = (500, 300)
model.roi_heads.num_classes = 4
model.roi_heads.batch_size_per_image = 128
model.roi_heads.box_in_features = ["p2", "p3", "p4", "p5"]
model.roi_heads.mask_in_features = ["p2", "p3", "p4", "p5"]
model.roi_heads.box_head.input_shape = ShapeSpec(channels=C, height=7, width=7)
model.roi_heads.box_head.conv_dims = [C, C]
model.roi_heads.box_head.fc_dims = [256]
model.roi_heads.box_predictor.input_shape = ShapeSpec(channels=256)
model.roi_heads.mask_head.input_shape = ShapeSpec(channels=C, width=14, height=14)
model.roi_heads.mask_head.conv_dims = [C, C, C]

# ----------------------------------------------------------------------------------------------- data
dataloader = model_zoo.get_config("common/data/coco.py").dataloader
dataloader.train.dataset.names = L(register_shapes_det)(root="${data.root}", split="train")
dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),
    L(T.ResizeScale)(min_scale=0.5, max_scale=2.0, target_height="${data.image_size}",
                     target_width="${data.image_size}"),
    L(T.FixedSizeCrop)(crop_size=("${data.image_size}", "${data.image_size}"), pad=False),
]
dataloader.train.mapper.image_format = "RGB"
dataloader.train.mapper.instance_mask_format = "bitmask"  # the set's masks are RLE
dataloader.train.mapper.recompute_boxes = True  # boxes of the cropped masks
dataloader.train.total_batch_size = 4
dataloader.train.num_workers = 0
dataloader.test.dataset.names = L(register_shapes_det)(root="${data.root}", split="val")
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length="${data.image_size}", max_size="${data.image_size}"),
]
dataloader.test.num_workers = 0
# COCOEvaluator of the test set (common/data/coco.py); both tasks named, so both are reported (nan)
# even when an early checkpoint predicts nothing
dataloader.evaluator.tasks = ("bbox", "segm")

# ------------------------------------------------------------------------------------ optimizer, schedule
optimizer = model_zoo.get_config("common/optim.py").AdamW
optimizer.lr = 5e-4  # 1000 iterations: bbox / segm AP 7.8 / 9.1 (2e-4: 3.8 / 6.0)
optimizer.weight_decay = 0.05
optimizer.params.overrides = {"pos_embed": {"weight_decay": 0.0}}

train = model_zoo.get_config("common/train.py").train
train.device = "cpu"
train.output_dir = "runs/d2/mask_rcnn_vitmoe_tiny_shapes"
train.init_checkpoint = ""  # or a classification ViT(-MoE) run / file, see mask_rcnn_vitmoe_b_100ep.py
train.init_upcycle = False
train.max_iter = 2000
train.eval_period = 500  # also the period of routing.jsonl and the expert-load heatmap
train.checkpointer = dict(period=500, max_to_keep=3)
train.log_period = 20
train.seed = 0

lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(CosineParamScheduler)(start_value=1.0, end_value=0.01),
    warmup_length=0.05,
    warmup_factor=0.001,
)
