"""SavedModel export: the serving contract, checked the way clients load it.

One tiny model is exported once per module (via a training-style model dir,
as export.py does it). Its signatures are then called
  * in a fresh `python -I` process that can import TensorFlow but not
    effdet_tf / keras-cv (tf.saved_model.load), and
  * through `saved_model_cli run`, which loads the graph with the C++
    session loader exactly as TF Serving does,
and compared with the Keras model's own path (letterbox in numpy/OpenCV,
model call, ops.postprocess, mapping back in Python).
"""

import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import tensorflow as tf

from effdet_tf import checkpoint
from effdet_tf.serving import export_lib
from effdet_tf.modeling import factory
from effdet_tf.config import ClassEntry, Config, DataConfig, DatasetConfig, ModelConfig, PostprocessConfig
from effdet_tf.ops.postprocess import postprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAVED_MODEL_CLI = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
IMAGE_SIZE = 128
SCORE_THRESHOLD = 0.3
MAX_DETECTIONS = 20
HEADS = {"appliance": [52, 55, 61], "food": [78, 80, 81, 90]}
SIGNATURES = ["appliance", "appliance_bytes", "appliance_tf_example", "food", "food_bytes", "food_tf_example",
              "all", "all_bytes", "all_tf_example", "serving_default"]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="-1")

# Runs in a fresh `python -I` process: TensorFlow only. effdet_tf and
# keras-cv are made unimportable, and the test checks none got loaded.
LOADER = r"""
import importlib.abc, json, sys
BLOCKED = ("effdet_tf", "keras_cv", "keras_hub")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} must not be needed to serve")
sys.meta_path.insert(0, Block())
import numpy as np
import tensorflow as tf
saved_model, inputs, out = sys.argv[1:4]
model = tf.saved_model.load(saved_model)
data = np.load(inputs, allow_pickle=True)
results = {}
examples = [tf.train.Example(features=tf.train.Features(feature={"image/encoded": tf.train.Feature(
    bytes_list=tf.train.BytesList(value=[b]))})).SerializeToString() for b in data["bytes"]]
for name, fn in model.signatures.items():
    if name.endswith("_bytes"):
        feeds = {"bytes": {"image_bytes": tf.constant(list(data["bytes"]))}}
    elif name.endswith("_tf_example"):
        feeds = {"bytes": {"serialized_examples": tf.constant(examples)}}
    else:
        feeds = {k: {"images": tf.constant(data[k])} for k in ("small", "large")}
    for feed, kwargs in feeds.items():
        for key, value in fn(**kwargs).items():
            value = value.numpy()
            if value.dtype == object:  # strings: saved as unicode, loadable without pickle
                value = np.char.decode(value.astype("S"), "utf-8")
            results[f"{name}/{feed}/{key}"] = value
np.savez(out, **results)
print(json.dumps({
    "signatures": sorted(model.signatures),
    "blocked_loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED),
    "asset": model.label_map.asset_path.numpy().decode(),
}))
"""


