"""COCO evaluation on the real samples, in the datasets' own ids, and that
evaluation scores what the exported model serves."""

import json
from pathlib import Path

import numpy as np
import pytest

from effdet_tf import evaluation
from effdet_tf.config import Config, DataConfig, DatasetConfig, ModelConfig, PostprocessConfig, TrainConfig

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


# Three classes, one without ground truth, on two 100 px images.
PETS = {
    "images": [{"id": 1, "height": 100, "width": 100}, {"id": 2, "height": 100, "width": 100}],
    "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 9, "name": "bird"}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 30, 30], "area": 900, "iscrowd": 0},
        {"id": 2, "image_id": 2, "category_id": 7, "bbox": [50, 50, 20, 20], "area": 400, "iscrowd": 0},
    ],
}


def test_per_class_ap_and_ap50():
    evaluator = evaluation.CocoEvaluator(PETS, [3, 7, 9])
    # Image 1: the cat found exactly (cat AP 1). Image 2: a confident dog
    # where there is none, then the dog exactly: precision 1/2 at every
    # recall up to 1 (dog AP 0.5 at every IoU). A bird where there is none.
    yxyx = np.array([[[10, 10, 40, 40], [0, 0, 0, 0], [0, 0, 0, 0]],
                     [[0, 0, 20, 20], [50, 50, 70, 70], [75, 75, 95, 95]]], np.float32)
    scores = np.array([[0.9, 0, 0], [0.95, 0.5, 0.4]], np.float32)
    classes = np.array([[0, 0, 0], [1, 1, 2]])
    evaluator.add([1, 2], yxyx, scores, classes, [1, 3], [1.0, 1.0])
    metrics = evaluator.result()
    rows = {r["name"]: r for r in evaluator.per_class}
    assert [r["id"] for r in evaluator.per_class] == [3, 7, 9]
    assert rows["cat"]["AP"] == pytest.approx(1.0) and rows["cat"]["AP50"] == pytest.approx(1.0)
    assert rows["dog"]["AP"] == pytest.approx(0.5) and rows["dog"]["AP50"] == pytest.approx(0.5)
    assert rows["bird"]["AP"] is None and rows["bird"]["AP50"] is None
    assert [rows[n]["ground_truth"] for n in ("cat", "dog", "bird")] == [1, 1, 0]
    # COCO's summary AP is the mean over the classes that have ground truth.
    assert metrics["AP"] == pytest.approx(0.75)
    table = evaluation.per_class_table(evaluator.per_class).splitlines()
    assert table[0].split() == ["class", "id", "boxes", "AP", "AP50"]
    assert table[2].split() == ["dog", "7", "1", "0.5000", "0.5000"]
    assert table[3].split() == ["bird", "9", "0", "-", "-"]


def test_per_class_without_detections_is_zero_where_there_is_ground_truth():
    evaluator = evaluation.CocoEvaluator(PETS, [3, 7, 9])
    evaluator.add([1], np.zeros((1, 2, 4)), np.zeros((1, 2)), np.zeros((1, 2)), [0], [1.0])
    evaluator.result()
    # Only image 1 was evaluated: the dog's box is on image 2.
    assert [(r["name"], r["ground_truth"], r["AP"]) for r in evaluator.per_class] == [
        ("cat", 1, 0.0), ("dog", 0, None), ("bird", 0, None)]


def test_mean_ap():
    assert evaluation.mean_ap({"a": {"AP": 0.2}, "b": {"AP": 0.4}}) == pytest.approx(0.3)


# ------------------------------------------------- evaluation = serving
# A tiny detector (export_test's, calibrated so every image has candidates)
# evaluated by train.py's --mode=eval path on the real 640 px photos at a
# 128 px input, then exported at evaluation's score threshold: the
# SavedModel must return the detections evaluation scored, and their AP
# must be the AP evaluation reported. The non-default NMS method is used
# here (export_test's contract tests run the default one), and an export
# threshold that the calibrated head's scores straddle (export_test's).

REAL_POSTPROCESS = dict(nms_method="gaussian" if PostprocessConfig().nms_method == "hard" else "hard",
                        score_threshold=0.3)


def _real_config(root):
    from export_test import IMAGE_SIZE

    for folder in DATASETS.values():
        if not (DATA / folder / "annotations" / "instances_val2017.json").exists():
            pytest.skip(f"{DATA / folder} not found")
    datasets = tuple(DatasetConfig(name=name, path=str(DATA / folder)) for name, folder in DATASETS.items())
    return Config(
        model=ModelConfig(image_size=IMAGE_SIZE, width_multiplier=0.125, depth_multiplier=0.34,
                          fpn_channels=16, fpn_repeats=1, head_depth=1),
        data=DataConfig(datasets=datasets, data_cache_dir=str(root / "cache"), eval_batch_size=8),
        train=TrainConfig(model_dir=str(root / "model"), mode="eval", strategy="one_device", tensorboard_images=0),
        postprocess=PostprocessConfig(**REAL_POSTPROCESS),
    )


