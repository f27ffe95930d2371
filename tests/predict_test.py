"""predict CLI: SavedModel -> drawn images + COCO results JSON."""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from effdet_tf.serving import export_lib, predict
from export_test import ENV, SCORE_THRESHOLD, _build_detector, _image, _make_config, _spread_class_logits

FOOD_IDS = [78, 80, 81, 90]  # export_test.HEADS["food"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    images = {"42.jpg": _image(96, 160, 1), "cat.png": _image(200, 150, 3), "7.jpeg": _image(64, 64, 5)}
    config = _make_config()
    detector = _build_detector(config)
    _spread_class_logits(detector, list(images.values()))
    label_maps = config.label_maps()
    saved_model = export_lib.export_detector(
        detector, {"food": label_maps["food"]}, str(root / "serving"), score_threshold=SCORE_THRESHOLD,
        max_detections=20,
    )
    image_dir = root / "imgs"
    image_dir.mkdir()
    for name, image in images.items():
        cv2.imwrite(str(image_dir / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    (image_dir / "notes.txt").write_text("not an image")
    (image_dir / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)  # JPEG magic, no image
    return {"root": root, "saved_model": saved_model, "image_dir": image_dir, "images": images}


@pytest.mark.slow
def test_cli_writes_drawn_images_and_coco_results(setup):
    out = setup["root"] / "preds"
    proc = subprocess.run(
        [sys.executable, "-m", "effdet_tf.serving.predict", f"--saved_model={setup['saved_model']}", "--dataset=food",
         f"--images={setup['image_dir'] / '*'}", f"--output_dir={out}"],
        cwd=str(setup["root"]), env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "notes.txt: not a JPEG or PNG image" in log
    assert "broken.jpg: cannot be decoded" in log
    assert "3 image(s) written" in log and "2 file(s) skipped" in log

    # Drawn images: same size as the input, with something drawn on them.
    assert sorted(os.listdir(out)) == sorted(["42.jpg", "7.jpeg", "cat.png", predict.RESULTS_FILE])
    for name, image in setup["images"].items():
        drawn = cv2.cvtColor(cv2.imread(str(out / name)), cv2.COLOR_BGR2RGB)
        assert drawn.shape == image.shape
        if name.endswith(".png"):  # lossless: compare exactly
            assert np.any(drawn != image)

    # COCO results: ids from numeric stems, else the sorted position.
    with open(out / predict.RESULTS_FILE) as f:
        results = json.load(f)
    assert results, "the test model must produce detections"
    files = sorted(os.listdir(setup["image_dir"]))
    ids = {"42.jpg": 42, "7.jpeg": 7, "cat.png": files.index("cat.png")}
    assert {r["image_id"] for r in results} <= set(ids.values())
    for r in results:
        assert set(r) == {"image_id", "category_id", "bbox", "score"}
        assert r["category_id"] in FOOD_IDS
        assert r["score"] >= SCORE_THRESHOLD
        x, y, w, h = r["bbox"]
        height, width = next(setup["images"][n].shape[:2] for n, i in ids.items() if i == r["image_id"])
        assert 0 <= x and 0 <= y and w >= 0 and h >= 0
        assert x + w <= width + 0.01 and y + h <= height + 0.01

    # pycocotools reads it against a ground truth with these images/categories.
    gt = COCO()
    gt.dataset = {
        "images": [{"id": i, "height": setup["images"][n].shape[0], "width": setup["images"][n].shape[1]}
                   for n, i in ids.items()],
        "categories": [{"id": c, "name": str(c)} for c in FOOD_IDS],
        "annotations": [],
    }
    gt.createIndex()
    dt = gt.loadRes(str(out / predict.RESULTS_FILE))
    assert len(dt.getAnnIds()) == len(results)


def test_all_signature_and_min_score(setup, tmp_path):
    logs = []
    report = predict.predict(setup["saved_model"], "all", str(setup["image_dir"] / "*.jp*g"), str(tmp_path),
                             min_score=0.5, log=logs.append)
    assert report["images"] == 2 and len(report["skipped"]) == 1  # broken.jpg
    with open(report["results"]) as f:
        results = json.load(f)
    assert all(r["dataset"] == "food" and r["score"] >= 0.5 for r in results)
    assert report["detections"] == len(results)


def test_unknown_dataset_and_no_files(setup, tmp_path):
    with pytest.raises(predict.PredictError, match=r"Unknown dataset 'pizza'.*\['food'\]"):
        predict.predict(setup["saved_model"], "pizza", str(setup["image_dir"] / "*"), str(tmp_path))
    with pytest.raises(predict.PredictError, match="No files match"):
        predict.predict(setup["saved_model"], "food", str(tmp_path / "*.jpg"), str(tmp_path / "out"))
    with pytest.raises(predict.PredictError, match="label_map.json not found"):
        predict.predict(str(tmp_path), "food", str(setup["image_dir"] / "*"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
