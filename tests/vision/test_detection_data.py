"""The generated detection / segmentation set (vision/detection_data.py) and the COCO path it shares."""

from __future__ import annotations

import hashlib
import io
import json
from importlib.metadata import EntryPoint
from pathlib import Path

import numpy as np
import pytest

from vision.detection_data import CATEGORIES, shapes_det_sample, size_bucket, write_shapes_det

mask_util = pytest.importorskip("pycocotools.mask")
from pycocotools.coco import COCO  # noqa: E402

# pycocotools' decode warns under numpy 2 (its own code, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

N, SIZE = 40, 64  # N >= empty_every (20): image 19 and 39 are empty by the documented rule


@pytest.fixture(scope="module")
def det_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("det") / "out"
    write_shapes_det(out, num_images=N, seed=3, img_size=SIZE, samples_per_shard=16)
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


def test_sample_is_a_pure_function_of_seed_and_index():
    a, b = shapes_det_sample(5, seed=1, img_size=SIZE), shapes_det_sample(5, seed=1, img_size=SIZE)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.semantic, b.semantic)
    assert [i["bbox"] for i in a.instances] == [i["bbox"] for i in b.instances]
    assert all(np.array_equal(x["mask"], y["mask"]) for x, y in zip(a.instances, b.instances))
    shapes_det_sample(6, seed=1, img_size=SIZE)  # no hidden state between calls
    assert np.array_equal(shapes_det_sample(5, seed=1, img_size=SIZE).image, a.image)
    assert not np.array_equal(shapes_det_sample(5, seed=2, img_size=SIZE).image, a.image)
    assert not np.array_equal(shapes_det_sample(4, seed=1, img_size=SIZE).image, a.image)


def test_masks_boxes_areas_and_semantic_map_agree():
    ids = {c["id"] for c in CATEGORIES}
    for index in range(30):
        s = shapes_det_sample(index, seed=0, img_size=SIZE)
        assert s.image.shape == (SIZE, SIZE, 3) and s.image.dtype == np.uint8
        union = np.zeros((SIZE, SIZE), dtype=np.uint8)
        seen = np.zeros((SIZE, SIZE), dtype=bool)
        for inst in s.instances:
            m = inst["mask"]
            assert inst["category_id"] in ids and inst["iscrowd"] == 0
            assert inst["area"] == int(m.sum()) >= 10  # default min_visible_area
            assert inst["area"] <= inst["drawn_area"]
            x, y, w, h = inst["bbox"]
            assert m[y:y + h, x:x + w].sum() == inst["area"]  # the box holds the whole mask ...
            inner = m[y:y + h, x:x + w]  # ... and is tight: every edge row / column has a pixel
            assert inner[0].any() and inner[-1].any() and inner[:, 0].any() and inner[:, -1].any()
            assert not (seen & m).any()  # visible masks never overlap
            seen |= m
            union[m] = inst["category_id"]
            # a visible pixel shows this instance's colour (it is on top there)
            colours = s.image[m]
            assert (colours == colours[0]).all()
        assert np.array_equal(union, s.semantic)


def test_occlusion_happens_and_nearly_hidden_shapes_are_dropped():
    occluded = dropped = 0
    for index in range(60):
        s = shapes_det_sample(index, seed=0, img_size=SIZE)
        dropped += s.dropped
        orders = [i["order"] for i in s.instances]
        assert orders == sorted(orders)
        # drawn order minus kept ones = dropped ones
        occluded += sum(i["area"] < i["drawn_area"] for i in s.instances)
    assert occluded > 0 and dropped > 0
    # a huge min_visible_area drops every shape; 0 or 1 keeps every shape with a visible pixel
    s_all = shapes_det_sample(7, seed=0, img_size=SIZE, min_visible_area=1)
    s_none = shapes_det_sample(7, seed=0, img_size=SIZE, min_visible_area=SIZE * SIZE + 1)
    assert s_none.instances == [] and s_none.dropped == len(s_all.instances) + s_all.dropped
    assert not s_none.semantic.any()
    assert np.array_equal(s_none.image, s_all.image)  # dropping is in the annotations only


def test_scales_cover_several_coco_buckets_and_empty_images_exist():
    buckets = set()
    for index in range(40):
        s = shapes_det_sample(index, seed=0, img_size=SIZE)
        buckets |= {size_bucket(i["area"], SIZE) for i in s.instances}
        if index % 20 == 19:
            assert s.instances == [] and s.dropped == 0 and not s.semantic.any()
        else:
            assert s.dropped + len(s.instances) >= 1
    assert {"small", "medium", "large"} <= buckets
    assert size_bucket(31 ** 2, 640) == "small" and size_bucket(32 ** 2, 640) == "medium"
    assert size_bucket(96 ** 2, 640) == "large" and size_bucket(10 ** 2, 64) == "large"


