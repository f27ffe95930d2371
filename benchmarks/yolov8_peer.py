"""The peer of benchmarks/real_data.py: keras-cv's YOLOV8Detector, from random init.

Trains keras-cv 0.9's `YOLOV8Detector` with keras-cv's own usual recipe (the
keras.io tutorial "Efficient Object Detection with YOLOV8 and KerasCV") on a
folder of TFRecords made by our converter, for a wall-clock training budget
counted exactly as ours is (`effdet_tf.callbacks.TrainingClock`), and scores
it with pycocotools on the converter's val split, in original image pixels
(`effdet_tf.evaluation.CocoEvaluator`).

Nothing of our model or recipe is used; only our decoder (the records'
layout), the clock and the evaluator are shared, so the two sides read the
same images and are timed and scored the same way. Nothing is downloaded:
the backbone is built from the preset's arguments, not `from_preset`.

    python benchmarks/yolov8_peer.py --tfrecord_dir=/tmp/cache/raccoon-<hash> \
        --minutes=15 --eval_every_minutes=3

prints one progress line per evaluation and the result as one JSON line.
"""

import argparse
import json
import math
import time
from pathlib import Path

import keras
import keras_cv
import numpy as np
import tensorflow as tf

from effdet_tf.callbacks import TrainingClock
from effdet_tf.data import decoder
from effdet_tf.data.pipeline import AUTO_CACHE_MAX_BYTES
from effdet_tf.evaluation import CocoEvaluator

# keras-cv 0.9 keeps preset configs on Kaggle (config.json beside the
# weights), so they are not in the installed package. These are the
# "yolo_v8_xs_backbone" / "yolo_v8_s_backbone" configs as keras-cv <= 0.6
# shipped them inline (keras_cv/models/backbones/yolo_v8/
# yolo_v8_backbone_presets.py); built here they have exactly the parameter
# counts 0.9's preset metadata states (1,277,680 and 5,089,760).
BACKBONES = {
    "xs": {"stackwise_channels": [32, 64, 128, 256], "stackwise_depth": [1, 2, 2, 1]},
    "s": {"stackwise_channels": [64, 128, 256, 512], "stackwise_depth": [1, 2, 2, 1]},
}
# fpn_depth=1: the keras.io tutorial pairs it with "yolo_v8_s_backbone_coco",
# keras-cv's own detector tests with "yolo_v8_xs_backbone"; it is also
# ultralytics' neck depth for n/s (3 C2f repeats x depth_multiple 0.33).
FPN_DEPTH = {"xs": 1, "s": 1}

# The tutorial's optimizer.
LEARNING_RATE = 0.001
GLOBAL_CLIPNORM = 10.0
# JitteredResize's scale range in the tutorial.
SCALE_FACTOR = (0.75, 1.3)
EVAL_BATCH_SIZE = 8


def build_detector(num_classes, image_size, size="s"):
    """YOLOV8Detector (xyxy pixel boxes, inputs 0-255) with an mAP decoder."""
    backbone = keras_cv.models.YOLOV8Backbone(
        **BACKBONES[size], include_rescaling=True, activation="swish",
        input_shape=(image_size, image_size, 3))
    # COCO mAP needs the low-score tail: confidence 0.001 and 100 boxes per
    # image, as COCO and our own evaluation use (keras-cv's default decoder
    # keeps only scores >= 0.2); IoU 0.7 is ultralytics' val NMS IoU.
    decoder_layer = keras_cv.layers.NonMaxSuppression(
        bounding_box_format="xyxy", from_logits=False, iou_threshold=0.7,
        confidence_threshold=0.001, max_detections=100)
    model = keras_cv.models.YOLOV8Detector(
        num_classes=num_classes, bounding_box_format="xyxy", backbone=backbone,
        fpn_depth=FPN_DEPTH[size], prediction_decoder=decoder_layer)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=LEARNING_RATE, global_clipnorm=GLOBAL_CLIPNORM),
        classification_loss="binary_crossentropy", box_loss="ciou")
    return model


# ------------------------------------------------------------------ data

def _files(tfrecord_dir, split):
    files = sorted(str(p) for p in Path(tfrecord_dir).glob(f"{split}-*.tfrecord"))
    if not files:
        raise FileNotFoundError(f"No {split}-*.tfrecord in {tfrecord_dir}")
    return files


def read_label_map(tfrecord_dir):
    """COCO category id of each contiguous class index."""
    classes = json.loads((Path(tfrecord_dir) / "label_map.json").read_text())["classes"]
    return [c["id"] for c in sorted(classes, key=lambda c: c["index"])]


