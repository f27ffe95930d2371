"""Predict with an exported SavedModel: drawn images + COCO results JSON.

    python -m effdet_tf.serving.predict --saved_model=OUT/1 --dataset=food \
        --images='imgs/*.jpg' --output_dir=preds

Sends each file's bytes to the `<dataset>_bytes` signature (decoding,
resizing, the network and NMS all run inside the SavedModel, as under TF
Serving; the same pre- and post-processing as evaluation, at the export's
score threshold, see assets/label_map.json), draws the detections with their class names and scores into
`output_dir/<file name>`, and writes every detection to
`output_dir/detections.json` in COCO results format (image_id: the file stem
if it is a number, else the file's position in the sorted list; category_id:
the dataset's COCO id; bbox: x, y, width, height in pixels). Files that are
not JPEG or PNG images, or fail to decode, are reported and skipped.
`--dataset=all` uses the `all_bytes` signature; results then also carry the
dataset name.
"""

import glob
import json
import os
import sys

import cv2
import numpy as np
import tensorflow as tf

from effdet_tf.data import preprocess
from effdet_tf.ops import boxes as box_ops
from effdet_tf.visualize import draw_detections

RESULTS_FILE = "detections.json"
_MAGIC = {b"\xff\xd8\xff": "jpeg", b"\x89PNG\r\n\x1a\n": "png"}


class PredictError(ValueError):
    """A user-facing problem with the command line."""


def read_label_map(saved_model_dir):
    """The exported `assets/label_map.json` (see export_lib.label_map_document)."""
    path = os.path.join(saved_model_dir, "assets", "label_map.json")
    if not os.path.exists(path):
        raise PredictError(f"{path} not found: is {saved_model_dir} a SavedModel written by export.py?")
    with open(path) as f:
        return json.load(f)


def _image_format(data):
    for magic, name in _MAGIC.items():
        if data.startswith(magic):
            return name
    return None


def _list_images(patterns):
    files = []
    for pattern in patterns.split(","):
        pattern = pattern.strip()
        if not pattern:
            continue
        matched = glob.glob(pattern) if glob.has_magic(pattern) else ([pattern] if os.path.exists(pattern) else [])
        files.extend(f for f in matched if os.path.isfile(f))
    return sorted(dict.fromkeys(files))


def _image_id(path, position):
    stem = os.path.splitext(os.path.basename(path))[0]
    return int(stem) if stem.isdigit() else position


def _output_name(path, used):
    """The input's file name, made unique within output_dir."""
    name = os.path.basename(path)
    stem, ext = os.path.splitext(name)
    if ext.lower() not in (".jpg", ".jpeg", ".png"):
        ext = ".jpg"
    name, n = stem + ext, 1
    while name in used:
        name, n = f"{stem}_{n}{ext}", n + 1
    used.add(name)
    return name


