"""YOLOv4's bag of freebies on real data: each one on against off, same run.

Trains configs/cpu_real.flags (the CPU recipe for a real dataset) from
random weights for a fixed number of steps on each dataset, once per
variant (the recipe plus one flag) and seed, and prints the COCO metrics of
the last evaluation (the EMA weights, what export takes), one JSON line per
run, then a markdown table of each variant's median over its seeds and its
difference from the recipe's. The length is in steps, not minutes, so
that a variant is judged on what it learns per step whatever else the
machine runs; the wall-clock minutes of each run are printed beside it
(a freebie that costs time shows there).

    python benchmarks/freebies.py --dataset=raccoon=../shared/data/raccoon-roboflow \
        --steps=500 --seeds=0,1 --out=runs/freebies
    python benchmarks/freebies.py --dataset=bccd=../shared/data/bccd-coco \
        --steps=500 --seeds=0,1 --out=runs/freebies --val_split=test

A variant is NAME=FLAGS (FLAGS space separated; "off" is the recipe
itself); `--seeds_of_others` sets how many seeds the other variants get
(the recipe's spread over --seeds says how large a difference is noise).
Any extra arguments go to every train.py run as they are (BCCD is scored
on its test split, as in benchmarks/real_data.py: `--val_split=test`).
Results: OUT/results_<datasets>.json.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# cpu_real.flags has trained with CIoU since it beat Huber here (BENCHMARKS.md): Huber is the variant now.
VARIANTS = ("off=", "label_smoothing=--label_smoothing=0.1", "blur=--blur_prob=0.2", "huber=--box_loss=huber",
            "cutmix=--cutmix_prob=0.5")
STEPS_PER_EPOCH = 20  # the raccoon set once (160 images / 8): warm-up length, checkpoint interval


def train_flags(dataset, model_dir, steps, seed):
    """cpu_real.flags for `steps` steps with one evaluation, at the end."""
    if steps % STEPS_PER_EPOCH:
        raise SystemExit(f"--steps={steps}: must be a multiple of {STEPS_PER_EPOCH}")
    epochs = steps // STEPS_PER_EPOCH
    return [
        "--flagfile=" + os.path.join(REPO, "configs", "cpu_real.flags"), f"--dataset={dataset}",
        f"--model_dir={model_dir}", f"--steps_per_epoch={STEPS_PER_EPOCH}", f"--epochs={epochs}",
        f"--eval_every_epochs={epochs}", f"--checkpoint_every_steps={STEPS_PER_EPOCH}", f"--seed={seed}",
        "--tensorboard_images=0", "--fresh_start", "--verbose=2",
    ]


def run_one(dataset, variant, flags, seed, steps, out, extra):
    name = dataset.split("=", 1)[0]
    model_dir = os.path.abspath(os.path.join(out, f"{name}_{variant}_seed{seed}"))
    cmd = [sys.executable, os.path.join(REPO, "train.py"), *train_flags(dataset, model_dir, steps, seed),
           *flags.split(), *extra]
    log_path = model_dir + ".log"
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    start = time.time()
    with open(log_path, "w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, check=False)
    if done.returncode:
        sys.exit(f"train.py failed ({name}, {variant}, seed {seed}); see {log_path}")
    with open(os.path.join(model_dir, "eval", "history.jsonl")) as f:
        last = [json.loads(line) for line in f if line.strip()][-1]
    metrics = last["metrics"][name]
    return {"dataset": name, "variant": variant, "flags": flags, "seed": seed, "step": last["step"],
            "minutes": round((time.time() - start) / 60, 2),
            **{k: round(metrics[k], 4) for k in ("AP", "AP50", "AP75")}}


def table(rows):
    """Markdown: per dataset and variant, the median over seeds and the
    difference from the recipe's ("off") median."""
    lines = ["| dataset | variant | seeds | AP | AP50 | AP75 | AP vs off | AP50 vs off | minutes per run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        medians = {}
        for variant in dict.fromkeys(r["variant"] for r in rows if r["dataset"] == dataset):
            mine = [r for r in rows if r["dataset"] == dataset and r["variant"] == variant]
            medians[variant] = {k: statistics.median(r[k] for r in mine) for k in ("AP", "AP50", "AP75", "minutes")}
            medians[variant]["seeds"] = len(mine)
            medians[variant]["spread"] = {k: (min(r[k] for r in mine), max(r[k] for r in mine))
                                          for k in ("AP", "AP50")}
        base = medians.get("off")
        for variant, m in medians.items():
            vs = ("", "") if base is None or variant == "off" else (
                f"{m['AP'] - base['AP']:+.3f}", f"{m['AP50'] - base['AP50']:+.3f}")
            ap = f"{m['AP']:.3f}"
            if m["seeds"] > 1:
                ap += " ({:.3f}-{:.3f})".format(*m["spread"]["AP"])
            lines.append(f"| {dataset} | {variant} | {m['seeds']} | {ap} | {m['AP50']:.3f} | {m['AP75']:.3f} | "
                         f"{vs[0]} | {vs[1]} | {m['minutes']:.1f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", action="append", required=True, help="NAME=PATH, repeatable")
    parser.add_argument("--variant", action="append", default=None,
                        help=f"NAME=FLAGS, repeatable (default: {', '.join(VARIANTS)})")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seeds", default="0,1", help="seeds of the recipe itself (off)")
    parser.add_argument("--seeds_of_others", type=int, default=1, help="how many of --seeds the variants get")
    parser.add_argument("--out", default=os.path.join(REPO, "runs", "freebies"))
    args, extra = parser.parse_known_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = [v.split("=", 1) for v in (args.variant or VARIANTS)]
    rows = []
    for dataset in args.dataset:
        for variant, flags in variants:
            for seed in seeds if variant == "off" else seeds[: args.seeds_of_others]:
                rows.append(run_one(dataset, variant, flags, seed, args.steps, args.out, extra))
                print(json.dumps(rows[-1]), flush=True)
    names = "_".join(d.split("=", 1)[0] for d in args.dataset)
    with open(os.path.join(args.out, f"results_{names}.json"), "w") as f:
        json.dump({"steps": args.steps, "argv": sys.argv[1:], "runs": rows}, f, indent=1)
    print(table(rows), flush=True)


if __name__ == "__main__":
    main()