def test_write_is_byte_identical_for_a_seed(det_dir, tmp_path):
    first_manifest, first_tree = _sha(det_dir / "manifest.json"), _tree(det_dir)
    write_shapes_det(det_dir, num_images=N, seed=3, img_size=SIZE, samples_per_shard=16)  # rewrite in place
    assert _sha(det_dir / "manifest.json") == first_manifest and _tree(det_dir) == first_tree
    other = tmp_path / "other"  # elsewhere: the same files; the manifest differs only in the folder it names
    write_shapes_det(other, num_images=N, seed=3, img_size=SIZE, samples_per_shard=16)
    other_tree = _tree(other)
    assert other_tree.pop("manifest.json") != first_tree.pop("manifest.json")
    assert other_tree == first_tree
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (det_dir, other))
    assert a["source"]["options"]["image_dir"] == str(det_dir / "coco" / "images")
    a["source"]["options"] = b["source"]["options"] = None
    assert a == b
    changed = tmp_path / "changed"
    write_shapes_det(changed, num_images=N, seed=4, img_size=SIZE, samples_per_shard=16)
    assert _tree(changed)["coco/images/000000.png"] != first_tree["coco/images/000000.png"]


def test_coco_json_loads_with_pycocotools_and_masks_round_trip(det_dir):
    ann_dir = det_dir / "coco" / "annotations"
    ids = {"train": set(), "val": set()}
    for split in ("train", "val"):
        coco = COCO(str(ann_dir / f"instances_{split}.json"))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["square", "circle", "triangle", "cross"]
        ids[split] = set(coco.getImgIds())
        for image_id in coco.getImgIds():
            index = image_id - 1
            s = shapes_det_sample(index, seed=3, img_size=SIZE)
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
            assert len(anns) == len(s.instances)
            for ann, inst in zip(anns, s.instances):
                assert np.array_equal(coco.annToMask(ann).astype(bool), inst["mask"])
                assert ann["bbox"] == inst["bbox"] and ann["area"] == inst["area"]
                assert list(mask_util.toBbox(ann["segmentation"])) == inst["bbox"]
                assert ann["category_id"] == inst["category_id"] and ann["iscrowd"] == 0
            from PIL import Image
            info = coco.loadImgs([image_id])[0]
            assert np.array_equal(np.asarray(Image.open(det_dir / "coco" / "images" / info["file_name"])),
                                  s.image)
            assert np.array_equal(np.asarray(Image.open(det_dir / "coco" / "semantic" / info["sem_seg_file_name"])),
                                  s.semantic)
    assert ids["train"] and ids["val"] and not ids["train"] & ids["val"]
    assert ids["train"] | ids["val"] == set(range(1, N + 1))
    for image_id in (20, 40):  # the empty images (index 19, 39) are listed, with no annotation
        split = "train" if image_id in ids["train"] else "val"
        assert COCO(str(ann_dir / f"instances_{split}.json")).getAnnIds(imgIds=[image_id]) == []


def _raw(batch):
    return batch[0]


def _read(out: Path, split: str) -> list[dict]:
    from mmoe.data import ShardLoader

    return list(ShardLoader(out, split=split, batch_size=1, collate=_raw, shuffle_buffer=0, epochs=1))


def test_shards_hold_the_same_annotations(det_dir):
    from mmoe.data import Manifest

    manifest = Manifest.load(det_dir / "manifest.json")
    assert manifest.source["type"] == "coco"  # the writer real COCO folders go through
    assert manifest.info["categories"] == CATEGORIES and manifest.info["num_images"] == N
    assert manifest.info["generator"]["seed"] == 3
    assert manifest.splits["train"].samples + manifest.splits["val"].samples == N
    for split in ("train", "val"):
        coco = json.loads((det_dir / "coco" / "annotations" / f"instances_{split}.json").read_text())
        by_image = {img["id"]: [] for img in coco["images"]}
        for ann in coco["annotations"]:
            by_image[ann["image_id"]].append({k: ann[k] for k in ("id", "bbox", "category_id", "segmentation",
                                                                  "area", "iscrowd")})
        samples = _read(det_dir, split)
        assert len(samples) == len(coco["images"])
        for sample in samples:
            meta = json.loads(sample["json"])
            assert meta["annotations"] == by_image[meta["image"]["id"]]
            assert sample["png"] == (det_dir / "coco" / "images" / meta["image"]["file_name"]).read_bytes()
            assert sample["__key__"] == Path(meta["image"]["file_name"]).stem