def predict(saved_model, dataset, images, output_dir, min_score=0.0, log=print):
    """Runs the SavedModel on every file matching `images`; returns a report.

    Returns {"images": n written, "detections": n, "skipped": [(path, reason)],
    "results": path of the COCO JSON}.
    """
    label_map = read_label_map(saved_model)
    heads = {h["name"]: h for h in label_map["heads"]}
    if dataset != "all" and dataset not in heads:
        raise PredictError(f"Unknown dataset {dataset!r}; this SavedModel has {list(heads)} (or 'all').")
    files = _list_images(images)
    if not files:
        raise PredictError(f"No files match --images={images!r}.")

    loaded = tf.saved_model.load(saved_model)
    signature = loaded.signatures[f"{dataset}_bytes"]
    os.makedirs(output_dir, exist_ok=True)
    results, skipped, used, written = [], [], set(), 0
    for position, path in enumerate(files):
        image, out = _run_signature(signature, path)
        if image is None:
            skipped.append((path, out))
            log(f"skipped {path}: {out}")
            continue
        detections = _detections(out, image.shape[:2], dataset, heads, min_score)
        drawn = _draw(image, detections, dataset, label_map)
        cv2.imwrite(os.path.join(output_dir, _output_name(path, used)), cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
        written += 1
        results.extend(_coco_results(detections, _image_id(path, position), dataset, label_map))

    results_path = os.path.join(output_dir, RESULTS_FILE)
    with open(results_path, "w") as f:
        json.dump(results, f)
    log(f"{written} image(s) written to {output_dir}, {len(results)} detection(s) in {results_path}, "
        f"{len(skipped)} file(s) skipped")
    return {"images": written, "detections": len(results), "skipped": skipped, "results": results_path}


def _run_signature(signature, path):
    """(decoded image, the signature's outputs) of one file, or (None, why
    it is skipped)."""
    with open(path, "rb") as f:
        data = f.read()
    if _image_format(data) is None:
        return None, "not a JPEG or PNG image"
    try:
        # The pixels the signature decodes (data/preprocess.py), for drawing.
        image = preprocess.decode(tf.constant(data)).numpy()
        return image, signature(image_bytes=tf.constant([data]))
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
        return None, f"cannot be decoded ({e.message.splitlines()[0] if e.message else type(e).__name__})"


def _detections(out, image_shape, dataset, heads, min_score):
    """{"boxes" yxyx pixels, "scores", "classes" (COCO ids), "heads" (head
    index)} of one image's outputs, those under `min_score` left out."""
    num = int(out["num_detections"][0])
    height, width = image_shape
    boxes = box_ops.denormalize(out["detection_boxes"][0, :num], height, width).numpy()
    scores = out["detection_scores"][0, :num].numpy()
    classes = out["detection_classes"][0, :num].numpy()
    if dataset == "all":
        head_ids = out["detection_heads"][0, :num].numpy()
    else:
        head_ids = np.full([num], heads[dataset]["index"])
    keep = scores >= min_score
    return {"boxes": boxes[keep], "scores": scores[keep], "classes": classes[keep], "heads": head_ids[keep]}


def _class_names(label_map):
    """{head index: {COCO id: name}} and {head index: dataset name}."""
    names = {h["index"]: {c["id"]: c["name"] for c in h["classes"]} for h in label_map["heads"]}
    return names, {h["index"]: h["name"] for h in label_map["heads"]}


def _draw(image, det, dataset, label_map):
    """The image with its detections drawn; under "all" one colour per
    (head, class) and labels reading "dataset/name"."""
    names, head_names = _class_names(label_map)
    if dataset != "all":
        index = next(h["index"] for h in label_map["heads"] if h["name"] == dataset)
        return draw_detections(image, det["boxes"], det["classes"], det["scores"], names[index])
    keys = det["classes"].astype(np.int64) + 100000 * det["heads"].astype(np.int64)
    key_names = {
        int(k): f"{head_names[int(h)]}/{names[int(h)].get(int(c), c)}"
        for k, h, c in zip(keys, det["heads"], det["classes"])
    }
    return draw_detections(image, det["boxes"], keys, det["scores"], key_names)


def _coco_results(det, image_id, dataset, label_map):
    """One image's detections as COCO results (xywh pixels, the dataset's
    own ids; under "all" each names its dataset)."""
    _, head_names = _class_names(label_map)
    boxes = det["boxes"]
    xywh = box_ops.yxyx_to_xywh(boxes).numpy() if len(boxes) else np.zeros([0, 4], np.float32)
    results = []
    for i in range(len(boxes)):
        entry = {
            "image_id": image_id,
            "category_id": int(det["classes"][i]),
            "bbox": [round(float(v), 2) for v in xywh[i]],
            "score": round(float(det["scores"][i]), 5),
        }
        if dataset == "all":
            entry["dataset"] = head_names[int(det["heads"][i])]
        results.append(entry)
    return results


def main(argv=None):
    from absl import app, flags

    flags.DEFINE_string("saved_model", None, "An exported version folder, e.g. OUT/1.")
    flags.DEFINE_string("dataset", None, "Which dataset's signature to use (or 'all').")
    flags.DEFINE_string("images", None, "Glob(s) of images, comma separated.")
    flags.DEFINE_string("output_dir", None, "Where drawn images and detections.json go.")
    flags.DEFINE_float("min_score", 0.0, "Drop detections scored below this (the export threshold applies first).")
    flags.mark_flags_as_required(["saved_model", "dataset", "images", "output_dir"])
    FLAGS = flags.FLAGS

    def run(_):
        try:
            predict(FLAGS.saved_model, FLAGS.dataset, FLAGS.images, FLAGS.output_dir, FLAGS.min_score)
        except PredictError as e:
            sys.exit(f"predict: {e}")

    app.run(run, argv=argv)


if __name__ == "__main__":
    main()
