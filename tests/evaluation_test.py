"""COCO evaluation on the real samples, in the datasets' own ids."""

import json
from pathlib import Path

import numpy as np
import pytest

from effdet_tf import evaluation

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DATASETS = {"appliance": "appliance-dataset-5-tat-10", "food": "food-dataset-10-tat-10"}


def _gt(name):
    path = DATA / DATASETS[name] / "annotations" / "instances_val2017.json"
    if not path.exists():
        pytest.skip(f"{path} not found")
    with open(path) as f:
        return path, json.load(f)


def _perfect_batch(gt, category_ids, image_size=512, jitter=0.0):
    """The ground truth as model-pixel detections, as the detector emits them."""
    index_of = {c: i for i, c in enumerate(category_ids)}
    images = gt["images"]
    k = max(1, max(sum(1 for a in gt["annotations"] if a["image_id"] == im["id"]) for im in images))
    boxes = np.zeros((len(images), k, 4), np.float32)
    scores = np.zeros((len(images), k), np.float32)
    classes = np.zeros((len(images), k), np.int32)
    num = np.zeros((len(images),), np.int32)
    scales = np.zeros((len(images),), np.float32)
    for b, im in enumerate(images):
        scale = image_size / max(im["height"], im["width"])
        scales[b] = scale
        for ann in gt["annotations"]:
            if ann["image_id"] != im["id"] or ann["iscrowd"]:
                continue
            x, y, w, h = ann["bbox"]
            boxes[b, num[b]] = np.array([y, x, y + h, x + w]) * scale + jitter
            scores[b, num[b]] = 0.9
            classes[b, num[b]] = index_of[ann["category_id"]]
            num[b] += 1
    ids = np.array([im["id"] for im in images], np.int64)
    sizes = np.array([[im["height"], im["width"]] for im in images], np.int32)
    return ids, boxes, scores, classes, num, scales, sizes


@pytest.mark.parametrize("name", ["appliance", "food"])
def test_perfect_detections_give_ap_one_with_own_category_ids(name):
    path, gt = _gt(name)
    category_ids = sorted(c["id"] for c in gt["categories"])
    evaluator = evaluation.CocoEvaluator(str(path), category_ids)
    ids, boxes, scores, classes, num, scales, sizes = _perfect_batch(gt, category_ids)
    evaluator.add(ids, boxes, scores, classes, num, scales, sizes)
    # The results carry the dataset's own (non-contiguous) COCO ids ...
    used = {r["category_id"] for r in evaluator.results}
    assert used <= set(category_ids)
    assert used == {a["category_id"] for a in gt["annotations"] if not a["iscrowd"]}
    assert min(used) > 50  # e.g. 52..61, 78..82: never contiguous indices
    # ... on the original image ids, in original pixels (within rounding).
    by_image = {}
    for r in evaluator.results:
        by_image.setdefault(r["image_id"], []).append(r["bbox"])
    first = next(a for a in gt["annotations"] if not a["iscrowd"])
    assert any(np.allclose(b, first["bbox"], atol=0.01) for b in by_image[first["image_id"]])
    metrics = evaluator.result()
    assert metrics["AP"] == pytest.approx(1.0)
    assert metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AP75"] == pytest.approx(1.0)
    assert set(metrics) == set(evaluation.METRIC_NAMES)


def test_wrong_category_or_shifted_boxes_score_lower():
    path, gt = _gt("food")
    category_ids = sorted(c["id"] for c in gt["categories"])
    ids, boxes, scores, classes, num, scales, sizes = _perfect_batch(gt, category_ids, jitter=8.0)
    evaluator = evaluation.CocoEvaluator(str(path), category_ids)
    evaluator.add(ids, boxes, scores, classes, num, scales, sizes)
    shifted = evaluator.result()
    assert 0.0 < shifted["AP"] < 1.0
    # A label map in the wrong order puts every box in the wrong category.
    evaluator = evaluation.CocoEvaluator(str(path), category_ids[::-1])
    ids, boxes, scores, classes, num, scales, sizes = _perfect_batch(gt, category_ids)
    evaluator.add(ids, boxes, scores, classes, num, scales, sizes)
    assert evaluator.result()["AP"] < 0.5


def test_no_detections_and_unknown_ids():
    path, gt = _gt("appliance")
    category_ids = sorted(c["id"] for c in gt["categories"])
    evaluator = evaluation.CocoEvaluator(str(path), category_ids)
    image = gt["images"][0]
    evaluator.add([image["id"]], np.zeros((1, 3, 4)), np.zeros((1, 3)), np.zeros((1, 3)), [0], [1.0])
    assert evaluator.result()["AP"] == 0.0
    with pytest.raises(ValueError, match="not in the ground truth"):
        evaluator.add([123456789], np.zeros((1, 3, 4)), np.zeros((1, 3)), np.zeros((1, 3)), [0], [1.0])
    with pytest.raises(ValueError, match="category ids"):
        evaluation.CocoEvaluator(str(path), [1, 2, 3])


def test_mean_ap():
    assert evaluation.mean_ap({"a": {"AP": 0.2}, "b": {"AP": 0.4}}) == pytest.approx(0.3)
