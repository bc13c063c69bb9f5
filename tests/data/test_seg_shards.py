"""Semantic-segmentation shard writers: image + label-map folders (segfolder) and COCO masks (coco-semantic)."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mmoe.cli import main as mmoe_main
from mmoe.data import (DataError, DataWarning, Manifest, ShardLoader, decode_image, write_coco_semantic,
                       write_segfolder)

mask_util = pytest.importorskip("pycocotools.mask")

# pycocotools' decode warns under numpy 2 (its own code, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _first(batch):
    return batch[0]


def _samples(directory: Path, split: str | None = None) -> dict[str, dict]:
    loader = ShardLoader(directory, split=split, batch_size=1, collate=_first, shuffle_buffer=0, epochs=1)
    return {s["__key__"]: s for s in loader}


def _label(sample: dict) -> np.ndarray:
    with Image.open(io.BytesIO(sample["seg.png"])) as im:
        assert im.format == "PNG" and im.mode in ("L", "P")
        return np.asarray(im)


def _png(array: np.ndarray, path: Path, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)


# ------------------------------------------------------------------------------------------ COCO masks
H, W = 30, 40


def _hand_coco(tmp: Path) -> tuple[Path, Path, np.ndarray]:
    """Two images (one drawn with PIL, one blank) and four hand-written annotations; returns the json, the
    image folder and the label map of image 1 worked out by hand."""
    images = tmp / "images"
    images.mkdir()
    img = Image.new("RGB", (W, H), (90, 120, 60))
    draw = ImageDraw.Draw(img)
    draw.rectangle([2, 3, 11, 8], fill=(220, 30, 30))  # the polygon's object
    draw.rectangle([30, 0, 34, H - 1], fill=(30, 30, 220))  # the stripe
    img.save(images / "scene.png")
    Image.new("RGB", (W, H), (0, 0, 0)).save(images / "empty.jpg", quality=95)
    top = np.zeros((H, W), dtype=np.uint8)
    top[0:5, 28:40] = 1
    top_rle = mask_util.encode(np.asfortranarray(top))
    anns = [
        # a polygon (pycocotools fills x in [2, 12), y in [3, 9)), category "box"
        {"id": 1, "image_id": 1, "category_id": 7, "iscrowd": 0, "segmentation": [[2, 3, 12, 3, 12, 9, 2, 9]]},
        # uncompressed RLE, column-major runs: 30 columns of background, 5 of mask, 5 of background: "disc"
        {"id": 2, "image_id": 1, "category_id": 3, "iscrowd": 0,
         "segmentation": {"size": [H, W], "counts": [30 * H, 5 * H, 5 * H]}},
        # compressed RLE over the top right corner, painted over the stripe (file order): "box"
        {"id": 3, "image_id": 1, "category_id": 7, "iscrowd": 0,
         "segmentation": {"size": [H, W], "counts": top_rle["counts"].decode("ascii")}},
        # a crowd region, columns 15..19: ignore (255) by default
        {"id": 4, "image_id": 1, "category_id": 3, "iscrowd": 1,
         "segmentation": {"size": [H, W], "counts": [15 * H, 5 * H, 20 * H]}},
    ]
    coco = {"images": [{"id": 1, "file_name": "scene.png", "width": W, "height": H},
                       {"id": 2, "file_name": "empty.jpg", "width": W, "height": H}],
            "annotations": anns,
            # ids deliberately not in list order: the class index follows the list
            "categories": [{"id": 7, "name": "box"}, {"id": 3, "name": "disc"}]}
    f = tmp / "instances.json"
    f.write_text(json.dumps(coco))
    want = np.zeros((H, W), dtype=np.uint8)
    want[3:9, 2:12] = 1  # box
    want[:, 30:35] = 2  # disc
    want[0:5, 28:40] = 1  # box, over the disc
    want[:, 15:20] = 255  # crowd
    return f, images, want


def test_coco_semantic_paints_polygons_rle_and_crowd(tmp_path: Path):
    ann, images, want = _hand_coco(tmp_path)
    manifest = write_coco_semantic(ann, images, tmp_path / "out")
    assert manifest.info["classes"] == ["background", "box", "disc"] and manifest.info["num_classes"] == 3
    assert manifest.info["num_images"] == 2 and manifest.info["num_annotations"] == 4
    assert manifest.info["crowd_annotations"] == 1 and manifest.info["ignore_crowd"] is True
    samples = _samples(tmp_path / "out")
    assert sorted(samples) == ["empty", "scene"]
    scene = samples["scene"]
    assert scene["png"] == (images / "scene.png").read_bytes()  # image bytes as they are
    assert json.loads(scene["json"]) == {"image": "scene.png", "id": 1}
    got = _label(scene)
    assert got.dtype == np.uint8 and got.shape == (H, W)
    np.testing.assert_array_equal(got, want)
    assert decode_image(scene).size == (W, H)
    np.testing.assert_array_equal(_label(samples["empty"]), np.zeros((H, W), np.uint8))
    assert "jpg" in samples["empty"]
    # crowd kept as its class
    write_coco_semantic(ann, images, tmp_path / "keep", ignore_crowd=False)
    keep = want.copy()
    keep[:, 15:20] = 2
    np.testing.assert_array_equal(_label(_samples(tmp_path / "keep")["scene"]), keep)
    # reproducible
    write_coco_semantic(ann, images, tmp_path / "again")
    assert sorted(p.read_bytes() for p in (tmp_path / "out").glob("*.tar")) == \
        sorted(p.read_bytes() for p in (tmp_path / "again").glob("*.tar"))


def test_coco_semantic_bad_annotations_fail_or_skip(tmp_path: Path):
    ann, images, _ = _hand_coco(tmp_path)
    coco = json.loads(ann.read_text())
    coco["annotations"].append({"id": 9, "image_id": 2, "category_id": 42, "iscrowd": 0,
                                "segmentation": [[0, 0, 5, 0, 5, 5]]})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(coco))
    with pytest.raises(DataError, match=r"empty\.jpg: annotation id 9 .*category_id 42"):
        write_coco_semantic(bad, images, tmp_path / "fail")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manifest = write_coco_semantic(bad, images, tmp_path / "skip", on_error="skip")
    assert any(issubclass(w.category, DataWarning) for w in caught)
    assert manifest.num_samples == 1 and manifest.skipped["count"] == 1
    # an RLE of another size, and an image whose size differs from the json
    coco = json.loads(ann.read_text())
    coco["annotations"][1]["segmentation"]["size"] = [H + 1, W]
    bad.write_text(json.dumps(coco))
    with pytest.raises(DataError, match="annotation id 2 .*RLE of size"):
        write_coco_semantic(bad, images, tmp_path / "fail2")
    coco = json.loads(ann.read_text())
    coco["images"][0]["width"] = W + 2
    bad.write_text(json.dumps(coco))
    with pytest.raises(DataError, match=f"scene.png: image is {W}x{H}"):
        write_coco_semantic(bad, images, tmp_path / "fail3")


# ------------------------------------------------------------------------------------------ folders


def test_segfolder_pairs_by_relative_stem_and_checks(tmp_path: Path):
    imgs, labs = tmp_path / "img", tmp_path / "lab"
    rng = np.random.default_rng(0)
    lab_a = rng.integers(0, 3, (12, 16), dtype=np.uint8)
    _png(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8), imgs / "city" / "a.x.png")  # a dot in the stem
    _png(lab_a, labs / "city" / "a.x.png")
    # a palette (mode P) label map: the palette index is the class
    lab_b = np.array([[0, 1], [2, 255]], np.uint8).repeat(5, 0).repeat(5, 1)
    pal = Image.frombytes("P", (10, 10), lab_b.tobytes())
    pal.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [255, 255, 255] * 253)
    (imgs / "b.jpg").parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(imgs / "b.jpg")
    pal.save(labs / "b.png")
    manifest = write_segfolder(imgs, labs, tmp_path / "out", classes=["bg", "road", "car"])
    assert manifest.info == {"num_images": 2, "label_values": [0, 1, 2, 255], "classes": ["bg", "road", "car"],
                             "num_classes": 3}
    samples = _samples(tmp_path / "out")
    assert sorted(samples) == ["b", "city/a_x"]
    np.testing.assert_array_equal(_label(samples["city/a_x"]), lab_a)
    assert samples["b"]["seg.png"] == (labs / "b.png").read_bytes()  # kept as it is (mode P)
    np.testing.assert_array_equal(_label(samples["b"]), lab_b)
    assert json.loads(samples["city/a_x"]["json"]) == {"image": "city/a.x.png"}
    assert "jpg" in samples["b"] and "png" in samples["city/a_x"]
    # another suffix; a BMP label map is stored as a PNG of the same values
    labs2 = tmp_path / "lab2"
    _png(lab_a, labs2 / "city" / "a.x_gt.bmp")
    _png(lab_b, labs2 / "b_gt.bmp")
    write_segfolder(imgs, labs2, tmp_path / "out2", label_suffix="_gt.bmp")
    np.testing.assert_array_equal(_label(_samples(tmp_path / "out2")["city/a_x"]), lab_a)
    assert "classes" not in Manifest.load(tmp_path / "out2").info
    # a missing label map, one of another size, an RGB one: errors naming the files, or skipped
    _png(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), imgs / "c.png")
    with pytest.raises(DataError, match=r"c\.png: no label map .*lab/c\.png"):
        write_segfolder(imgs, labs, tmp_path / "bad")
    _png(np.zeros((8, 9), np.uint8), labs / "c.png")
    with pytest.raises(DataError, match=r"lab/c\.png: label map is 9x8, its image .*8x8"):
        write_segfolder(imgs, labs, tmp_path / "bad")
    _png(np.zeros((8, 8, 3), np.uint8), labs / "c.png")
    with pytest.raises(DataError, match=r"lab/c\.png: not a usable label map .*mode RGB"):
        write_segfolder(imgs, labs, tmp_path / "bad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        manifest = write_segfolder(imgs, labs, tmp_path / "skip", on_error="skip")
    assert manifest.num_samples == 2 and manifest.skipped["count"] == 1
    with pytest.raises(DataError, match="not found"):
        write_segfolder(imgs, tmp_path / "nowhere", tmp_path / "bad2")


# ------------------------------------------------------------------------------------------ the shapes set


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from vision.detection_data import write_shapes_det

    out = tmp_path_factory.mktemp("shapes") / "det"
    write_shapes_det(out, num_images=20, img_size=64, samples_per_shard=8)
    return out


def _split_keys(directory: Path) -> dict[str, set[str]]:
    m = Manifest.load(directory)
    return {name: set(_samples(directory, name)) for name in m.splits}


def test_shapes_through_segfolder_and_coco_semantic_give_its_label_maps(shapes: Path, tmp_path: Path, capsys):
    coco = shapes / "coco"
    names = "background,square,circle,triangle,cross"
    assert mmoe_main(["shards", "segfolder", str(coco / "images"), str(coco / "semantic"), str(tmp_path / "seg"),
                      "--val-fraction", "0.2", "--classes", names, "--samples-per-shard", "8", "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("wrote ")
    (tmp_path / "classes.txt").write_text(names.replace(",", "\n") + "\n")
    assert mmoe_main(["shards", "coco-semantic", str(coco / "annotations" / "instances_all.json"),
                      str(coco / "images"), str(tmp_path / "cs"), "--val-fraction", "0.2", "--quiet"]) == 0
    assert mmoe_main(["shards", "segfolder", str(coco / "images"), str(coco / "semantic"), str(tmp_path / "seg2"),
                      "--classes", str(tmp_path / "classes.txt"), "--quiet"]) == 0
    seg, cs = Manifest.load(tmp_path / "seg"), Manifest.load(tmp_path / "cs")
    assert seg.info["classes"] == cs.info["classes"] == names.split(",")
    assert Manifest.load(tmp_path / "seg2").info["classes"] == names.split(",")
    assert seg.info["num_images"] == 20 and set(seg.info["label_values"]) <= {0, 1, 2, 3, 4}
    # the same train / val split as shapes-det's own shards (the same key-hash rule on the same keys)
    want = _split_keys(shapes)
    assert _split_keys(tmp_path / "seg") == _split_keys(tmp_path / "cs") == want
    assert want["val"] and want["train"]
    by_seg = {k: v for name in ("train", "val") for k, v in _samples(tmp_path / "seg", name).items()}
    by_cs = {k: v for name in ("train", "val") for k, v in _samples(tmp_path / "cs", name).items()}
    assert sorted(by_seg) == sorted(by_cs) == [f"{i:06d}" for i in range(20)]
    painted = 0
    for key in by_seg:
        with Image.open(coco / "semantic" / f"{key}.png") as im:
            truth = np.asarray(im)
        np.testing.assert_array_equal(_label(by_seg[key]), truth)
        # visible masks do not overlap, so painting them gives the same map
        np.testing.assert_array_equal(_label(by_cs[key]), truth)
        assert by_seg[key]["png"] == by_cs[key]["png"] == (coco / "images" / f"{key}.png").read_bytes()
        painted += int((truth > 0).any())
    assert painted >= 15  # image 19 is empty by the generator's rule
    # a bad --classes is a one-line usage error
    with pytest.raises(SystemExit):
        mmoe_main(["shards", "segfolder", str(coco / "images"), str(coco / "semantic"), str(tmp_path / "x"),
                   "--classes", "a,,b"])