def _count(files):
    """(records, most non-crowd boxes in one record), without decoding images."""
    features = {"image/object/class/label": tf.io.VarLenFeature(tf.int64),
                "image/object/is_crowd": tf.io.VarLenFeature(tf.int64)}
    records, most = 0, 0
    for serialized in tf.data.TFRecordDataset(files).batch(256):
        parsed = tf.io.parse_example(serialized, features)
        labels = tf.sparse.to_dense(parsed["image/object/class/label"], default_value=-1)
        crowd = tf.sparse.to_dense(parsed["image/object/is_crowd"])
        if crowd.shape[1] != labels.shape[1]:  # records without is_crowd: no crowds
            crowd = tf.zeros_like(labels)
        per_image = tf.reduce_sum(tf.cast((labels >= 0) & (crowd == 0), tf.int32), axis=1)
        records += int(per_image.shape[0])
        most = max(most, int(tf.reduce_max(per_image)))
    return records, most


def _to_keras_cv(example):
    """decode_example's dict -> keras-cv's {"images", "bounding_boxes"}: xyxy
    pixels, float classes, crowd regions dropped (COCO eval ignores them)."""
    keep = tf.logical_not(example["is_crowd"])
    boxes = keras_cv.bounding_box.convert_format(
        tf.boolean_mask(example["boxes"], keep), source="yxyx", target="xyxy")
    classes = tf.cast(tf.boolean_mask(example["classes"], keep), tf.float32)
    return {"images": tf.cast(example["image"], tf.float32),
            "bounding_boxes": {"boxes": boxes, "classes": classes}}


def train_dataset(tfrecord_dir, image_size, batch_size, max_boxes, num_records, seed=0):
    """(images [B,S,S,3] float 0-255, {"boxes" [B,max_boxes,4] xyxy px,
    "classes" [B,max_boxes]} padded with -1), repeating forever.

    Decoding matches ours (data.pipeline): JPEGs decoded at the smallest
    libjpeg scale that still covers the largest jittered size, decoded images
    cached in memory when the shards are small, a shuffle over the records.
    """
    files = _files(tfrecord_dir, "train")
    min_size = int(math.ceil(image_size * SCALE_FACTOR[1]))
    ds = tf.data.TFRecordDataset(files)
    ds = ds.map(lambda r: _to_keras_cv(decoder.decode_example(r, min_size=min_size)),
                num_parallel_calls=tf.data.AUTOTUNE)
    if sum(Path(f).stat().st_size for f in files) <= AUTO_CACHE_MAX_BYTES:
        ds = ds.cache()
    ds = ds.repeat().shuffle(min(num_records, 1024), seed=seed)
    ds = ds.ragged_batch(batch_size, drop_remainder=True)
    augmenters = [
        keras_cv.layers.RandomFlip(mode="horizontal", bounding_box_format="xyxy", seed=seed),
        keras_cv.layers.JitteredResize(target_size=(image_size, image_size), scale_factor=SCALE_FACTOR,
                                       bounding_box_format="xyxy", seed=seed),
    ]

    def augment(inputs):
        for layer in augmenters:
            inputs = layer(inputs, training=True)
        return inputs["images"], keras_cv.bounding_box.to_dense(inputs["bounding_boxes"], max_boxes=max_boxes)

    ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def letterbox(image, image_size):
    """uint8/float [h, w, 3] -> (float [S, S, 3], float [2] (x, y) original px
    per model px), keras-cv's inference resize: aspect kept, padded at the
    bottom/right. The factor comes from passing the whole image as a box
    through the same layer, so it is keras-cv's own box mapping."""
    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    resize = keras_cv.layers.Resizing(image_size, image_size, pad_to_aspect_ratio=True,
                                      bounding_box_format="xyxy")
    out = resize({"images": tf.cast(image, tf.float32),
                  "bounding_boxes": {"boxes": tf.reshape(tf.stack([0.0, 0.0, w, h]), [1, 4]),
                                     "classes": tf.zeros([1], tf.float32)}})
    extent = keras_cv.bounding_box.to_dense(out["bounding_boxes"])["boxes"][0]
    return out["images"], tf.stack([w / extent[2], h / extent[3]])


def to_original(boxes, factors, height, width):
    """xyxy model px [K, 4] -> xyxy original px, clipped to the image."""
    boxes = np.asarray(boxes, np.float64) * np.tile(np.asarray(factors, np.float64), 2)
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0.0, float(width))
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0.0, float(height))
    return boxes


def eval_dataset(tfrecord_dir, image_size, max_images=None):
    """{"images" [B,S,S,3], "factors" [B,2], "image_id" [B], "height",
    "width" [B]} over the val records in order; full-size decode, as ours."""
    ds = tf.data.TFRecordDataset(_files(tfrecord_dir, "val"))
    if max_images:
        ds = ds.take(max_images)

    def prepare(record):
        example = decoder.decode_example(record)
        images, factors = letterbox(example["image"], image_size)
        return {"images": images, "factors": factors, "image_id": example["image_id"],
                "height": example["height"], "width": example["width"]}

    return ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).batch(EVAL_BATCH_SIZE).prefetch(2)