def _val_images(tf_dir):
    """The evaluated images: the converter's ground truth of the val split."""
    with open(Path(tf_dir) / "val_annotations.json") as f:
        return json.load(f)


def _served_results(signature, dataset_dir, gt):
    """COCO results (original-pixel xywh, the signature's COCO ids) of the
    `<name>_bytes` signature on the dataset's own val files."""
    import tensorflow as tf

    images = gt["images"]
    data = [(DATA / dataset_dir / "val2017" / im["file_name"]).read_bytes() for im in images]
    out = {k: v.numpy() for k, v in signature(image_bytes=tf.constant(data)).items()}
    results, counts = [], []
    for b, im in enumerate(images):
        n = int(out["num_detections"][b])
        counts.append(n)
        h, w = im["height"], im["width"]
        for box, score, cls in zip(out["detection_boxes"][b, :n], out["detection_scores"][b, :n],
                                   out["detection_classes"][b, :n]):
            ymin, xmin, ymax, xmax = (float(v) for v in box * np.array([h, w, h, w]))
            results.append({"image_id": im["id"], "category_id": int(cls),
                            "bbox": [xmin, ymin, xmax - xmin, ymax - ymin], "score": float(score)})
    return results, counts


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    import subprocess
    import sys

    import cv2
    import tensorflow as tf

    from effdet_tf import checkpoint, train_lib
    from effdet_tf.serving import export_lib
    from export_test import ENV, REPO, _build_detector, _spread_class_logits

    root = tmp_path_factory.mktemp("real")
    config = _real_config(root)
    resolved = train_lib.resolve_datasets(config)
    photos = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB)
              for folder in DATASETS.values() for p in sorted((DATA / folder / "val2017").glob("*.jpg"))[:6]]
    detector = _build_detector(resolved)
    _spread_class_logits(detector, photos)
    model_dir = config.train.model_dir
    checkpoint.write_config(model_dir, resolved)
    detector.save_weights(str(Path(model_dir) / checkpoint.LAST_WEIGHTS))
    result = train_lib.run(config)["eval"]  # what train.py --mode=eval runs

    post = resolved.postprocess
    serving = root / "serving"
    # export.py reads post-processing from config.json; one flag overrides.
    proc = subprocess.run(
        [sys.executable, str(Path(REPO) / "export.py"), f"--model_dir={model_dir}", f"--export_dir={serving}",
         f"--score_threshold={post.eval_score_threshold}"],
        env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    at_eval = str(serving / "1")
    at_export = export_lib.export_from_model_dir(model_dir, str(serving))  # config.json's score_threshold
    served = {}
    for which, path in (("eval", at_eval), ("export", at_export)):
        loaded = tf.saved_model.load(path)
        for name in DATASETS:
            tf_dir = resolved.data.dataset(name).tfrecord_dir
            signature = loaded.signatures[f"{name}_bytes"]
            served[which, name] = _served_results(signature, DATASETS[name], _val_images(tf_dir))
    return {"root": root, "config": resolved, "model_dir": model_dir, "eval": result, "served": served,
            "paths": {"eval": at_eval, "export": at_export}}


def _detections_json(real, name):
    path = Path(real["model_dir"]) / "eval" / f"{name}_detections.json"
    assert path.exists(), path
    with open(path) as f:
        return json.load(f)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DATASETS))
def test_mode_eval_writes_the_detections_it_scored(real, name):
    results = _detections_json(real, name)
    gt = _val_images(real["config"].data.dataset(name).tfrecord_dir)
    sizes = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    own_ids = {c["id"] for c in gt["categories"]}
    assert results and {r["image_id"] for r in results} <= set(sizes)
    assert {r["category_id"] for r in results} <= own_ids and min(own_ids) > 50  # COCO's ids, not indices
    post = real["config"].postprocess
    for r in results:
        assert set(r) == {"image_id", "category_id", "bbox", "score"}
        x, y, w, h = r["bbox"]
        height, width = sizes[r["image_id"]]
        assert 0 <= x and 0 <= y and w > 0 and h > 0
        assert x + w <= width + 1e-3 and y + h <= height + 1e-3
        assert post.eval_score_threshold < r["score"] <= 1.0
    # Original-image pixels: boxes reach past the 128 px model input.
    assert max(r["bbox"][0] + r["bbox"][2] for r in results) > 2 * real["config"].model.image_size
    per_image = np.bincount([list(sizes).index(r["image_id"]) for r in results])
    assert per_image.max() <= post.max_detections


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DATASETS))
def test_saved_model_at_eval_threshold_gives_evaluations_detections(real, name):
    """Boxes within 1 px, same classes, scores within 1e-3, image by image."""
    evaluated = _detections_json(real, name)
    served, _ = real["served"]["eval", name]
    # The evaluator drops boxes left without area by clipping to the image.
    served = [r for r in served if r["bbox"][2] > 0 and r["bbox"][3] > 0]
    assert len(served) == len(evaluated)
    by_image = {}
    for r in served:
        by_image.setdefault(r["image_id"], []).append(r)
    for r in evaluated:
        candidates = by_image.get(r["image_id"], [])
        match = [i for i, s in enumerate(candidates)
                 if s["category_id"] == r["category_id"] and abs(s["score"] - r["score"]) <= 1e-3
                 and np.abs(np.subtract(s["bbox"], r["bbox"])).max() <= 1.0]
        assert match, f"no served detection matches the evaluated {r}"
        candidates.pop(match[0])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DATASETS))