def test_a_real_annotated_coco_folder_goes_through_the_same_writer(tmp_path):
    """A hand-made COCO folder: one PNG, one polygon annotation (a filled triangle)."""
    from PIL import Image, ImageDraw

    from mmoe.data import write_coco

    images = tmp_path / "images"
    images.mkdir()
    img = Image.new("RGB", (40, 30), (10, 20, 30))
    poly = [5.0, 5.0, 30.0, 5.0, 5.0, 25.0]
    ImageDraw.Draw(img).polygon(poly, fill=(250, 0, 0))
    img.save(images / "photo.png")
    ann = {"id": 7, "image_id": 42, "category_id": 3, "segmentation": [poly], "area": 250.0,
           "bbox": [5.0, 5.0, 25.0, 20.0], "iscrowd": 0}
    data = {"images": [{"id": 42, "file_name": "photo.png", "width": 40, "height": 30}], "annotations": [ann],
            "categories": [{"id": 3, "name": "triangle", "supercategory": "shape"}]}
    (tmp_path / "instances_val.json").write_text(json.dumps(data))
    out = tmp_path / "shards"
    manifest = write_coco(tmp_path / "instances_val.json", images, out)
    assert manifest.info["categories"] == data["categories"] and manifest.info["num_annotations"] == 1
    (sample,) = _read(out, next(iter(manifest.splits)))
    meta = json.loads(sample["json"])
    assert meta["image"] == data["images"][0]
    assert meta["annotations"] == [{k: ann[k] for k in ("id", "bbox", "category_id", "segmentation", "area",
                                                        "iscrowd")}]
    assert sample["png"] == (images / "photo.png").read_bytes()
    # the polygon read back from the shard rasterises onto the drawn pixels (pycocotools vs PIL: edges aside)
    rle = mask_util.merge(mask_util.frPyObjects(meta["annotations"][0]["segmentation"], 30, 40))
    decoded = mask_util.decode(rle).astype(bool)
    red = (np.asarray(Image.open(io.BytesIO(sample["png"]))) == (250, 0, 0)).all(-1)
    assert (decoded & red).sum() / (decoded | red).sum() > 0.85


def test_cli_writes_the_set(tmp_path, monkeypatch, capsys):
    import mmoe.cli
    import mmoe.plugins

    real = mmoe.plugins.family_entry_points

    def with_shapes_det(group):  # as after `pip install -e .` with this pyproject
        eps = dict(real(group))
        if group == "mmoe.shards":
            eps["shapes-det"] = EntryPoint("shapes-det", "vision.cli:SHAPES_DET_SHARDS", "mmoe.shards")
        return eps

    monkeypatch.setattr(mmoe.plugins, "family_entry_points", with_shapes_det)
    out = tmp_path / "cli"
    rc = mmoe.cli.main(["shards", "shapes-det", str(out), "--num", "12", "--img-size", "32", "--seed", "5",
                        "--val-fraction", "0.25", "--quiet"])
    assert rc in (0, None)
    assert "12 samples" in capsys.readouterr().out
    from mmoe.data import Manifest

    manifest = Manifest.load(out / "manifest.json")
    assert manifest.info["generator"] == {**manifest.info["generator"], "num_images": 12, "img_size": 32,
                                          "seed": 5, "val_fraction": 0.25}
    assert len(list((out / "coco" / "images").glob("*.png"))) == 12


# ------------------------------------------------------------------------------------------------ shapes-cls
def test_classification_images_are_deterministic_and_cover_every_class():
    from vision.detection_data import shapes_cls_sample

    labels = []
    for i in range(60):
        image, label = shapes_cls_sample(i, seed=2, img_size=48)
        again, same = shapes_cls_sample(i, seed=2, img_size=48)
        assert image.shape == (48, 48, 3) and image.dtype == np.uint8
        assert np.array_equal(image, again) and label == same
        labels.append(label)
    assert set(labels) == {0, 1, 2, 3}
    assert not np.array_equal(shapes_cls_sample(0, seed=3, img_size=48)[0], shapes_cls_sample(0, seed=2, img_size=48)[0])
    with pytest.raises(ValueError, match="dominance"):
        shapes_cls_sample(0, dominance=0.5)


def test_shapes_cls_shards_read_as_an_image_classification_set(tmp_path):
    from mmoe.data import Manifest, ShardLoader, decode_image, decode_label
    from vision.detection_data import shapes_cls_sample, write_shapes_cls

    m = write_shapes_cls(tmp_path / "a", num_images=30, img_size=32, seed=1, progress=False)
    assert m.info["classes"] == ["square", "circle", "triangle", "cross"]
    assert sum(m.info["class_counts"].values()) == 30 and set(m.splits) == {"train", "val"}
    write_shapes_cls(tmp_path / "b", num_images=30, img_size=32, seed=1, progress=False)
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")  # byte-identical for the same arguments
    seen = {}
    for split in ("train", "val"):
        loader = ShardLoader(tmp_path / "a", split=split, batch_size=1, shuffle_buffer=0, epochs=1,
                             decode=lambda s: (s["__key__"], np.asarray(decode_image(s, mode="RGB")), decode_label(s)),
                             collate=lambda b: b[0])
        seen.update({k: (im, y) for k, im, y in loader})
    assert len(seen) == 30 and Manifest.load(tmp_path / "a").num_samples == 30
    image, label = shapes_cls_sample(7, seed=1, img_size=32)
    assert np.array_equal(seen["000007"][0], image) and seen["000007"][1] == label
