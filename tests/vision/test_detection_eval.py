"""Detection data pipeline (vision/detection/data.py) and COCO evaluation (vision/detection/coco_eval.py)."""

from __future__ import annotations

import hashlib
import io
import json
import math

import numpy as np
import pytest
import torch

mask_util = pytest.importorskip("pycocotools.mask")

from vision.detection.coco_eval import (  # noqa: E402
    CocoEvaluator, coco_metrics, detections_from_outputs)
from vision.detection.data import DetAugment, collate_detection, decode_coco_sample  # noqa: E402
from vision.detection_data import CATEGORIES, write_shapes_det  # noqa: E402

# pycocotools' decode warns under numpy 2 (its own code, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

CAT_IDS = [c["id"] for c in CATEGORIES]
SIZE = 64


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> list[dict]:
    """The raw shard samples of a tiny shapes set (both splits), read back through ShardLoader."""
    from mmoe.data import ShardLoader

    out = tmp_path_factory.mktemp("detdata") / "out"
    write_shapes_det(out, num_images=20, img_size=SIZE, samples_per_shard=8)
    got = []
    for split in ("train", "val"):
        got += list(ShardLoader(out, split=split, batch_size=1, collate=lambda b: b[0], shuffle_buffer=0, epochs=1))
    return sorted(got, key=lambda s: s["__key__"])


