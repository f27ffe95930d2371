"""End-to-end SavedModel latency/throughput next to the bare network.

    python benchmarks/serving.py                       # 512 px, batch 1 and 8, 5 repeats
    python benchmarks/serving.py --repeats 3 --image_size 256 --width_multiplier 0.25

Exports Detector(heads={"appliance": 5, "food": 10}) with export_lib (the
same code as export.py), loads it back with tf.saved_model.load, and times,
interleaved in one process so that machine load hits every number alike
(medians over --repeats; float32, CPU):

  network   the bare Keras model (every head) in a tf.function on an already
            pre-processed float32 [B, S, S, 3] input: no resize, no decoding
            of boxes, no NMS. The reference.
  food      the SavedModel's `food` signature on uint8 [B, S, S, 3]: resize
            and pad, backbone + the food head, box decoding, NMS, mapping to
            input coordinates, COCO ids. Less head work than `network`.
  all       the `all` signature: every head (the same network work as
            `network`), per-head NMS, merge by score. The like-for-like
            comparison for the 1.10x target.
  all_bytes `all_bytes` on JPEG bytes of the same images (adds decoding).
  pre, post the in-graph pre-processing (uint8 -> letterboxed float32) and
            post-processing of `all` (box decoding, per-head NMS, merge) on
            their own, with the network outputs held fixed.

On a shared CPU the end-to-end numbers swing by tens of percent from call to
call (other processes), so each row also shows the minimum, and the
estimate (network + pre + post) / network, whose small terms are measured
with little noise: the overhead the SavedModel adds to the network.

Detection load: an untrained head scores every anchor at the 0.01 prior,
below the 0.05 threshold, which would make NMS free. By default the class
bias is set to 0 so every candidate scores ~0.5: the pre-NMS top-k is full
and NMS works on --pre_nms_topk overlapping boxes per image, the worst case
(--detection_load=prior keeps the untrained prior instead).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from effdet_tf.serving import export_lib  # noqa: E402
from effdet_tf.config import PostprocessConfig  # noqa: E402
from effdet_tf.modeling.detector import Detector  # noqa: E402

HEADS = {"appliance": 5, "food": 10}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--image_size", type=int, default=512)
    p.add_argument("--batches", default="1,8", help="comma list of batch sizes")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per variant and batch")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls after loading/tracing")
    p.add_argument("--width_multiplier", type=float, default=1.0)
    p.add_argument("--pre_nms_topk", type=int, default=1000)
    p.add_argument("--max_detections", type=int, default=100)
    p.add_argument("--nms_method", choices=["hard", "gaussian"], default=PostprocessConfig().nms_method)
    p.add_argument("--detection_load", choices=["worst", "prior"], default="worst")
    p.add_argument("--variants", default="network,food,all,all_bytes,pre,post")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def build_detector(args):
    detector = Detector(heads=HEADS, image_size=args.image_size, width_multiplier=args.width_multiplier)
    if args.detection_load == "worst":
        for name in detector.head_names:
            bias = detector.class_nets[name].predict.bias
            bias.assign(np.zeros(bias.shape, np.float32))
    return detector


def make_inputs(args, batch):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, args.image_size, args.image_size, 3), dtype=np.uint8)
    # Smooth the noise a little so JPEG sizes look like photos, not noise.
    images = np.stack([cv2.GaussianBlur(im, (5, 5), 0) for im in images])
    jpegs = [cv2.imencode(".jpg", im, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes() for im in images]
    return {
        "uint8": tf.constant(images),
        "float": tf.constant(images.astype(np.float32)),  # already S x S: the letterbox is the identity
        "bytes": tf.constant(jpegs),
    }


def timed(fn):
    start = time.perf_counter()
    out = fn()
    # Make sure the work is done (results are host tensors on CPU anyway).
    tf.nest.map_structure(lambda t: t.numpy(), out)
    return time.perf_counter() - start


def main(argv=None):
    args = parse_args(argv)
    variants = args.variants.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    keras.utils.set_random_seed(0)
    detector = build_detector(args)
    network = tf.function(lambda x: detector(x, training=False), autograph=False)

    settings = PostprocessConfig(pre_nms_topk=args.pre_nms_topk, max_detections=args.max_detections,
                                 nms_method=args.nms_method)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = export_lib.export_detector(
            detector,
            {name: {"classes": [{"index": i, "id": 100 + i, "name": f"{name}{i}"} for i in range(n)]}
             for name, n in HEADS.items()},
            tmp,
            postprocess_config=settings,
        )
        export_seconds = time.perf_counter() - start
        loaded = tf.saved_model.load(path)

    # Pre- and post-processing alone: the exporter's own graph pieces, with
    # the network replaced by fixed outputs.
    label_maps = {name: {"classes": [{"index": i, "id": 100 + i, "name": f"{name}{i}"} for i in range(n)]}
                  for name, n in HEADS.items()}
    serving = export_lib._Serving(detector, label_maps, settings)
    pre = tf.function(lambda u: export_lib._preprocess_images(u, args.image_size), autograph=False)
    fixed = {}
    serving.network = lambda images, names: {n: fixed["outputs"][n] for n in names}
    post = tf.function(lambda scales, sizes: serving.detect_all(None, scales, sizes), autograph=False)

    calls = {
        "pre": lambda x: pre(x["uint8"]),
        "post": lambda x: post(x["scales"], x["sizes"]),
        "network": lambda x: network(x["float"]),
        "food": lambda x: loaded.signatures["food"](images=x["uint8"]),
        "all": lambda x: loaded.signatures["all"](images=x["uint8"]),
        "all_bytes": lambda x: loaded.signatures["all_bytes"](image_bytes=x["bytes"]),
    }
    results = {"image_size": args.image_size, "width_multiplier": args.width_multiplier,
               "pre_nms_topk": args.pre_nms_topk, "nms_method": args.nms_method, "detection_load": args.detection_load,
               "export_seconds": round(export_seconds, 1), "batches": {}}
    for batch in batches:
        inputs = make_inputs(args, batch)
        inputs["scales"] = tf.ones([batch], tf.float32)
        inputs["sizes"] = tf.fill([batch, 2], args.image_size)
        fixed["outputs"] = network(inputs["float"])
        post.get_concrete_function(inputs["scales"], inputs["sizes"])  # trace with this batch's outputs
        for name in variants:
            for _ in range(args.warmup):
                timed(lambda: calls[name](inputs))
        detections = loaded.signatures["all"](images=inputs["uint8"])["num_detections"].numpy()
        times = {name: [] for name in variants}
        for _ in range(args.repeats):  # interleaved rounds
            for name in variants:
                times[name].append(timed(lambda: calls[name](inputs)))
        row = {"num_detections_all": detections.tolist()}
        for name in variants:
            median = statistics.median(times[name])
            row[name] = {"median_s": median, "min_s": min(times[name]), "ms_per_batch": 1000 * median,
                         "images_per_s": batch / median, "runs_s": [round(t, 4) for t in times[name]]}
        if "network" in variants:
            for name in variants:
                if name not in ("network", "pre", "post"):
                    row[name]["ratio_vs_network"] = row[name]["median_s"] / row["network"]["median_s"]
                    row[name]["min_ratio_vs_network"] = row[name]["min_s"] / row["network"]["min_s"]
            if "pre" in variants and "post" in variants:
                net = row["network"]["median_s"]
                row["estimated_all_ratio"] = (net + row["pre"]["median_s"] + row["post"]["median_s"]) / net
        results["batches"][batch] = row

    print(f"SavedModel export took {export_seconds:.1f} s; detection load: {args.detection_load} "
          f"(pre_nms_topk={args.pre_nms_topk}, max_detections={args.max_detections})")
    print(f"{'batch':>5} {'variant':>10} {'median ms':>10} {'min ms':>8} {'img/s':>7} {'x network':>10} {'min x':>6}")
    for batch, row in results["batches"].items():
        for name in variants:
            r = row[name]
            ratio = f"{r['ratio_vs_network']:.3f}" if "ratio_vs_network" in r else "-"
            min_ratio = f"{r['min_ratio_vs_network']:.3f}" if "min_ratio_vs_network" in r else "-"
            print(f"{batch:>5} {name:>10} {r['ms_per_batch']:>10.1f} {1000 * r['min_s']:>8.1f} "
                  f"{r['images_per_s']:>7.2f} {ratio:>10} {min_ratio:>6}")
        if "estimated_all_ratio" in row:
            print(f"{batch:>5} (network + pre + post) / network = {row['estimated_all_ratio']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