def _image(height, width, seed):
    """Smooth colourful image with a few rectangles (compresses like a photo)."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 255, (max(2, height // 16), max(2, width // 16), 3)).astype(np.float32)
    image = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    for _ in range(3):
        y, x = rng.integers(0, height // 2), rng.integers(0, width // 2)
        h, w = rng.integers(height // 6, height // 2), rng.integers(width // 6, width // 2)
        image[y : y + h, x : x + w] = rng.uniform(0, 255, 3)
    return np.clip(image, 0, 255).astype(np.uint8)


def _build_detector(config):
    """Same initial weights on every run (the calibration depends on them)."""
    import keras

    keras.utils.set_random_seed(0)
    return factory.build_detector(config)


def _make_config():
    datasets = tuple(
        DatasetConfig(
            name=name,
            path=f"/nonexistent/{name}",
            classes=tuple(ClassEntry(index=i, id=cid, name=f"{name}_{cid}") for i, cid in enumerate(ids)),
        )
        for name, ids in HEADS.items()
    )
    model = ModelConfig(
        image_size=IMAGE_SIZE, width_multiplier=0.125, depth_multiplier=0.34,
        fpn_channels=16, fpn_repeats=1, head_depth=1,
    )
    return Config(model=model, data=DataConfig(datasets=datasets))


def _spread_class_logits(detector, images, candidates=12, seed=0):
    """An untrained detector scores everything at the 0.01 prior, and its
    features all but vanish through the narrow untrained backbone. Calibrate
    every BatchNorm on `images` (moving statistics := batch statistics) so
    features are O(1) and image-dependent, give the class predictions a wide
    spread, and shift their bias so that at least `candidates` (anchor,
    class) pairs of every image clear SCORE_THRESHOLD (exactly that many for
    the weakest image): NMS then leaves that image with fewer than
    MAX_DETECTIONS (padding is exercised), no image is left empty, and scores
    are distinct (no near-ties to make comparisons fragile)."""
    import keras

    rng = np.random.default_rng(seed)
    batch = np.stack([_letterbox_numpy(image)[0] for image in images])
    norms = [l for l in detector._flatten_layers() if isinstance(l, keras.layers.BatchNormalization)]
    momenta = [l.momentum for l in norms]
    for layer in norms:
        layer.momentum = 0.0
    detector(batch, training=True)
    for layer, momentum in zip(norms, momenta):
        layer.momentum = momentum
    for name in detector.head_names:
        layer = detector.class_nets[name].predict
        depthwise = layer.depthwise_kernel
        depthwise.assign(rng.normal(0, 1.0 / 3.0, depthwise.shape).astype(np.float32))
        pointwise = layer.pointwise_kernel
        pointwise.assign(rng.normal(0, 2.0 / np.sqrt(pointwise.shape[-2]), pointwise.shape).astype(np.float32))
        layer.bias.assign(np.zeros(layer.bias.shape, np.float32))
    outputs = detector(batch, training=False)
    threshold_logit = np.log(SCORE_THRESHOLD / (1 - SCORE_THRESHOLD))
    for name in detector.head_names:
        logits = outputs[name]["cls_logits"].numpy().reshape(len(batch), -1)
        ranked = np.sort(logits, axis=1)
        weakest = np.argmin(ranked[:, -candidates])
        # Threshold midway between that image's candidate k and k+1, never
        # right at a logit: which side a score falls on must not depend on
        # float rounding.
        cut = 0.5 * (ranked[weakest, -candidates] + ranked[weakest, -candidates - 1])
        layer = detector.class_nets[name].predict
        layer.bias.assign(np.full(layer.bias.shape, threshold_logit - cut, np.float32))


def _letterbox_numpy(image):
    """The model input (preprocess.letterbox's contract: longer side = S,
    top-left, zero pad), written independently of the exporter."""
    height, width = image.shape[:2]
    scale = IMAGE_SIZE / max(height, width)
    new_h = min(IMAGE_SIZE, max(1, int(round(height * scale))))
    new_w = min(IMAGE_SIZE, max(1, int(round(width * scale))))
    resized = cv2.resize(image.astype(np.float32), (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    canvas = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    canvas[:new_h, :new_w] = resized
    return canvas, scale


def reference_detections(detector, images, heads):
    """The Keras model's own predict path, per image, numpy outputs.

    Returns {head: [per image dict(boxes normalised [n,4], scores, classes)]}.
    """
    padded, scales = zip(*[_letterbox_numpy(im) for im in images])
    outputs = detector(np.stack(padded), training=False)
    result = {}
    for name in heads:
        det = postprocess(
            outputs[name]["cls_logits"], outputs[name]["box_deltas"], detector.anchors.boxes,
            **PostprocessConfig(score_threshold=SCORE_THRESHOLD, max_detections=MAX_DETECTIONS).serving_kwargs(),
        )
        per_image = []
        for i, image in enumerate(images):
            n = int(det["num_detections"][i])
            h, w = image.shape[:2]
            boxes = det["boxes"][i, :n].numpy() / scales[i] / np.array([h, w, h, w], np.float32)
            per_image.append({
                "boxes": np.clip(boxes, 0.0, 1.0),
                "scores": det["scores"][i, :n].numpy(),
                "classes": np.array(HEADS[name])[det["classes"][i, :n].numpy()],
            })
        result[name] = per_image
    return result


def merged_reference(reference, index):
    """What `all` should return for image `index`: every head, by score."""
    rows = []
    for h, name in enumerate(HEADS):
        d = reference[name][index]
        rows += [(d["scores"][j], h, d["classes"][j], d["boxes"][j]) for j in range(len(d["scores"]))]
    rows.sort(key=lambda r: -r[0])
    rows = rows[:MAX_DETECTIONS]
    return {
        "scores": np.array([r[0] for r in rows], np.float32),
        "heads": np.array([r[1] for r in rows], np.int32),
        "classes": np.array([r[2] for r in rows], np.int32),
        "boxes": np.array([r[3] for r in rows], np.float32).reshape(-1, 4),
    }


def _assert_matches(outputs, prefix, expected, index, with_heads=False, atol=2e-3):
    """Same detections (count, scores, boxes, classes[, heads]) up to the
    order of near-equal scores, and zero padding."""
    n = int(outputs[f"{prefix}/num_detections"][index])
    assert n == len(expected["scores"]), f"{prefix}[{index}]: {n} vs {len(expected['scores'])} detections"
    got = {
        "scores": outputs[f"{prefix}/detection_scores"][index, :n],
        "boxes": outputs[f"{prefix}/detection_boxes"][index, :n],
        "classes": outputs[f"{prefix}/detection_classes"][index, :n],
    }
    if with_heads:
        got["heads"] = outputs[f"{prefix}/detection_heads"][index, :n]
    unused = set(range(n))
    for i in range(n):
        match = [
            j for j in sorted(unused)
            if abs(got["scores"][j] - expected["scores"][i]) <= atol
            and np.abs(got["boxes"][j] - expected["boxes"][i]).max() <= atol
            and got["classes"][j] == expected["classes"][i]
            and (not with_heads or got["heads"][j] == expected["heads"][i])
        ]
        assert match, f"{prefix}[{index}]: no match for expected detection {i}: " + str(
            {k: v[i] for k, v in expected.items()})
        unused.remove(match[0])
    # Sorted by score, padding is zeros.
    assert np.all(np.diff(got["scores"]) <= 1e-6)
    for key in ("detection_scores", "detection_boxes", "detection_classes"):
        assert not np.any(outputs[f"{prefix}/{key}"][index, n:])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    config = _make_config()
    model_dir = str(root / "model")
    os.makedirs(model_dir)
    images = {
        "small": np.stack([_image(96, 160, 1), _image(96, 160, 2)]),  # landscape, batch of 2
        "large": _image(200, 150, 3)[None],  # portrait, another size
    }
    detector = _build_detector(config)
    _spread_class_logits(detector, [*images["small"], *images["large"]])
    checkpoint.write_config(model_dir, config)
    # Only last.weights.h5, as after a --mode=train run: "best" falls back.
    detector.save_weights(os.path.join(model_dir, checkpoint.LAST_WEIGHTS))
    export_dir = str(root / "serving")
    path = export_lib.export_from_model_dir(
        model_dir, export_dir, score_threshold=SCORE_THRESHOLD, max_detections=MAX_DETECTIONS,
    )

    jpeg = cv2.imencode(".jpg", cv2.cvtColor(images["small"][0], cv2.COLOR_RGB2BGR))[1].tobytes()
    png = cv2.imencode(".png", cv2.cvtColor(images["large"][0], cv2.COLOR_RGB2BGR))[1].tobytes()
    inputs = str(root / "inputs.npz")
    np.savez(inputs, small=images["small"], large=images["large"], bytes=np.array([jpeg, png], dtype=object))

    loaded_path = str(root / "loaded.npz")
    proc = subprocess.run(
        [sys.executable, "-I", "-c", LOADER, path, inputs, loaded_path],
        cwd=str(root), env=ENV, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    loaded = dict(np.load(loaded_path))

    reference_detector, _ = checkpoint.load_detector(model_dir, which="last")
    decoded = [tf.io.decode_image(b, channels=3).numpy() for b in (jpeg, png)]
    reference = {
        "small": reference_detections(reference_detector, list(images["small"]), HEADS),
        "large": reference_detections(reference_detector, list(images["large"]), HEADS),
        "bytes": reference_detections(reference_detector, decoded, HEADS),
    }
    return {
        "root": root, "model_dir": model_dir, "export_dir": export_dir, "path": path, "info": info,
        "loaded": loaded, "reference": reference, "inputs": inputs, "images": images,
    }


@contextlib.contextmanager
def _absl_log_messages():
    """The messages absl's logger (TensorFlow's SavedModel code logs
    through it) emits at INFO inside the block."""
    import logging

    from absl import logging as absl_logging

    messages = []

    class Keep(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logger, handler = absl_logging.get_absl_logger(), Keep()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_renamed_inputs_notice_is_dropped_from_the_log():
    """TensorFlow logs, per endpoint, a ~15 KB line naming every captured
    input it renames (five of them in the demo's export after training;
    this module's own exports do not trigger it), through absl.logging with
    this format string (tensorflow/python/saved_model/
    signature_serialization.py); quiet_renamed_inputs drops that notice and
    nothing else."""
    from absl import logging as absl_logging

    names = ", ".join(str(424210 + 2 * i) for i in range(2000))
    notice = (("Function `%s` contains input name(s) %s with unsupported characters which will be renamed to %s "
               "in the SavedModel."), "serve", names, "unknown, unknown_0")
    with _absl_log_messages() as outside:
        absl_logging.info(*notice)
    with _absl_log_messages() as inside, export_lib.quiet_renamed_inputs():
        absl_logging.info(*notice)
        absl_logging.info("Assets written to: %s", "/tmp/x/assets")
    assert len(outside) == 1 and "contains input name(s) 424210, 424212" in outside[0]
    assert inside == ["Assets written to: /tmp/x/assets"]
    with _absl_log_messages() as after:  # the filter goes with the block
        absl_logging.info(*notice)
    assert after == outside


def test_layout_version_and_asset(exported):
    path = exported["path"]
    assert path == os.path.join(exported["export_dir"], "1")
    assert sorted(os.listdir(exported["export_dir"])) == ["1", "batching_parameters.txt", "models.config"], \
        "no temporary folder left behind"
    for name in ("saved_model.pb", "variables", os.path.join("assets", "label_map.json")):
        assert os.path.exists(os.path.join(path, name)), name
    with open(os.path.join(path, "assets", "label_map.json")) as f:
        label_map = json.load(f)
    assert [h["name"] for h in label_map["heads"]] == list(HEADS)
    for i, (name, ids) in enumerate(HEADS.items()):
        head = label_map["heads"][i]
        assert head["index"] == i
        assert [c["id"] for c in head["classes"]] == ids
        assert [c["index"] for c in head["classes"]] == list(range(len(ids)))
        assert head["classes"][0]["name"] == f"{name}_{ids[0]}"
    assert label_map["serving_default"] == "appliance"
    assert label_map["max_detections"] == MAX_DETECTIONS
    # No class name is shared by the two heads: `all` merges nothing.
    with open(os.path.join(path, "assets", "class_equivalence.json")) as f:
        assert json.load(f) == {"groups": [], "from": "class names", "iou_threshold": 0.5}
    assert exported["info"]["asset"].endswith(os.path.join("assets", "label_map.json"))


def test_loads_with_tensorflow_only(exported):
    info = exported["info"]
    assert info["signatures"] == sorted(SIGNATURES)
    assert info["blocked_loaded"] == []


def test_detections_exist_and_classes_are_coco_ids(exported):
    loaded = exported["loaded"]
    for name, ids in HEADS.items():
        for feed in ("small", "large"):
            num = loaded[f"{name}/{feed}/num_detections"]
            assert num.dtype == np.int32 and np.all(num > 0) and np.all(num <= MAX_DETECTIONS)
            classes = loaded[f"{name}/{feed}/detection_classes"]
            names = loaded[f"{name}/{feed}/detection_class_names"]
            assert classes.dtype == np.int32 and names.shape == classes.shape
            for i, n in enumerate(num):
                assert set(classes[i, :n]) <= set(ids)
                # _make_config names class `id` of head `name` "<name>_<id>".
                assert list(names[i, :n]) == [f"{name}_{c}" for c in classes[i, :n]]
                assert set(names[i, n:]) <= {""}
            boxes = loaded[f"{name}/{feed}/detection_boxes"]
            assert boxes.dtype == np.float32 and boxes.shape[1:] == (MAX_DETECTIONS, 4)
            assert boxes.min() >= 0.0 and boxes.max() <= 1.0
            assert loaded[f"{name}/{feed}/detection_scores"].dtype == np.float32
    # Some images must have fewer than K detections, so padding is exercised.
    assert any(np.any(loaded[f"{n}/{f}/num_detections"] < MAX_DETECTIONS) for n in HEADS for f in ("small", "large"))


@pytest.mark.parametrize("feed", ["small", "large", "bytes"])
def test_per_dataset_signatures_match_keras_path(exported, feed):
    loaded, reference = exported["loaded"], exported["reference"][feed]
    for name in HEADS:
        signature = name + ("_bytes" if feed == "bytes" else "")
        for i, expected in enumerate(reference[name]):
            _assert_matches(loaded, f"{signature}/{feed}", expected, i)


@pytest.mark.parametrize("feed", ["small", "large", "bytes"])
def test_all_signature_merges_heads_by_score(exported, feed):
    loaded, reference = exported["loaded"], exported["reference"][feed]
    signature = "all_bytes" if feed == "bytes" else "all"
    for i in range(len(reference["food"])):
        _assert_matches(loaded, f"{signature}/{feed}", merged_reference(reference, i), i, with_heads=True)
        n = loaded[f"{signature}/{feed}/num_detections"][i]
        heads = loaded[f"{signature}/{feed}/detection_heads"][i, :n]
        classes = loaded[f"{signature}/{feed}/detection_classes"][i, :n]
        names = loaded[f"{signature}/{feed}/detection_class_names"][i]
        assert list(names[:n]) == [f"{list(HEADS)[h]}_{c}" for h, c in zip(heads, classes)]
        assert set(names[n:]) <= {""}
        scores = loaded[f"{signature}/{feed}/detection_scores"][i]
        assert np.all(np.diff(scores[: loaded[f"{signature}/{feed}/num_detections"][i]]) <= 0)


def _iou(a, b):
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@pytest.mark.slow
def test_all_merges_equivalent_classes_across_heads():
    """With an equivalence table, `all` drops a detection that overlaps a
    higher-scored one of an equivalent class from the other head; classes
    that are not equivalent both stay. Checked against a greedy merge in
    numpy of the per-head signatures' detections."""
    config = _make_config()
    images = np.stack([_image(96, 160, 1), _image(96, 160, 2)])
    detector = _build_detector(config)
    _spread_class_logits(detector, list(images))
    label_maps = config.label_maps()
    groups = [["appliance:52", "food:78"], ["appliance:55", "food:80"], ["appliance:61", "food:81"]]
    group_of = {(h, int(e.split(":")[1])): g for g, group in enumerate(groups) for e in group
                for h in [list(HEADS).index(e.split(":")[0])]}
    # K large enough that the cap hides no merge (one head finds < 100 here).
    post = PostprocessConfig(score_threshold=SCORE_THRESHOLD, max_detections=100)
    x, scales, sizes = export_lib._preprocess_images(tf.constant(images), IMAGE_SIZE)
    merged = export_lib._Serving(detector, label_maps, post, groups)
    got = {k: v.numpy() for k, v in merged.detect_all(x, scales, sizes).items()}
    unmerged = export_lib._Serving(detector, label_maps, post).detect_all(x, scales, sizes)
    per_head = [{k: v.numpy() for k, v in merged.detect(name, x, scales, sizes).items()} for name in HEADS]
    for i in range(len(images)):
        rows = sorted(((float(d["detection_scores"][i, j]), h, int(d["detection_classes"][i, j]),
                        d["detection_boxes"][i, j]) for h, d in enumerate(per_head)
                       for j in range(d["num_detections"][i])), key=lambda r: -r[0])
        kept = []
        for row in rows:
            group = group_of.get((row[1], row[2]))
            if not any(group is not None and group == group_of.get((k[1], k[2])) and k[1] != row[1]
                       and _iou(k[3], row[3]) > post.iou_threshold for k in kept):
                kept.append(row)
        kept = kept[:post.max_detections]
        n = int(got["num_detections"][i])
        assert n == len(kept)
        assert [(int(h), int(c)) for h, c in zip(got["detection_heads"][i, :n], got["detection_classes"][i, :n])] == [
            (r[1], r[2]) for r in kept]
        np.testing.assert_allclose(got["detection_scores"][i, :n], [r[0] for r in kept], atol=1e-6)
        np.testing.assert_allclose(got["detection_boxes"][i, :n], np.reshape([r[3] for r in kept], (-1, 4)), atol=1e-6)
        for key in ("detection_boxes", "detection_scores", "detection_classes", "detection_heads"):
            assert not np.any(got[key][i, n:]), key  # merged-away rows do not leak into the padding
        assert set(got["detection_class_names"][i, n:]) <= {b""}
    # Premise: the table mattered (some detections merged away), and no head
    # filled K on its own.
    assert got["num_detections"].sum() < unmerged["num_detections"].numpy().sum()
    assert all(d["num_detections"].max() < post.max_detections for d in per_head)


@pytest.mark.parametrize("name", ["appliance", "food", "all"])
def test_tf_example_signatures_give_the_bytes_signatures_detections(exported, name):
    loaded = exported["loaded"]
    keys = [k.split("/")[-1] for k in loaded if k.startswith(f"{name}_bytes/bytes/")]
    assert "detection_boxes" in keys and "detection_class_names" in keys
    assert loaded[f"{name}_bytes/bytes/num_detections"].sum() > 0  # premise
    for key in keys:
        np.testing.assert_array_equal(loaded[f"{name}_tf_example/bytes/{key}"], loaded[f"{name}_bytes/bytes/{key}"])


# Replays every warm-up record through the TF1 session loader (TF Serving's
# C++ SavedModelBundle path, as saved_model_cli run) and through
# tf.saved_model.load; prints per record the signature, batch and whether
# the two gave the same outputs.
WARMUP_REPLAY = r"""
import json, sys
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2
path = sys.argv[1]
requests = [prediction_log_pb2.PredictionLog.FromString(r.numpy()).predict_log.request
            for r in tf.data.TFRecordDataset(f"{path}/assets.extra/tf_serving_warmup_requests")]
feeds = [{k: tf.make_ndarray(v) for k, v in r.inputs.items()} for r in requests]
names = [r.model_spec.signature_name for r in requests]
loaded = tf.saved_model.load(path)  # eager, before the session's graph becomes the default
wants = [{k: v.numpy() for k, v in loaded.signatures[n](**{k: tf.constant(v) for k, v in f.items()}).items()}
         for n, f in zip(names, feeds)]
out = []
with tf.compat.v1.Session(graph=tf.Graph()) as sess:
    meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], path)
    for name, feed, want in zip(names, feeds, wants):
        signature = meta.signature_def[name]
        keys = sorted(signature.outputs)
        got = dict(zip(keys, sess.run([signature.outputs[k].name for k in keys],
                                      {signature.inputs[k].name: v for k, v in feed.items()})))
        same = sorted(got) == sorted(want) and all(
            np.array_equal(g, want[k]) if g.dtype == object else np.allclose(g, want[k], atol=1e-4)
            for k, g in got.items())
        out.append({"signature": name, "batch": int(next(iter(feed.values())).shape[0]), "same": bool(same),
                    "detections": int(np.sum(got["num_detections"]))})
print(json.dumps(out))
"""


@pytest.mark.slow
def test_warmup_requests_cover_every_signature_and_replay_in_the_session_loader(exported):
    from effdet_tf.serving import tf_serving

    records = tf_serving.read_warmup(exported["path"])
    requests = [(r.predict_log.request.model_spec.signature_name, r) for r in records]
    assert {n for n, _ in requests} == set(SIGNATURES)
    assert len(requests) == 2 * len(SIGNATURES)  # batch 1 and the batching config's largest
    proc = subprocess.run([sys.executable, "-c", WARMUP_REPLAY, exported["path"]], env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    replayed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted((r["signature"], r["batch"]) for r in replayed) == sorted(
        (n, b) for n in SIGNATURES for b in (1, 8))
    assert all(r["same"] for r in replayed), [r for r in replayed if not r["same"]]


def test_models_config_and_batching_parameters_beside_the_versions(exported):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    text = open(os.path.join(exported["export_dir"], "models.config")).read()
    config = text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    (model,) = config.model_config_list.config
    assert (model.name, model.base_path, model.model_platform) == ("effdet", "/models/effdet", "tensorflow")
    assert list(model.model_version_policy.specific.versions) == [1]
    assert dict(model.version_labels) == {"stable": 1}
    batching = open(os.path.join(exported["export_dir"], "batching_parameters.txt")).read()
    fields = dict(re.findall(r"^(\w+) \{ value: (\d+) \}$", batching, re.M))
    assert fields["max_batch_size"] == "8" and fields["batch_timeout_micros"] == "1000"
    assert int(fields["num_batch_threads"]) >= 1 and fields["max_enqueued_batches"] == fields["num_batch_threads"]
    assert re.findall(r"^allowed_batch_sizes: (\d+)$", batching, re.M) == ["1", "2", "4", "8"]
    # Every non-comment line is one of BatchingParameters' fields.
    lines = [line for line in batching.splitlines() if line and not line.startswith("#")]
    assert all(re.fullmatch(r"\w+ \{ value: \d+ \}|allowed_batch_sizes: \d+", line) for line in lines)


def test_models_config_labels_the_newest_two_and_keep_versions_prunes(tmp_path):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    from effdet_tf.serving import tf_serving
    from effdet_tf.config import ExportConfig

    for v in (1, 2, 3, 10):
        (tmp_path / str(v)).mkdir()
    tf_serving.write_server_files(str(tmp_path), ExportConfig(keep_versions=3, serving_model_name="det",
                                                              serving_base_path="/srv/det"))
    assert tf_serving.versions(str(tmp_path)) == [2, 3, 10]
    config = text_format.Parse((tmp_path / "models.config").read_text(), model_server_config_pb2.ModelServerConfig())
    (model,) = config.model_config_list.config
    assert (model.name, model.base_path) == ("det", "/srv/det")
    assert list(model.model_version_policy.specific.versions) == [3, 10]
    assert dict(model.version_labels) == {"stable": 3, "canary": 10}
    assert tf_serving.allowed_batch_sizes(6) == [1, 2, 4, 6]


def test_serving_default_is_first_dataset(exported):
    loaded = exported["loaded"]
    for feed in ("small", "large"):
        for key in ("detection_boxes", "detection_scores", "detection_classes", "detection_class_names",
                    "num_detections"):
            np.testing.assert_array_equal(loaded[f"serving_default/{feed}/{key}"], loaded[f"appliance/{feed}/{key}"])


@pytest.mark.slow
def test_saved_model_cli_show_lists_signatures(exported):
    out = subprocess.run(
        [SAVED_MODEL_CLI, "show", "--dir", exported["path"], "--all"],
        env=ENV, capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    blocks = dict(re.findall(r"signature_def\['(\w+)'\]:\n(.*?)Method name", out, re.S))
    assert set(SIGNATURES) <= set(blocks)
    outputs = {
        "detection_boxes": ("DT_FLOAT", "(-1, %d, 4)" % MAX_DETECTIONS),
        "detection_scores": ("DT_FLOAT", "(-1, %d)" % MAX_DETECTIONS),
        "detection_classes": ("DT_INT32", "(-1, %d)" % MAX_DETECTIONS),
        "detection_class_names": ("DT_STRING", "(-1, %d)" % MAX_DETECTIONS),
        "num_detections": ("DT_INT32", "(-1)"),
    }
    for name in SIGNATURES:
        block = blocks[name]
        fields = dict(
            (key, (dtype, shape))
            for key, dtype, shape in re.findall(r"\['(\w+)'\] tensor_info:\s+dtype: (\w+)\s+shape: (\([^)]*\))", block)
        )
        if name.endswith("_bytes"):
            assert fields["image_bytes"] == ("DT_STRING", "(-1)")
        elif name.endswith("_tf_example"):
            assert fields["serialized_examples"] == ("DT_STRING", "(-1)")
        else:
            assert fields["images"] == ("DT_UINT8", "(-1, -1, -1, 3)")
        expected = dict(outputs)
        if name.startswith("all"):
            expected["detection_heads"] = ("DT_INT32", "(-1, %d)" % MAX_DETECTIONS)
        got = {k: v for k, v in fields.items() if k not in ("images", "image_bytes", "serialized_examples")}
        assert got == expected, name


@pytest.mark.slow
def test_saved_model_cli_run_matches_python_load(exported):
    """`saved_model_cli run` (the session loader, what TF Serving uses) with
    inputs from .npy files gives what tf.saved_model.load gave, on one
    uint8 and one string signature; the warm-up replay above runs every
    signature through the same loader in one process."""
    root = exported["root"]
    data = np.load(exported["inputs"], allow_pickle=True)
    np.save(root / "small.npy", data["small"])
    np.save(root / "bytes.npy", data["bytes"])  # object array of bytes

    def run(name):
        key, feed = ("image_bytes", "bytes") if name.endswith("_bytes") else ("images", "small")
        outdir = str(root / "cli" / name)
        proc = subprocess.run(
            [SAVED_MODEL_CLI, "run", "--dir", exported["path"], "--tag_set", "serve",
             "--signature_def", name, "--inputs", f"{key}={root / (feed + '.npy')}", "--outdir", outdir],
            env=ENV, capture_output=True, text=True, timeout=600,
        )
        return name, feed, outdir, proc

    # Two at a time: each run is a TensorFlow start-up plus a session load.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(run, ["food", "all_bytes"]))
    loaded = exported["loaded"]
    for name, feed, outdir, proc in runs:
        assert proc.returncode == 0, f"{name}: {proc.stderr[-2000:]}"
        keys = ["detection_boxes", "detection_scores", "detection_classes", "num_detections"]
        if name.startswith("all"):
            keys.append("detection_heads")
        assert sorted(f[:-4] for f in os.listdir(outdir)) == sorted(keys + ["detection_class_names"]), name
        for key in keys:
            got = np.load(os.path.join(outdir, key + ".npy"))
            want = loaded[f"{name}/{feed}/{key}"]
            assert got.dtype == want.dtype, (name, key)
            np.testing.assert_allclose(got, want, atol=1e-4, err_msg=f"{name}/{key}")
        names = np.load(os.path.join(outdir, "detection_class_names.npy"), allow_pickle=True)  # bytes objects
        assert [[v.decode() for v in row] for row in names] == loaded[f"{name}/{feed}/detection_class_names"].tolist()


def test_preprocessing_matches_independent_letterbox(exported):
    """The signatures' pre-processing (data/preprocess.py, the evaluation
    pipeline's) is the letterbox (longer side = S, top-left, zero pad), here
    written with OpenCV."""
    for image in (exported["images"]["small"][0], exported["images"]["large"][0], _image(40, 30, 4)):
        served, scales, sizes = export_lib._preprocess_images(tf.constant(image[None]), IMAGE_SIZE)
        want, want_scale = _letterbox_numpy(image)
        assert np.abs(served[0].numpy() - want).max() < 1.0
        np.testing.assert_allclose(scales.numpy(), [want_scale], rtol=1e-6)
        np.testing.assert_array_equal(sizes.numpy(), [image.shape[:2]])


# ---------------------------------------------------------------- errors


def _tree(path):
    """{relative path: (size, mtime)} of everything under `path`."""
    out = {}
    for dirpath, _, files in os.walk(path):
        for f in files:
            full = os.path.join(dirpath, f)
            st = os.stat(full)
            out[os.path.relpath(full, path)] = (st.st_size, st.st_mtime_ns)
    return out


def test_existing_version_is_refused_and_untouched(exported):
    before = _tree(exported["export_dir"])
    with pytest.raises(export_lib.ExportError, match="already exists"):
        export_lib.export_from_model_dir(exported["model_dir"], exported["export_dir"], version=1)
    # export_detector (the library entry point) checks as well.
    reference_detector, _ = checkpoint.load_detector(exported["model_dir"], which="last")
    with pytest.raises(export_lib.ExportError, match="already exists"):
        export_lib.export_detector(
            reference_detector, _make_config().label_maps(), exported["export_dir"], version=1
        )
    assert _tree(exported["export_dir"]) == before
    assert export_lib.next_version(exported["export_dir"]) == 2


def test_export_root_defaults_to_config_then_model_dir(exported, tmp_path):
    """Without an export dir the root is the export settings' --export_dir,
    else MODEL_DIR/export (where train.py's --export_after_training writes):
    an existing version there is refused, naming that path."""
    default_root = os.path.join(exported["model_dir"], "export")
    os.makedirs(os.path.join(default_root, "1"))
    try:
        with pytest.raises(export_lib.ExportError, match=re.escape(os.path.join(default_root, "1"))):
            export_lib.export_from_model_dir(exported["model_dir"], version=1)
    finally:
        shutil.rmtree(default_root)
    configured = tmp_path / "configured"
    (configured / "1").mkdir(parents=True)
    with pytest.raises(export_lib.ExportError, match=re.escape(str(configured / "1"))):
        export_lib.export_from_model_dir(exported["model_dir"], version=1,
                                         export_overrides={"export_dir": str(configured)})


def test_unknown_dataset_is_refused(exported):
    before = _tree(exported["export_dir"])
    with pytest.raises(export_lib.ExportError, match=r"Unknown dataset.*pizza.*appliance"):
        export_lib.export_from_model_dir(exported["model_dir"], exported["export_dir"], datasets=["pizza"])
    assert _tree(exported["export_dir"]) == before


def test_bad_class_equivalence_file_is_refused_naming_the_entry(exported, tmp_path):
    out = tmp_path / "out"
    cases = [('[["appliance:52", "food:78"], ["food:79"]]', r"group 1, entry 'food:79': not a dataset:category_id"),
             ('[["appliance:52", "food:78"], ["appliance:52"]]', r"'appliance:52' is in groups 0 and 1"),
             ('{"groups": []}', "expected a list of lists"),
             ("[[", "cannot read it as JSON")]
    for i, (text, message) in enumerate(cases):
        path = tmp_path / f"equivalence{i}.json"
        path.write_text(text)
        with pytest.raises(export_lib.ExportError, match=rf"--class_equivalence=.*equivalence{i}.json: {message}"):
            export_lib.export_from_model_dir(exported["model_dir"], str(out),
                                             export_overrides={"class_equivalence": str(path)})
    assert not out.exists()


def test_model_dir_without_checkpoint_is_refused(exported, tmp_path):
    empty = tmp_path / "empty_model"
    empty.mkdir()
    out = tmp_path / "out"
    with pytest.raises(export_lib.ExportError, match="config.json"):
        export_lib.export_from_model_dir(str(empty), str(out))
    # A config but no weights: the message says there is no checkpoint.
    checkpoint.write_config(str(empty), _make_config())
    with pytest.raises(export_lib.ExportError, match="no checkpoint"):
        export_lib.export_from_model_dir(str(empty), str(out))
    # --which=best_<dataset> (train.py --keep_best_per_dataset) names a dataset of the run.
    with pytest.raises(export_lib.ExportError, match=r"no checkpoint.*best_food\.weights\.h5"):
        export_lib.export_from_model_dir(str(empty), str(out), which="best_food")
    with pytest.raises(export_lib.ExportError, match=r"no dataset 'pizza'.*appliance"):
        export_lib.export_from_model_dir(str(empty), str(out), which="best_pizza")
    with pytest.raises(export_lib.ExportError, match="--which must be"):
        export_lib.export_from_model_dir(str(empty), str(out), which="worst")
    with pytest.raises(export_lib.ExportError, match="not a directory"):
        export_lib.export_from_model_dir(str(tmp_path / "missing"), str(out))
    # Weights that are not a checkpoint of this model.
    (empty / checkpoint.BEST_WEIGHTS).write_bytes(b"not an HDF5 file")
    with pytest.raises(export_lib.ExportError, match="Cannot load .*best.weights.h5"):
        export_lib.export_from_model_dir(str(empty), str(out))
    assert not out.exists()


def test_cli_reports_errors_without_traceback(exported):
    """export.py exits non-zero with one clear line and overwrites nothing
    (the other error cases share this path and are checked in-process)."""
    before = _tree(exported["export_dir"])
    for version_flag in ("--export_version=1", "--version=1"):  # --version: the same flag's older name
        proc = subprocess.run(
            [sys.executable, os.path.join(REPO, "export.py"), f"--model_dir={exported['model_dir']}",
             f"--export_dir={exported['export_dir']}", version_flag],
            cwd=str(exported["root"]), env=ENV, capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode != 0
        assert "export: " in proc.stderr and "already exists" in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
    assert _tree(exported["export_dir"]) == before


def test_float32_outputs_from_mixed_precision_detector():
    """A detector built under mixed_float16 is exported as float32."""
    import keras

    config = _make_config()
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        mixed = factory.build_detector(config)
    finally:
        keras.config.set_dtype_policy(previous)
    assert mixed.dtype_policy.compute_dtype == "float16"
    clone = export_lib._float32_detector(mixed)
    assert clone.dtype_policy.compute_dtype == "float32"
    x = np.random.default_rng(0).uniform(0, 255, (1, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    out = clone(x, training=False)
    for name in HEADS:
        assert out[name]["cls_logits"].dtype == tf.float32
    for a, b in zip(mixed.weights, clone.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