def _tight_box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _uncompressed_rle(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with a run of zeros."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, value, run = [], 0, 0
    for v in flat:
        if v != value:
            counts.append(run)
            value, run = v, 0
        run += 1
    counts.append(run)
    return counts


def _hand_sample() -> tuple[dict, dict[str, np.ndarray]]:
    """A 30x40 (HxW) image with a polygon, a crowd (uncompressed RLE) and a compressed-RLE annotation."""
    h, w = 30, 40
    image = np.full((h, w, 3), 90, dtype=np.uint8)
    poly = np.zeros((h, w), np.uint8)
    poly[5:15, 2:12] = 1  # the polygon below, rasterised by pycocotools
    crowd = np.zeros((h, w), np.uint8)
    crowd[18:28, 20:38] = 1
    rle = np.zeros((h, w), np.uint8)
    rle[2:9, 25:33] = 1
    enc = mask_util.encode(np.asfortranarray(rle))
    anns = [
        {"id": 7, "category_id": 2, "bbox": [2, 5, 10, 10], "area": 100.0, "iscrowd": 0,
         "segmentation": [[2, 5, 11.99, 5, 11.99, 14.99, 2, 14.99]]},
        {"id": 8, "category_id": 1, "bbox": [20, 18, 18, 10], "area": 180.0, "iscrowd": 1,
         "segmentation": {"size": [h, w], "counts": _uncompressed_rle(crowd)}},
        {"id": 9, "category_id": 3, "bbox": [25, 2, 8, 7], "area": 56.0, "iscrowd": 0,
         "segmentation": {"size": [h, w], "counts": enc["counts"].decode("ascii")}},
    ]
    sample = {"__key__": "hand", "__url__": "mem://hand.tar", "png": _png(image),
              "json": {"image": {"id": 5, "file_name": "hand.png", "width": w, "height": h}, "annotations": anns}}
    return sample, {"poly": poly, "crowd": crowd, "rle": rle}


# ------------------------------------------------------------------------------------------ augmentation
def test_train_boxes_are_the_tight_boxes_of_the_masks(samples):
    aug = DetAugment(image_size=96)
    padded = 0
    for sample in samples[:8]:
        for seed in range(6):
            image, t = decode_coco_sample(sample, categories=CAT_IDS, train=True, aug=aug, seed=seed)
            n = t["labels"].shape[0]
            assert image.shape == (3, 96, 96) and image.dtype == torch.float32
            assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
            assert t["masks"].shape == (n, 96, 96) and t["masks"].dtype == torch.uint8
            assert t["boxes"].shape == (n, 4) and t["iscrowd"].tolist() == [0] * n
            assert all(1 <= lb <= len(CAT_IDS) for lb in t["labels"].tolist())
            for k in range(n):
                m = t["masks"][k].numpy()
                assert m.any()
                assert t["boxes"][k].tolist() == _tight_box(m)
                assert float(t["area"][k]) == float(m.sum())
            padded += int(float(image[:, -1, :].abs().sum()) == 0.0)
    assert padded > 0  # some jitter scales were below 1 and padded the bottom


def test_same_seed_same_output_different_seeds_differ(samples):
    sample = samples[0]
    aug = DetAugment(image_size=80)
    a = decode_coco_sample(sample, categories=CAT_IDS, train=True, aug=aug, seed=11)
    b = decode_coco_sample(sample, categories=CAT_IDS, train=True, aug=aug, seed=11)
    assert torch.equal(a[0], b[0])
    for key in ("boxes", "labels", "masks", "iscrowd", "area"):
        assert torch.equal(a[1][key], b[1][key])
    others = [decode_coco_sample(sample, categories=CAT_IDS, train=True, aug=aug, seed=s)[0] for s in (12, 13, 14)]
    assert all(not torch.equal(a[0], o) for o in others)


def test_flip_mirrors_and_half_scale_subsamples(samples):
    sample = next(s for s in samples if len(decode_coco_sample(s, categories=CAT_IDS, train=False)[1]["labels"]) >= 2)
    image0, t0 = decode_coco_sample(sample, categories=CAT_IDS, train=False)
    # no flip, scale 1: the image unchanged; the boxes are the (tight) annotation boxes
    same = DetAugment(hflip=0.0, scale_range=(1.0, 1.0), image_size=SIZE)
    image, t = decode_coco_sample(sample, categories=CAT_IDS, train=True, aug=same, seed=0)
    assert torch.equal(image, image0) and torch.equal(t["masks"], t0["masks"]) and torch.equal(t["boxes"], t0["boxes"])
    # flip: image and masks mirrored, x0' = W - x1
    flip = DetAugment(hflip=1.0, scale_range=(1.0, 1.0), image_size=SIZE)
    image, t = decode_coco_sample(sample, categories=CAT_IDS, train=True, aug=flip, seed=0)
    assert torch.equal(image, image0.flip(-1)) and torch.equal(t["masks"], t0["masks"].flip(-1))
    b0 = t0["boxes"]
    assert torch.equal(t["boxes"], torch.stack([SIZE - b0[:, 2], b0[:, 1], SIZE - b0[:, 0], b0[:, 3]], 1))
    assert torch.equal(t["labels"], t0["labels"])
    # scale 0.5: masks are the pixel-centre subsample (nearest), placed top-left, the rest zero padding
    half = DetAugment(hflip=0.0, scale_range=(0.5, 0.5), image_size=SIZE)
    image, t = decode_coco_sample(sample, categories=CAT_IDS, train=True, aug=half, seed=0)
    assert image.shape == (3, SIZE, SIZE) and float(image[:, SIZE // 2:].abs().sum()) == 0.0
    assert float(image[:, :, SIZE // 2:].abs().sum()) == 0.0
    expect = t0["masks"][:, 1::2, 1::2]
    keep = expect.flatten(1).any(1).bool()
    assert torch.equal(t["masks"][:, : SIZE // 2, : SIZE // 2], expect[keep])
    assert int(t["masks"][:, SIZE // 2:].sum()) == 0 and torch.equal(t["labels"], t0["labels"][keep])
    # the image is the (antialiased) bilinear downscale, at the same place
    expect_image = torch.nn.functional.interpolate(image0[None], size=(SIZE // 2, SIZE // 2), mode="bilinear",
                                                   antialias=True)[0]
    assert torch.allclose(image[:, : SIZE // 2, : SIZE // 2], expect_image, atol=1e-6)


def test_polygon_rle_and_crowd_annotations():
    sample, masks = _hand_sample()
    cats = [3, 1, 2]  # label = position + 1
    image, t = decode_coco_sample(sample, categories=cats, train=False)
    assert image.shape == (3, 30, 40) and t["orig_size"] == (30, 40) and t["image_id"] == 5
    assert t["labels"].tolist() == [3, 2, 1] and t["iscrowd"].tolist() == [0, 1, 0]
    assert np.array_equal(t["masks"][0].numpy(), masks["poly"])
    assert np.array_equal(t["masks"][1].numpy(), masks["crowd"])
    assert np.array_equal(t["masks"][2].numpy(), masks["rle"])
    assert t["boxes"].tolist() == [[2, 5, 12, 15], [20, 18, 38, 28], [25, 2, 33, 9]]
    assert t["area"].tolist() == [100.0, 180.0, 56.0]
    assert t["coco"]["image"]["id"] == 5 and [a["id"] for a in t["coco"]["annotations"]] == [7, 8, 9]
    # training: the crowd instance stays, flagged
    aug = DetAugment(hflip=0.0, scale_range=(1.0, 1.0), image_size=40)
    image, t = decode_coco_sample(sample, categories=cats, train=True, aug=aug, seed=3)
    assert image.shape == (3, 40, 40) and "coco" not in t
    assert t["iscrowd"].tolist() == [0, 1, 0] and t["labels"].tolist() == [3, 2, 1]
    assert t["boxes"].tolist() == [[2, 5, 12, 15], [20, 18, 38, 28], [25, 2, 33, 9]]
    # a crop that cuts the crowd region away drops it (its mask is empty)
    far = DetAugment(hflip=0.0, scale_range=(2.0, 2.0), image_size=16)
    for seed in range(10):
        _, t = decode_coco_sample(sample, categories=cats, train=True, aug=far, seed=seed)
        for k in range(len(t["labels"])):
            assert t["masks"][k].any() and t["boxes"][k].tolist() == _tight_box(t["masks"][k].numpy())


def test_images_without_instances(samples):
    empty = next(s for s in samples if not json.loads(s["json"])["annotations"])  # image 20 (index 19)
    hand = {"__key__": "e", "__url__": "mem://e", "png": _png(np.zeros((20, 24, 3), np.uint8)),
            "json": {"image": {"id": 1, "width": 24, "height": 20}, "annotations": []}}
    for sample, (h, w) in ((empty, (SIZE, SIZE)), (hand, (20, 24))):
        for train, side in ((False, None), (True, 48)):
            image, t = decode_coco_sample(sample, categories=CAT_IDS, train=train, aug=DetAugment(image_size=48),
                                          seed=1)
            hh, ww = (side, side) if train else (h, w)
            assert image.shape == (3, hh, ww)
            assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and t["masks"].shape == (0, hh, ww)
            assert t["iscrowd"].shape == (0,) and t["area"].shape == (0,)
            assert t["labels"].dtype == torch.int64 and t["masks"].dtype == torch.uint8
    images, targets = collate_detection([decode_coco_sample(hand, categories=CAT_IDS, train=False)] * 2)
    assert len(images) == len(targets) == 2


def test_unknown_category_names_the_shard_and_key():
    from mmoe.data import DataError

    sample, _ = _hand_sample()
    with pytest.raises(DataError, match=r"'hand' of shard mem://hand.tar.*category_id 3") as info:
        decode_coco_sample(sample, categories=[1, 2], train=False)
    assert info.value.url == "mem://hand.tar" and info.value.key == "hand"


@pytest.mark.parametrize("kwargs, field", [({"hflip": 1.5}, "hflip"), ({"scale_range": (2.0, 1.0)}, "scale_range"),
                                           ({"image_size": 0}, "image_size"), ({"min_box_size": -1}, "min_box_size")])
def test_augment_validation(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        DetAugment(**kwargs)


# ------------------------------------------------------------------------------------------ COCO metrics
def _record(image_id: int, boxes: list[list[int]], cats: list[int], size=(100, 100), crowd=()) -> dict:
    """A ground-truth record with box-shaped masks (XYWH integer boxes)."""
    h, w = size
    anns = []
    for k, ((x, y, bw, bh), c) in enumerate(zip(boxes, cats)):
        m = np.zeros((h, w), np.uint8)
        m[y:y + bh, x:x + bw] = 1
        rle = mask_util.encode(np.asfortranarray(m))
        anns.append({"bbox": [x, y, bw, bh], "category_id": c, "area": float(bw * bh), "iscrowd": int(k in crowd),
                     "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")}})
    return {"image_id": image_id, "height": h, "width": w, "annotations": anns}


def _dets(record: dict, score: float = 0.9, shift: int = 0) -> list[dict]:
    """Detections equal to the record's ground truth (optionally shifted right by ``shift`` pixels)."""
    out = []
    h, w = record["height"], record["width"]
    for k, a in enumerate(record["annotations"]):
        x, y, bw, bh = a["bbox"]
        m = np.zeros((h, w), np.uint8)
        m[y:y + bh, x + shift:x + shift + bw] = 1
        rle = mask_util.encode(np.asfortranarray(m))
        out.append({"image_id": record["image_id"], "category_id": a["category_id"], "score": score - 0.01 * k,
                    "bbox": [x + shift, y, bw, bh], "segmentation": {"size": [h, w],
                                                                     "counts": rle["counts"].decode()}})
    return out


GT = [_record(1, [[10, 10, 20, 20], [40, 40, 40, 45]], [1, 2]), _record(2, [[5, 60, 12, 30]], [3])]


def test_perfect_detections_score_100():
    dets = [d for r in GT for d in _dets(r)]
    m = coco_metrics(GT, dets, CATEGORIES, per_class=True)
    for t in ("bbox", "segm"):
        for k in ("AP", "AP50", "AP75", "APs", "APm"):
            assert m[f"{t}/{k}"] == pytest.approx(100.0), (t, k)
        assert math.isnan(m[f"{t}/APl"])  # no large object: NaN, as detectron2
        assert {f"{t}/AP-square", f"{t}/AP-circle", f"{t}/AP-triangle"} <= set(m)
        assert f"{t}/AP-cross" not in m  # no ground truth of that class
        assert m[f"{t}/AP-circle"] == pytest.approx(100.0)


def test_detections_that_miss_score_0():
    dets = [d for r in GT for d in _dets(r, shift=15)]  # IoU 5/35, 25/55 and 0 (all inside the image)
    m = coco_metrics(GT, dets, CATEGORIES)
    for t in ("bbox", "segm"):
        assert m[f"{t}/AP"] == 0.0 and m[f"{t}/AP50"] == 0.0


def test_hand_computed_ap():
    # 2 ground-truth boxes of one class; detections by score: a false positive (0.9), then a perfect hit of
    # the first box (0.8). Cumulative precision 0, 1/2 at recall 0, 1/2; COCO makes precision monotone from
    # the right (0.5, 0.5) and reads it at the 101 recall points 0, 0.01, ..., 1: the 51 points r <= 0.5 get
    # 0.5, the 50 above get 0 (recall 1/2 is never exceeded). AP = 51 * 0.5 / 101 = 25.2475..% at every IoU
    # threshold (the hit has IoU 1, the false positive IoU 0), so AP = AP50 = AP75.
    gt = [_record(1, [[10, 10, 20, 20], [60, 60, 30, 30]], [1, 1])]
    hit = _dets(gt[0], score=0.8)[0]
    fp = {**_dets(_record(1, [[40, 5, 10, 10]], [1]), score=0.9)[0]}
    m = coco_metrics(gt, [fp, hit], CATEGORIES, per_class=True)
    expected = 100 * 51 * 0.5 / 101
    for t in ("bbox", "segm"):
        assert m[f"{t}/AP"] == pytest.approx(expected)
        assert m[f"{t}/AP50"] == pytest.approx(expected) and m[f"{t}/AP75"] == pytest.approx(expected)
        assert m[f"{t}/AP-square"] == pytest.approx(expected)


def test_empty_detections_give_zero():
    m = coco_metrics(GT, [], CATEGORIES, per_class=True)
    assert m["bbox/AP"] == 0.0 and m["segm/AP"] == 0.0 and m["bbox/APl"] == 0.0
    assert m["bbox/AP-square"] == 0.0 and "bbox/AP-cross" not in m
    assert coco_metrics([], [], CATEGORIES) == {}
    with pytest.raises(ValueError, match="not in the ground truth"):
        coco_metrics(GT, [{**_dets(GT[0])[0], "image_id": 99}], CATEGORIES)


def test_crowd_ground_truth_is_ignored():
    # a detection on a crowd region is neither a hit nor a false positive
    gt = [_record(1, [[10, 10, 20, 20], [50, 50, 30, 30]], [1, 1], crowd=(1,))]
    dets = _dets(gt[0])
    assert coco_metrics(gt, dets, CATEGORIES, iou_types=("bbox",))["bbox/AP"] == pytest.approx(100.0)


def test_detections_from_outputs_maps_back_to_the_original_size():
    mask = torch.zeros(1, 1, 40, 60)
    mask[0, 0, 10:20, 30:50] = 0.9
    out = {"boxes": torch.tensor([[30.0, 10.0, 50.0, 20.0]]), "labels": torch.tensor([2]),
           "scores": torch.tensor([0.7]), "masks": mask}
    (det,) = detections_from_outputs([out], [4], [10, 20], [(20, 30)], input_sizes=[(40, 60)])
    assert det["image_id"] == 4 and det["category_id"] == 20 and det["score"] == pytest.approx(0.7)
    assert det["bbox"] == pytest.approx([15.0, 5.0, 10.0, 5.0])
    decoded = mask_util.decode({"size": det["segmentation"]["size"], "counts": det["segmentation"]["counts"]})
    assert decoded.shape == (20, 30) and decoded[5:10, 15:25].all() and decoded.sum() == 50
    assert isinstance(det["segmentation"]["counts"], str)
    none = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0),
            "masks": torch.zeros(0, 1, 20, 30)}
    assert detections_from_outputs([none], [1], [10, 20], [(20, 30)]) == []
    with pytest.raises(ValueError, match="input_sizes"):
        detections_from_outputs([out], [4], [10, 20], [(20, 30)])


# ------------------------------------------------------------------------------------------ the evaluator
class _Oracle:
    """A fake model: the ground truth of each image (looked up by its pixels) as Mask R-CNN outputs."""

    def __init__(self, pairs, drop_odd: bool = False) -> None:
        self.by_pixels = {self.digest(img): t for img, t in pairs}
        self.drop_odd = drop_odd

    @staticmethod
    def digest(image: torch.Tensor) -> str:
        return hashlib.sha1(image.numpy().tobytes()).hexdigest()

    def __call__(self, images):
        outs = []
        for img in images:
            t = self.by_pixels[self.digest(img)]
            n = t["labels"].shape[0]
            keep = n - 1 if self.drop_odd and t["image_id"] % 2 and n else n
            outs.append({"boxes": t["boxes"][:keep], "labels": t["labels"][:keep],
                         "scores": torch.linspace(1.0, 0.5, n)[:keep],
                         "masks": t["masks"][:keep, None].float()})
        return outs


def _predict(model, images):
    return model(images)


def test_coco_evaluator_merges_ranks_and_ignores_repeats(samples):
    pairs = [decode_coco_sample(s, categories=CAT_IDS, train=False) for s in samples]
    batches = [collate_detection(pairs[i:i + 4]) for i in range(0, len(pairs), 4)]
    for oracle, perfect in ((_Oracle(pairs), True), (_Oracle(pairs, drop_odd=True), False)):
        rank0, rank1 = (CocoEvaluator(_predict, CATEGORIES, per_class=True) for _ in range(2))
        for ev, part in ((rank0, batches[:2]), (rank1, batches[2:])):
            ev.reset()
            for batch in part:
                ev.process(batch, ev.run(oracle, batch))
        clean = CocoEvaluator(_predict, CATEGORIES, per_class=True)
        clean.merge([rank0.state(), rank1.state()])
        expected = clean.summarize()
        rank1.process(batches[-1], rank1.run(oracle, batches[-1]))  # a rank repeating its last batch
        rank0.merge([rank0.state(), rank1.state()])
        assert len(rank0.records) == len(pairs) + len(batches[-1][0])
        got = rank0.summarize()
        assert got.keys() == expected.keys()
        for k in got:
            assert got[k] == pytest.approx(expected[k], nan_ok=True), k
        if perfect:
            assert got["bbox/AP"] == pytest.approx(100.0) and got["segm/AP"] == pytest.approx(100.0)
            assert got["bbox/AP-circle"] == pytest.approx(100.0)
        else:
            assert got["bbox/AP"] < 100.0
    assert CocoEvaluator(_predict, CATEGORIES).summarize() == {}
