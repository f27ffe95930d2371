"""First-request latency of a freshly loaded SavedModel version, with and
without replaying its warm-up file first (issue 14).

    python benchmarks/serving_warmup.py                     # 512 px, 5 loads of each kind
    python benchmarks/serving_warmup.py --image_size 256 --width_multiplier 0.25 --repeats 3

Exports Detector(heads={"appliance": 5, "food": 10}) with export_lib (the
same code as export.py: the version holds
assets.extra/tf_serving_warmup_requests). Then, each time in a fresh Python
process (the one-time costs are per process, as they are per TF Serving
load), loads the version with the TF1 session loader (TF Serving's
SavedModelBundle path) and times one `food_bytes` request on a JPEG:

  cold    load, then the request: it pays for graph optimisation and the
          first allocations;
  warm    load, replay every warm-up record (what TF Serving does before it
          marks the version available), then the request.

Loads alternate cold / warm so machine load hits both alike; medians over
--repeats, and the load and replay times for scale.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Runs in a fresh process: TensorFlow and the serving protos only.
PROBE = r"""
import json, sys, time
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2
path, mode, jpeg_path = sys.argv[1:4]
start = time.perf_counter()
sess = tf.compat.v1.Session(graph=tf.Graph())
meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], path)
load = time.perf_counter() - start

def run(name, inputs):
    signature = meta.signature_def[name]
    fetches = [t.name for t in signature.outputs.values()]
    return sess.run(fetches, {signature.inputs[k].name: v for k, v in inputs.items()})

replay = 0.0
if mode == "warm":
    start = time.perf_counter()
    for record in tf.data.TFRecordDataset(f"{path}/assets.extra/tf_serving_warmup_requests"):
        request = prediction_log_pb2.PredictionLog.FromString(record.numpy()).predict_log.request
        run(request.model_spec.signature_name, {k: tf.make_ndarray(v) for k, v in request.inputs.items()})
    replay = time.perf_counter() - start
jpeg = open(jpeg_path, "rb").read()
start = time.perf_counter()
run("food_bytes", {"image_bytes": np.array([jpeg], dtype=object)})
first = time.perf_counter() - start
start = time.perf_counter()
run("food_bytes", {"image_bytes": np.array([jpeg], dtype=object)})
second = time.perf_counter() - start
print(json.dumps({"load_s": load, "replay_s": replay, "first_request_s": first, "second_request_s": second}))
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--image_size", type=int, default=512)
    p.add_argument("--width_multiplier", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=5, help="fresh loads of each kind")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import cv2
    import numpy as np

    from effdet_tf.serving import export_lib
    from effdet_tf.modeling.detector import Detector

    heads = {"appliance": 5, "food": 10}
    with tempfile.TemporaryDirectory() as tmp:
        detector = Detector(heads=heads, image_size=args.image_size, width_multiplier=args.width_multiplier)
        label_maps = {n: {"classes": [{"index": i, "id": 1 + i, "name": f"{n}{i}"} for i in range(k)]}
                      for n, k in heads.items()}
        path = export_lib.export_detector(detector, label_maps, os.path.join(tmp, "export"))
        image = cv2.GaussianBlur(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8), (5, 5), 0)
        jpeg = os.path.join(tmp, "image.jpg")
        cv2.imwrite(jpeg, image)
        runs = {"cold": [], "warm": []}
        for i in range(args.repeats):
            for mode in ("cold", "warm"):
                proc = subprocess.run([sys.executable, "-c", PROBE, path, mode, jpeg], capture_output=True,
                                      text=True, check=True)
                runs[mode].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(f"load {i + 1}/{args.repeats} {mode}: {runs[mode][-1]}", flush=True)
    summary = {mode: {key: statistics.median(r[key] for r in rows) for key in rows[0]} for mode, rows in runs.items()}
    summary["first_request_ratio_warm_vs_cold"] = (summary["warm"]["first_request_s"]
                                                   / summary["cold"]["first_request_s"])
    for mode in ("cold", "warm"):
        s = summary[mode]
        print(f"{mode}: load {s['load_s']:.2f} s, replay {s['replay_s']:.2f} s, first request "
              f"{1000 * s['first_request_s']:.0f} ms, second {1000 * s['second_request_s']:.0f} ms (medians)")
    print(f"first request warm / cold = {summary['first_request_ratio_warm_vs_cold']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": runs, "summary": summary}, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