def make_detect_fn(model):
    """images -> keras-cv's decoded detections ({"boxes" xyxy model px,
    "confidence", "classes", "num_detections"}), traced once.

    What `predict` does per batch; `predict_on_batch` cannot be used: under
    Keras 3 it hands predict_step an (x,) tuple, and YOLOV8Detector's
    predict_step reads `.shape` off it (AttributeError)."""

    @tf.function
    def detect(images):
        return model.decode_predictions(model(images, training=False), images)

    return detect


def evaluate(detect, dataset, evaluator):
    """COCO metrics over `dataset` (eval_dataset) of `detect` (make_detect_fn)."""
    evaluator.reset()
    for batch in dataset:
        out = {k: v.numpy() for k, v in detect(batch["images"]).items()}
        image_ids = batch["image_id"].numpy()
        results = []
        for b, image_id in enumerate(image_ids):
            n = int(out["num_detections"][b])
            height, width = int(batch["height"][b]), int(batch["width"][b])
            xyxy = to_original(out["boxes"][b, :n], batch["factors"][b].numpy(), height, width)
            for box, score, cls in zip(xyxy, out["confidence"][b, :n], out["classes"][b, :n]):
                w, h = box[2] - box[0], box[3] - box[1]
                if w <= 0 or h <= 0:
                    continue
                results.append({"image_id": int(image_id), "category_id": int(evaluator.category_ids[int(cls)]),
                                "bbox": [round(float(v), 3) for v in (box[0], box[1], w, h)],
                                "score": float(score)})
        evaluator.add_coco_results(results, image_ids=image_ids.tolist())
    return evaluator.result()


# ------------------------------------------------------------------ run

def train_and_evaluate(tfrecord_dir, image_size=256, minutes=15.0, eval_every_minutes=3.0,
                       batch_size=8, seed=0, log=print, max_eval_images=None, size="s"):
    """Trains for `minutes` of training time, evaluating every
    `eval_every_minutes` (0: only at the end) and once at the end.

    Returns {"parameters", "images_per_s" (train images / training seconds),
    "steps", "history": [{"minutes", "step", "AP", "AP50", "AP75"}, ...]}.
    """
    keras.utils.set_random_seed(seed)
    category_ids = read_label_map(tfrecord_dir)
    num_records, max_boxes = _count(_files(tfrecord_dir, "train"))
    model = build_detector(len(category_ids), image_size, size)
    train_ds = train_dataset(tfrecord_dir, image_size, batch_size, max(max_boxes, 1), num_records, seed)
    eval_ds = eval_dataset(tfrecord_dir, image_size, max_eval_images)
    evaluator = CocoEvaluator(Path(tfrecord_dir) / "val_annotations.json", category_ids)
    parameters = int(model.count_params())
    log(f"yolov8_{size}: {parameters:,} parameters, {len(category_ids)} classes, {num_records} train images, "
        f"{image_size} px, batch {batch_size}, {minutes:g} min")

    detect = make_detect_fn(model)
    history, last = [], {}

    def record(clock):
        started = time.perf_counter()
        metrics = evaluate(detect, eval_ds, evaluator)
        loss = last.get("loss")
        history.append({"minutes": clock.seconds / 60, "step": clock.steps,
                        **{k: metrics[k] for k in ("AP", "AP50", "AP75")}})
        rate = clock.steps * batch_size / max(clock.seconds, 1e-9)
        log(f"yolov8_{size} step {clock.steps} ({clock.seconds / 60:.2f} min trained, {rate:.2f} img/s"
            + (f", loss {float(loss):.3f}" if loss is not None else "")
            + f"): AP {metrics['AP']:.3f} AP50 {metrics['AP50']:.3f} AP75 {metrics['AP75']:.3f}"
            f" (eval {time.perf_counter() - started:.0f} s)")

    clock = TrainingClock(budget_seconds=minutes * 60, every_seconds=eval_every_minutes * 60, on_tick=record)
    losses = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: last.update(logs or {}))
    model.fit(train_ds, epochs=1_000_000, steps_per_epoch=max(num_records // batch_size, 1),
              callbacks=[losses, clock], verbose=0, shuffle=False)
    if not history or history[-1]["step"] != clock.steps:
        record(clock)
    return {"parameters": parameters,
            "images_per_s": clock.steps * batch_size / max(clock.seconds, 1e-9),
            "steps": clock.steps, "history": history}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tfrecord_dir", required=True, help="A folder made by the converter.")
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--eval_every_minutes", type=float, default=3.0)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--size", choices=sorted(BACKBONES), default="s")
    parser.add_argument("--max_eval_images", type=int, default=None)
    parser.add_argument("--json", default="", help="also write the result here")
    args = parser.parse_args(argv)
    result = train_and_evaluate(args.tfrecord_dir, args.image_size, args.minutes, args.eval_every_minutes,
                                args.batch_size, max_eval_images=args.max_eval_images, size=args.size,
                                log=lambda line: print(line, flush=True))
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
