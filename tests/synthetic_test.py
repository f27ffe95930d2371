"""Tests for effdet_tf.data.synthetic (the generated demo dataset pair)."""

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from effdet_tf.data import synthetic

SPLITS = ("train", "val")


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    paths = synthetic.make_demo_datasets(root, seed=3, num_train=60, num_val=12,
                                         image_size=192)
    return root, paths


def _files(root):
    return {p.relative_to(root): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_returned_paths(demo_root):
    root, paths = demo_root
    assert list(paths) == ["appliance", "food"]
    for name, path in paths.items():
        assert path == root / name
        for split in SPLITS:
            assert (path / "annotations" / f"instances_{split}2017.json").is_file()
            assert any((path / f"{split}2017").glob("*.jpg"))


def test_deterministic_same_bytes(tmp_path):
    a = synthetic.make_demo_datasets(tmp_path / "a", seed=7, num_train=8, num_val=3)
    b = synthetic.make_demo_datasets(tmp_path / "b", seed=7, num_train=8, num_val=3)
    c = synthetic.make_demo_datasets(tmp_path / "c", seed=8, num_train=8, num_val=3)
    fa, fb, fc = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert fa == fb
    assert fa != fc
    assert set(a) == set(b) == set(c)


def test_valid_coco_and_label_spaces(demo_root):
    _, paths = demo_root
    num_classes = {}
    for name, path in paths.items():
        for split in SPLITS:
            coco = COCO(str(path / "annotations" / f"instances_{split}2017.json"))
            ids = sorted(coco.getCatIds())
            num_classes[name] = len(ids)
            # Not 0..C-1 / 1..C: the pipeline must map ids to indices.
            assert ids != list(range(len(ids)))
            assert ids != list(range(1, len(ids) + 1))
            image_ids = sorted(coco.getImgIds())
            assert image_ids != list(range(len(image_ids)))
            assert len(set(a["id"] for a in coco.dataset["annotations"])) == len(
                coco.dataset["annotations"])
            for ann in coco.dataset["annotations"]:
                assert ann["category_id"] in ids
                # pycocotools can rasterise every annotation (polygons / RLE).
                assert coco.annToMask(ann).sum() > 0
    assert num_classes == {"appliance": 5, "food": 10}
    food_ids = [c[0] for c in synthetic.FOOD_CLASSES]
    assert any(b - a > 1 for a, b in zip(food_ids, food_ids[1:])), "food ids need gaps"


def test_boxes_inside_images_sizes_vary(demo_root):
    _, paths = demo_root
    shapes = set()
    for path in paths.values():
        for split in SPLITS:
            coco = json.loads((path / "annotations" / f"instances_{split}2017.json").read_text())
            images = {im["id"]: im for im in coco["images"]}
            for im in coco["images"]:
                img = cv2.imread(str(path / f"{split}2017" / im["file_name"]))
                assert img.shape[:2] == (im["height"], im["width"])
                shapes.add(img.shape[:2])
            for ann in coco["annotations"]:
                x, y, w, h = ann["bbox"]
                im = images[ann["image_id"]]
                assert w > 0 and h > 0 and ann["area"] > 0
                assert x >= 0 and y >= 0
                assert x + w <= im["width"] and y + h <= im["height"]
                # Objects are not tiny (the demo trains at 128-256 px input).
                if not ann["iscrowd"]:
                    assert min(w, h) >= 0.12 * min(im["width"], im["height"])
    aspects = {round(w / h, 1) for h, w in shapes}
    assert len(aspects) >= 3


def test_crowd_and_empty_present(demo_root):
    _, paths = demo_root
    for name, split in ((n, s) for n in paths for s in SPLITS):
        coco = COCO(str(paths[name] / "annotations" / f"instances_{split}2017.json"))
        anns = coco.dataset["annotations"]
        crowd = [a for a in anns if a["iscrowd"]]
        assert crowd, name
        assert len(crowd) < 0.1 * len(anns)  # rare
        for a in crowd:
            assert a["area"] > 0 and len(a["bbox"]) == 4
        empty = [i for i in coco.getImgIds() if not coco.getAnnIds(imgIds=i)]
        assert empty, name


def _colour_match(pixels, rgb, texture):
    """Pixels (BGR float [..., 3]) showing the class colour or its darker
    texture shade (the textures scale the colour by 0.55-0.65)."""
    c = np.array(rgb[::-1], np.float32)
    t = (pixels @ c) / (c @ c)
    t = np.clip(t, 0.5 if texture != "plain" else 1.0, 1.0)
    return np.linalg.norm(pixels - t[..., None] * c, axis=-1) < 50


def test_pixels_under_boxes_show_class_colour(demo_root):
    _, paths = demo_root
    for name, path in paths.items():
        classes = {c[0]: c for c in synthetic.DATASETS[name]}
        coco = COCO(str(path / "annotations" / "instances_train2017.json"))
        for image_id, im in coco.imgs.items():
            img = cv2.imread(str(path / "train2017" / im["file_name"])).astype(np.float32)
            outside = np.ones(img.shape[:2], bool)
            for ann in coco.imgToAnns[image_id]:
                _, _, _, rgb, texture = classes[ann["category_id"]]
                x, y, w, h = (int(round(v)) for v in ann["bbox"])
                outside[max(0, y - 2):y + h + 2, max(0, x - 2):x + w + 2] = False
                if ann["iscrowd"]:
                    # A crowd box holds many small objects with gaps between.
                    frac = _colour_match(img[y:y + h, x:x + w], rgb, texture).mean()
                    assert frac > 0.2, (name, ann["id"], frac)
                else:
                    mask = coco.annToMask(ann).astype(bool)
                    frac = _colour_match(img[mask], rgb, texture).mean()
                    # A ring's polygon covers its hole (COCO polygons have no holes).
                    least = 0.65 if classes[ann["category_id"]][2] == "ring" else 0.85
                    assert frac > least, (name, ann["id"], frac)
            # Away from the boxes, no class colour shows (the clutter is grey).
            # (Full-strength colours: dark texture shades of pink or purple sit
            # within the tolerance of some greys.)
            for _, _, _, rgb, _ in classes.values():
                assert _colour_match(img[outside], rgb, "plain").mean() < 0.01


def test_cli(tmp_path):
    out = tmp_path / "cli"
    subprocess.run([sys.executable, "-m", "effdet_tf.data.synthetic",
                    f"--output_dir={out}", "--num_train=3", "--num_val=2"],
                   check=True, capture_output=True)
    for name in ("appliance", "food"):
        coco = json.loads((out / name / "annotations" / "instances_val2017.json").read_text())
        assert len(coco["images"]) == 2
