"""Does the exported EMA model of a short run learn? EMA on vs off.

A fine-tuning-length run (a few hundred steps) is where Keras's fixed EMA
momentum fails: with 0.9998 the average still holds most of the random
initialisation. This trains the same short recipe with each
--ema_momentum given, on a real dataset, and prints the COCO metrics that
training's last evaluation (of the EMA weights, what best/last and export
hold) reports, one JSON line per run and a table at the end.

    python benchmarks/ema_short_run.py --dataset=bccd=../shared/data/bccd-coco \
        --ema=0,0.9998 --steps=200 --out=runs/ema_short_run

Any extra arguments go to train.py as they are (e.g. --image_size=256).
"""

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def recipe(dataset, steps, model_dir, ema):
    """The short CPU recipe: 128 px, width 0.25, Adam, one evaluation at the end."""
    interval = 50 if steps % 50 == 0 else steps
    return [
        f"--dataset={dataset}", f"--model_dir={model_dir}", "--mode=train_and_eval", "--strategy=one_device",
        "--precision=float32", "--image_size=128", "--width_multiplier=0.25", "--batch_size=8",
        "--eval_batch_size=16", "--optimizer=adam", "--learning_rate=0.008", "--l2_weight_decay=0",
        "--weight_decay=0.0001", "--warmup_epochs=1", f"--steps_per_epoch={interval}",
        f"--epochs={steps // interval}", f"--checkpoint_every_steps={interval}",
        f"--eval_every_epochs={steps // interval}", f"--ema_momentum={ema}", "--mosaic_prob=0",
        "--mixup_prob=0", "--scale_min=0.75", "--scale_max=1.25", "--seed=0", "--verbose=2",
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="NAME=PATH, as train.py takes it.")
    parser.add_argument("--ema", default="0,0.9998", help="Comma-separated --ema_momentum values.")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="runs/ema_short_run")
    args, extra = parser.parse_known_args()
    rows = []
    for ema in args.ema.split(","):
        model_dir = os.path.abspath(os.path.join(args.out, f"ema_{ema}"))
        cmd = [sys.executable, os.path.join(REPO, "train.py"), *recipe(args.dataset, args.steps, model_dir, ema),
               "--fresh_start", *extra]
        start = time.time()
        log_path = model_dir + ".log"
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        with open(log_path, "w") as log:
            done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        if done.returncode:
            sys.exit(f"train.py failed for --ema_momentum={ema}; see {log_path}")
        with open(os.path.join(model_dir, "best.json")) as f:
            best = json.load(f)
        row = {"ema_momentum": float(ema), "step": best["step"], "minutes": round((time.time() - start) / 60, 1),
               "metrics": {name: {k: round(m[k], 4) for k in ("AP", "AP50", "AP75")}
                           for name, m in best["metrics"].items()}}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print("| --ema_momentum | step | dataset | AP | AP50 | AP75 |\n|---|---|---|---|---|---|")
    for row in rows:
        for name, m in row["metrics"].items():
            print(f"| {row['ema_momentum']} | {row['step']} | {name} | {m['AP']} | {m['AP50']} | {m['AP75']} |")


if __name__ == "__main__":
    main()