def test_ap_of_saved_model_detections_is_the_ap_mode_eval_reports(real, name):
    served, _ = real["served"]["eval", name]
    dataset = real["config"].data.dataset(name)
    gt = _val_images(dataset.tfrecord_dir)
    evaluator = evaluation.CocoEvaluator(gt, [c.id for c in dataset.classes])
    evaluator.add_coco_results(served, image_ids=[im["id"] for im in gt["images"]])
    metrics = evaluator.result()
    reported = real["eval"]["metrics"][name]
    assert reported["AP50"] > 0  # premise: some boxes hit, so equality means something
    for key in evaluation.METRIC_NAMES:
        assert metrics[key] == pytest.approx(reported[key], abs=1e-4), key


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DATASETS))
def test_mode_eval_report_has_per_class_ap_whose_mean_is_the_summary_ap(real, name):
    with open(Path(real["model_dir"]) / "eval" / "report.json") as f:
        report = json.load(f)
    assert report["per_class"] == real["eval"]["per_class"]
    rows = report["per_class"][name]
    assert [r["id"] for r in rows] == [c.id for c in real["config"].data.dataset(name).classes]
    scored = [r["AP"] for r in rows if r["AP"] is not None]
    assert scored and max(scored) > 0  # premise: some class has boxes that hit
    # COCO's AP is the mean over the classes with ground truth.
    assert np.mean(scored) == pytest.approx(report["metrics"][name]["AP"], abs=1e-6)
    assert all(r["AP50"] >= r["AP"] for r in rows if r["AP"] is not None)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DATASETS))
def test_mode_eval_says_how_many_detections_the_export_keeps(real, name):
    """Counted over the scored detections: boxes that clipping to the image
    leaves without area (an untrained head puts some in the padding) are
    returned by the SavedModel but not scored."""
    served, counts = real["served"]["export", name]
    with_area = [r for r in served if r["bbox"][2] > 0 and r["bbox"][3] > 0]
    share = real["eval"]["served"][name]
    assert 0 < share["served_detections"] < share["detections"]  # premise: the threshold matters
    assert share["served_detections"] == len(with_area)
    assert share["images_with_served_detections"] == len({r["image_id"] for r in with_area})
    assert share["detections"] == len(_detections_json(real, name))
    assert share["images"] == len(counts)


@pytest.mark.slow
def test_export_reads_postprocess_from_config_json_and_flags_override(real):
    post = real["config"].postprocess
    for which, threshold in (("eval", post.eval_score_threshold), ("export", post.score_threshold)):
        with open(Path(real["paths"][which]) / "assets" / "label_map.json") as f:
            doc = json.load(f)
        assert doc["score_threshold"] == pytest.approx(threshold)
        assert (doc["nms_method"], doc["max_detections"], doc["pre_nms_topk"]) == (
            REAL_POSTPROCESS["nms_method"], post.max_detections, post.pre_nms_topk)


@pytest.mark.slow
def test_saved_model_cli_runs_the_nms_method_of_this_export(real):
    """The session loader (TF Serving's) runs this NMS method's graph and
    returns what tf.saved_model.load returned."""
    import subprocess

    from export_test import ENV, SAVED_MODEL_CLI

    name = next(iter(DATASETS))
    gt = _val_images(real["config"].data.dataset(name).tfrecord_dir)
    data = np.array([(DATA / DATASETS[name] / "val2017" / im["file_name"]).read_bytes() for im in gt["images"][:3]],
                    dtype=object)
    inputs, outdir = real["root"] / "cli_bytes.npy", real["root"] / "cli_out"
    np.save(inputs, data)
    proc = subprocess.run(
        [SAVED_MODEL_CLI, "run", "--dir", real["paths"]["eval"], "--tag_set", "serve", "--signature_def",
         f"{name}_bytes", "--inputs", f"image_bytes={inputs}", "--outdir", str(outdir)],
        env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    served, counts = real["served"]["eval", name]
    num = np.load(outdir / "num_detections.npy")
    np.testing.assert_array_equal(num, counts[:3])
    scores = np.load(outdir / "detection_scores.npy")
    want = [r["score"] for r in served if r["image_id"] == gt["images"][0]["id"]]
    np.testing.assert_allclose(scores[0, : num[0]], want, atol=1e-5)
