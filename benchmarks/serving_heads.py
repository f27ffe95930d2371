"""One K-head SavedModel's `all` signature against K one-dataset SavedModels
called one after the other (issue 13's target: <= 0.55x at K = 2).

    python benchmarks/serving_heads.py                    # K = 2 and 4, 512 px, batch 1, 7 repeats
    python benchmarks/serving_heads.py --heads 2 --image_size 256 --width_multiplier 0.25

For each K, exports with export_lib (export.py's code) one Detector with K
heads and K Detectors with one head each (same architecture, 10 classes per
head), loads them with tf.saved_model.load, and times in interleaved rounds
(so machine load hits both alike):

  all         the K-head model's `all` signature on uint8 [B, S, S, 3]: one
              backbone pass, K heads, per-head NMS, the merge;
  separate    the K one-head models' own signature, called in sequence on
              the same images: K backbone passes, K heads, K NMS.

Reports medians over --repeats and the ratio all / separate. Class biases are
set to 0 so NMS has a full pre-NMS top-k (the worst case, as serving.py's
default). CerberusDet (2024) reports its shared-backbone
multi-head model 36% faster than per-task models run in sequence.
"""

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from effdet_tf.serving import export_lib  # noqa: E402
from effdet_tf.config import PostprocessConfig  # noqa: E402
from effdet_tf.modeling.detector import Detector  # noqa: E402

CLASSES_PER_HEAD = 10


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--heads", default="2,4", help="comma list of K")
    p.add_argument("--image_size", type=int, default=512)
    p.add_argument("--width_multiplier", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def label_map(name):
    return {"classes": [{"index": i, "id": 1 + i, "name": f"{name}_{i}"} for i in range(CLASSES_PER_HEAD)]}


def export(names, args, folder):
    """A SavedModel of a Detector with heads `names`; returns the loaded model."""
    detector = Detector(heads={n: CLASSES_PER_HEAD for n in names}, image_size=args.image_size,
                        width_multiplier=args.width_multiplier)
    for name in names:
        bias = detector.class_nets[name].predict.bias
        bias.assign(np.zeros(bias.shape, np.float32))
    path = export_lib.export_detector(detector, {n: label_map(n) for n in names}, folder,
                                      postprocess_config=PostprocessConfig())
    return tf.saved_model.load(path)


def timed(fn):
    start = time.perf_counter()
    tf.nest.map_structure(lambda t: t.numpy(), fn())
    return time.perf_counter() - start


def measure(k, args, images):
    names = [f"d{i}" for i in range(k)]
    with tempfile.TemporaryDirectory() as tmp:
        joint = export(names, args, os.path.join(tmp, "joint"))
        singles = [export([n], args, os.path.join(tmp, n)) for n in names]
    calls = {
        "all": lambda: joint.signatures["all"](images=images),
        "separate": lambda: [m.signatures[n](images=images) for m, n in zip(singles, names)],
    }
    for fn in calls.values():
        for _ in range(args.warmup):
            timed(fn)
    times = {name: [] for name in calls}
    for _ in range(args.repeats):
        for name, fn in calls.items():
            times[name].append(timed(fn))
    row = {name: {"median_s": statistics.median(t), "min_s": min(t), "runs_s": [round(x, 4) for x in t]}
           for name, t in times.items()}
    row["ratio_all_vs_separate"] = row["all"]["median_s"] / row["separate"]["median_s"]
    return row


def main(argv=None):
    args = parse_args(argv)
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.integers(0, 256, (args.batch, args.image_size, args.image_size, 3), dtype=np.uint8))
    results = {"image_size": args.image_size, "width_multiplier": args.width_multiplier, "batch": args.batch,
               "repeats": args.repeats, "heads": {}}
    for k in (int(v) for v in args.heads.split(",")):
        results["heads"][k] = measure(k, args, images)
        row = results["heads"][k]
        print(f"K={k}: all {1000 * row['all']['median_s']:.1f} ms, {k} separate models "
              f"{1000 * row['separate']['median_s']:.1f} ms (medians of {args.repeats}); "
              f"all / separate = {row['ratio_all_vs_separate']:.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    print(json.dumps({k: round(r["ratio_all_vs_separate"], 3) for k, r in results["heads"].items()}))
    return results


if __name__ == "__main__":
    main()
