"""A real photograph with a hand-made COCO annotation through the same path as the generated set: the COCO
writer (`mmoe shards coco`), the shard reader, `decode_coco_sample` (with and without jitter) and COCOeval.

The photo is scikit-learn's ``flower.jpg`` (640x427 JPEG, CC-BY, shipped in ``sklearn/datasets/images``);
the annotation is a polygon traced here around the pink flower head (the photo ships without annotations)
plus an uncompressed-RLE "crowd" region over part of the leaves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

mask_util = pytest.importorskip("pycocotools.mask")

from mmoe.data import ShardLoader, write_coco  # noqa: E402
from vision.detection.coco_eval import coco_metrics  # noqa: E402
from vision.detection.data import DetAugment, decode_coco_sample  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# the flower head, traced on the 640x427 photo (x, y), clockwise from the top
FLOWER = [(300, 112), (350, 125), (395, 150), (425, 190), (440, 240), (430, 290), (400, 330), (350, 350),
          (290, 352), (240, 335), (205, 300), (185, 250), (190, 200), (215, 160), (255, 125)]


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory) -> tuple[Path, Path, dict]:
    import shutil

    import sklearn.datasets

    src = Path(sklearn.datasets.__file__).parent / "images" / "flower.jpg"
    root = tmp_path_factory.mktemp("real")
    images = root / "images"
    images.mkdir()
    shutil.copy(src, images / "flower.jpg")
    poly = [float(v) for xy in FLOWER for v in xy]
    crowd = np.zeros((427, 640), dtype=np.uint8)
    crowd[380:420, 20:200] = 1
    crowd_rle = mask_util.encode(np.asfortranarray(crowd))
    xs, ys = poly[0::2], poly[1::2]
    anns = [{"id": 1, "image_id": 7, "category_id": 3, "iscrowd": 0, "segmentation": [poly],
             "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
             "area": float(mask_util.area(mask_util.merge(mask_util.frPyObjects([poly], 427, 640))))},
            {"id": 2, "image_id": 7, "category_id": 5, "iscrowd": 1,
             "segmentation": {"size": [427, 640], "counts": crowd_rle["counts"].decode("ascii")},
             "bbox": [20, 380, 180, 40], "area": float(crowd.sum())}]
    coco = {"images": [{"id": 7, "file_name": "flower.jpg", "width": 640, "height": 427}], "annotations": anns,
            "categories": [{"id": 3, "name": "flower"}, {"id": 5, "name": "leaves"}]}
    (root / "instances.json").write_text(json.dumps(coco))
    write_coco(root / "instances.json", images, root / "shards", progress=False)
    return root, images, coco


def _sample(root: Path) -> dict:
    loader = ShardLoader(root / "shards", batch_size=1, collate=lambda b: b[0], shuffle_buffer=0, epochs=1)
    (sample,) = list(loader)
    return sample


def test_real_photo_round_trips_through_the_coco_writer(coco_dir):
    root, images, coco = coco_dir
    sample = _sample(root)
    assert sample["jpg"] == (images / "flower.jpg").read_bytes()  # the original bytes, not re-encoded
    image, target = decode_coco_sample(sample, categories=[3, 5], train=False)
    assert image.shape == (3, 427, 640) and 0 <= float(image.min()) and float(image.max()) <= 1
    assert target["labels"].tolist() == [1, 2] and target["iscrowd"].tolist() == [0, 1]
    want = mask_util.decode(mask_util.merge(mask_util.frPyObjects([coco["annotations"][0]["segmentation"][0]],
                                                                  427, 640)))
    assert np.array_equal(target["masks"][0].numpy(), want)
    # the traced region is the pink flower: much redder than the rest of the photo
    rgb = image.permute(1, 2, 0).numpy()
    redness = rgb[..., 0] - rgb[..., 1]
    inside = target["masks"][0].numpy().astype(bool)
    assert redness[inside].mean() > redness[~inside].mean() + 0.2
    # the ground truth scored against itself: AP 100, the crowd region ignored
    dets = [{"image_id": 7, "category_id": 3, "bbox": coco["annotations"][0]["bbox"], "score": 0.9,
             "segmentation": mask_util.frPyObjects([coco["annotations"][0]["segmentation"][0]], 427, 640)[0]}]
    for d in dets:
        d["segmentation"] = {"size": d["segmentation"]["size"], "counts": d["segmentation"]["counts"].decode("ascii")
                             if isinstance(d["segmentation"]["counts"], bytes) else d["segmentation"]["counts"]}
    recs = [{"image_id": 7, "height": 427, "width": 640, "annotations": coco["annotations"]}]
    m = coco_metrics(recs, dets, coco["categories"], ("bbox", "segm"))
    assert m["bbox/AP"] == pytest.approx(100.0) and m["segm/AP"] == pytest.approx(100.0)


def test_jitter_on_the_real_photo_keeps_mask_and_box_together(coco_dir):
    root, _, _ = coco_dir
    sample = _sample(root)
    aug = DetAugment(image_size=256, scale_range=(0.5, 1.5))
    for seed in range(4):
        image, target = decode_coco_sample(sample, categories=[3, 5], train=True, aug=aug, seed=seed)
        assert image.shape == (3, 256, 256)
        for box, mask in zip(target["boxes"], target["masks"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box.tolist() == [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
        again, t2 = decode_coco_sample(sample, categories=[3, 5], train=True, aug=aug, seed=seed)
        assert torch.equal(again, image) and torch.equal(t2["masks"], target["masks"])
