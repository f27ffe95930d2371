"""A trained model's COCO AP with its saved BatchNorm statistics and with
them recomputed for its weights (train.py's --precise_bn_batches,
optimization.BatchNormRefresh), on each dataset's val split.

    python benchmarks/batchnorm_refresh.py runs/real_data_15_ciou/ours_raccoon:best \
        runs/width05/ours_bccd:last --batches=20 --draws=1

Each MODEL_DIR:WHICH (best, last, best_<dataset>) is loaded as export.py
loads it; each draw recomputes the statistics from the next --batches
batches of the run's own training pipeline (its augmentation, its batch
size) and evaluates. Prints one JSON line per model: {"saved": {dataset:
[AP, AP50]}, "draw0": {...}, ...}.
"""

import argparse
import dataclasses
import json
import tempfile

from effdet_tf import callbacks, checkpoint, train_lib


def ap(evaluator, detector):
    metrics, _ = evaluator(detector, 0)
    return {name: [round(m["AP"], 4), round(m["AP50"], 4)] for name, m in metrics.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="MODEL_DIR:WHICH")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--draws", type=int, default=1)
    args = p.parse_args()
    for spec in args.models:
        model_dir, _, which = spec.rpartition(":")
        detector, config = checkpoint.load_detector(model_dir, which=which)
        evaluator = callbacks.Evaluator(config, train_lib.eval_data(config), tempfile.mkdtemp(), draw=False)
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, precise_bn_batches=args.batches))
        refresh = train_lib.batchnorm_refresh(config, detector)
        result = {"model": spec, "saved": ap(evaluator, detector)}
        for draw in range(args.draws):
            refresh()
            result[f"draw{draw}"] = ap(evaluator, detector)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
