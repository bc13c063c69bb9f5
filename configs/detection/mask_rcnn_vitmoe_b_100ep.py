"""Mask R-CNN ViT-MoE-B on COCO, ViTDet's 100-epoch recipe (projects/ViTDet/configs/COCO/
mask_rcnn_vitdet_b_100ep.py) with the backbone's FFNs made MoE layers (V-MoE "every 2": blocks 1, 3, ...,
11; 8 experts, top-2).

Same as ViTDet-B: ViT-B/16 (width 768, 12 blocks, 12 heads), window attention 14 except the global
blocks 2, 5, 8, 11, relative positions, drop path 0.1, a position embedding of 64 x 64 (img_size 1024)
resized from the initial checkpoint once, the simple pyramid p2..p6 (256 channels, square padding to 1024),
LN box / mask heads, 2-conv RPN head, 4conv1fc box head; LSJ at 1024 (flip, resize 0.1-2.0x, crop),
64 images per iteration, 184375 iterations (100 epochs of COCO train2017), AdamW lr 1e-4, weight decay 0.1
(none on pos_embed and norms), layer-wise lr decay 0.7, multistep x0.1 at 163889 and 177546 with a
250-iteration warm-up, AMP, DDP with fp16 gradient compression.

Initialisation (train.init_checkpoint, a local path): ViTDet starts from MAE ViT-B
(mae_pretrain_vit_base.pth): its dense MLPs are copied into every expert (train.init_upcycle=True; the
routers start fresh; normalize_topk=True so the upcycled layer starts equal to the dense MLP). A ViT-MoE-B
classification run of this project (a run or checkpoint folder of ``mmoe train``) can be given instead,
with train.init_upcycle=False and its own moe settings.

Data: detectron2's builtin coco_2017_train / coco_2017_val (``$DETECTRON2_DATASETS/coco``, default
./datasets/coco). Run, e.g. on 8 GPUs with 8 images each:
    mmoe d2 train configs/detection/mask_rcnn_vitmoe_b_100ep.py --num-gpus 8
DDP: the experts are stacked parameters, so an expert that gets no token still has a (zero) gradient and
find_unused_parameters stays False.
"""

from functools import partial

import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone.vit import get_vit_lr_decay_rate
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from vision.detection.d2 import D2ViTMoE, MoEGeneralizedRCNN

image_size = 1024

# ---------------------------------------------------------------------------------------------- model
model = model_zoo.get_config("common/models/mask_rcnn_vitdet.py").model
model._target_ = MoEGeneralizedRCNN
model.backbone = L(D2ViTMoE)(
    img_size=image_size,
    patch_size=16,
    embed_dim=768,
    depth=12,
    num_heads=12,
    mlp_ratio=4.0,
    qkv_bias=True,
    drop_path_rate=0.1,
    window_size=14,
    global_blocks=[2, 5, 8, 11],
    use_rel_pos=True,
    moe_layers="every_2",
    moe={"num_experts": 8, "top_k": 2, "normalize_topk": True},
    out_channels=256,
    scale_factors=[4.0, 2.0, 1.0, 0.5],
    top_block=True,
    norm="LN",
    square_pad=image_size,
)

# ------------------------------------------------------------------------------------ data: LSJ at 1024
dataloader = model_zoo.get_config("common/data/coco.py").dataloader
dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),  # flip first
    L(T.ResizeScale)(min_scale=0.1, max_scale=2.0, target_height=image_size, target_width=image_size),
    L(T.FixedSizeCrop)(crop_size=(image_size, image_size), pad=False),
]
dataloader.train.mapper.image_format = "RGB"
dataloader.train.total_batch_size = 64
dataloader.train.mapper.recompute_boxes = True  # boxes of the cropped masks
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=image_size, max_size=image_size),
]

# ---------------------------------------------------------------------------------- trainer settings
train = model_zoo.get_config("common/train.py").train
train.amp.enabled = True
train.ddp.fp16_compression = True
train.init_checkpoint = "checkpoints/mae_pretrain_vit_base.pth"  # a local file or run folder (see above)
train.init_upcycle = True
train.max_iter = 184375  # 100 epochs: 184375 iterations x 64 images / 118000 images per epoch

lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01],
        milestones=[163889, 177546],
        num_updates=train.max_iter,
    ),
    warmup_length=250 / train.max_iter,
    warmup_factor=0.001,
)

# ----------------------------------------------------------------------------------------- optimizer
optimizer = model_zoo.get_config("common/optim.py").AdamW  # lr 1e-4, betas (0.9, 0.999), weight decay 0.1
# layer-wise lr decay 0.7 over the 12 blocks (parameter names backbone.pyramid.net.blocks.<i>. ...;
# the same scales as vision.detection.backbone.lr_decay_scales)
optimizer.params.lr_factor_func = partial(get_vit_lr_decay_rate, num_layers=12, lr_decay_rate=0.7)
optimizer.params.overrides = {"pos_embed": {"weight_decay": 0.0}}
