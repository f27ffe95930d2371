"""COCO AP against training time on real datasets: ours alone, ours joint,
and keras-cv's YOLOv8 (the peer), each from random initialisation for the
same wall-clock training budget on this machine.

    pip install -e ".[bench]"
    python benchmarks/real_data.py                     # bccd + raccoon, 15 min per model and dataset
    python benchmarks/real_data.py --minutes=5 --eval_every_minutes=1
    python benchmarks/real_data.py --dataset=mine=/data/mine --val_split=mine=test

For each --dataset (any layout train.py accepts; default: the two real sets
in ../shared/data, BCCD evaluated on its test split):

  ours        `train.py --flagfile=configs/cpu_real.flags` on that dataset
              alone, --train_minutes=M, evaluated every --eval_every_minutes
              of training by train.py's own evaluator (EMA weights), then
              through its exported SavedModel (the `<name>_bytes`
              signature, exported with evaluation's score threshold 0.001)
              at the end;
  ours_joint  one model, every dataset, one head each, for M x (number of
              datasets) minutes: the same images per dataset as the single
              runs, i.e. equal total compute (skipped with one dataset);
  peer        keras-cv 0.9's YOLOV8Detector, "s" backbone from config, its
              own usual recipe (benchmarks/yolov8_peer.py), M minutes.

Training time is what callbacks.TrainingClock counts for all three: the
wall time of the train batches, evaluations excluded. Every model reads
the same converted TFRecords and is scored by pycocotools on the same
images (evaluation.CocoEvaluator). The runs go one after another, each in
its own process; the machine's load average is recorded before each.

Writes WORK/results.json, WORK/ap50_vs_minutes.png, logs in WORK/logs, a
markdown table on stdout, and ends with one JSON line:
{"ours": {NAME: {"AP", "AP50", "AP75", "images_per_s"}}, "ours_joint": {...},
"peer": {...}}.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATASETS = [f"bccd={ROOT}/../shared/data/bccd-coco", f"raccoon={ROOT}/../shared/data/raccoon-roboflow"]
DEFAULT_VAL_SPLIT = "bccd=test"
METRICS = ("AP", "AP50", "AP75")
EVAL_SCORE_THRESHOLD = 0.001


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", action="append", default=None, help="NAME=PATH, repeatable")
    p.add_argument("--val_split", default=None,
                   help="train.py's --val_split (default: bccd=test for the default datasets)")
    p.add_argument("--minutes", type=float, default=15.0, help="training budget per model and dataset")
    p.add_argument("--eval_every_minutes", type=float, default=3.0)
    p.add_argument("--flagfile", default=os.path.join(ROOT, "configs", "cpu_real.flags"))
    p.add_argument("--image_size", type=int, default=0, help="0: the flagfile's (every model trains at it)")
    p.add_argument("--work_dir", default=os.path.join(ROOT, "runs", "real_data"))
    p.add_argument("--models", default="ours,ours_joint,peer", help="comma list of ours,ours_joint,peer")
    p.add_argument("--peer_size", default="s", help="YOLOv8 backbone size (benchmarks/yolov8_peer.py)")
    p.add_argument("--peer_batch_size", type=int, default=0, help="0: the flagfile's --batch_size")
    p.add_argument("--train_flags", default="", help="extra train.py flags, space separated (tests)")
    p.add_argument("--merge", default="",
                   help="comma list of earlier runs' results.json: no training; the models of each file "
                        "(a later file's replace an earlier's) go into one results.json, table and plot in --work_dir")
    return p.parse_args(argv)


def read_flagfile(path):
    """{flag: value} of a train.py flagfile (the lines that set a flag)."""
    out = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("--") and "=" in line:
                key, _, value = line[2:].partition("=")
                out[key] = value
    return out


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def load_average():
    return round(os.getloadavg()[0], 2)


# ------------------------------------------------------------------ data
def convert(datasets, val_split, cache_dir):
    """{name: converted TFRecord folder}: the conversion train.py makes
    with --data_cache_dir=cache_dir (so it finds these and converts nothing)."""
    from effdet_tf.data import data_cache, layouts

    splits = layouts.parse_val_split(val_split or "", list(datasets))
    return {name: str(data_cache.ensure_tfrecords(path, cache_dir, name=name, val_split=splits[name]))
            for name, path in datasets.items()}


# ------------------------------------------------------------------ runs
def run_logged(cmd, log_path, history_path=None, label=""):
    """Runs cmd with its output in log_path; prints each new evaluation of
    history_path (train.py's eval/history.jsonl) while it runs."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    seen = 0
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        while proc.poll() is None:
            time.sleep(5)
            if history_path:
                records = read_history(history_path)
                for record in records[seen:]:
                    log(f"{label}: {format_record(record)}")
                seen = len(records)
    if proc.returncode:
        with open(log_path) as f:
            tail = "".join(f.readlines()[-30:])
        raise RuntimeError(f"{label}: {' '.join(cmd[:3])} ... failed ({proc.returncode}); {log_path} ends:\n{tail}")
    if history_path:
        for record in read_history(history_path)[seen:]:
            log(f"{label}: {format_record(record)}")


def read_history(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def format_record(record):
    parts = [f"{record['train_minutes']:.1f} min, step {record['step']}"]
    for name, m in record["metrics"].items():
        parts.append(f"{name} AP {m['AP']:.3f} AP50 {m['AP50']:.3f}")
    return "; ".join(parts)


def run_val_split(val_split, names):
    """--val_split for a run on `names`: the parts naming its datasets (a
    run on raccoon alone must not be told bccd=test)."""
    if not val_split or "=" not in val_split:
        return val_split
    items = [item.strip() for item in val_split.split(",") if item.strip()]
    return ",".join(item for item in items if item.partition("=")[0].strip() in names)


def run_ours(names, args, work, cache_dir, minutes, label):
    """train.py on `names` for `minutes`; returns its history and the
    SavedModel's final metrics per dataset."""
    model_dir = os.path.join(work, label)
    datasets = [f"--dataset={n}={args.datasets[n]}" for n in names]
    cmd = [sys.executable, "train.py", f"--flagfile={args.flagfile}", *datasets,
           f"--model_dir={model_dir}", f"--data_cache_dir={cache_dir}", "--fresh_start",
           f"--train_minutes={minutes}", f"--eval_every_minutes={args.eval_every_minutes}",
           f"--image_size={args.image_size}", "--export_after_training",
           # COCO AP counts low-scoring detections too: the SavedModel keeps
           # what evaluation scores (0.001, as the peer's decoder) instead of
           # the served default 0.05, which an early model may not reach.
           f"--score_threshold={EVAL_SCORE_THRESHOLD}", *args.train_flags.split()]
    split = run_val_split(args.val_split, names)
    if split:
        cmd.append(f"--val_split={split}")
    history_path = os.path.join(model_dir, "eval", "history.jsonl")
    if os.path.exists(history_path):
        os.remove(history_path)
    run_logged(cmd, os.path.join(work, "logs", f"{label}.log"), history_path, label)
    history = read_history(history_path)
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    images_per_step = sum(d["batch_size"] for d in config["data"]["datasets"])
    last = history[-1]
    # The first step (tracing) is not training time (TrainingClock).
    rate = images_per_step * (last["step"] - 1) / max(last["train_minutes"] * 60, 1e-9)
    export_root = os.path.join(model_dir, "export")
    version = max(int(v) for v in os.listdir(export_root) if v.isdigit())
    saved_model = os.path.join(export_root, str(version))
    out = {}
    for name in names:
        final = evaluate_saved_model(saved_model, name, args.tfrecord_dirs[name])
        out[name] = {**final, "images_per_s": round(rate, 3),
                     "history": [{"minutes": r["train_minutes"], "step": r["step"],
                                  **{k: r["metrics"][name][k] for k in METRICS}} for r in history]}
        log(f"{label} {name}: SavedModel AP {final['AP']:.3f} AP50 {final['AP50']:.3f} "
            f"AP75 {final['AP75']:.3f}; {rate:.2f} images/s")
    return out


def evaluate_saved_model(saved_model, name, tfrecord_dir):
    """COCO AP of the `<name>_bytes` signature on the val split's encoded
    images, as a TF Serving client would send them."""
    from effdet_tf import evaluation, tf_startup
    from effdet_tf.config import classes_from_label_map

    tf = tf_startup.import_tensorflow()

    with open(os.path.join(tfrecord_dir, "label_map.json")) as f:
        ids = [c.id for c in classes_from_label_map(json.load(f))]
    evaluator = evaluation.CocoEvaluator(os.path.join(tfrecord_dir, "val_annotations.json"), ids)
    signature = tf.saved_model.load(saved_model).signatures[f"{name}_bytes"]
    features = {"image/encoded": tf.io.FixedLenFeature([], tf.string),
                "image/source_id": tf.io.FixedLenFeature([], tf.string),
                "image/height": tf.io.FixedLenFeature([], tf.int64),
                "image/width": tf.io.FixedLenFeature([], tf.int64)}
    files = sorted(tf.io.gfile.glob(os.path.join(tfrecord_dir, "val-*.tfrecord")))
    for record in tf.data.TFRecordDataset(files):
        example = tf.io.parse_single_example(record, features)
        out = signature(image_bytes=tf.reshape(example["image/encoded"], [1]))
        height, width = int(example["image/height"]), int(example["image/width"])
        image_id = int(example["image/source_id"].numpy())
        n = int(out["num_detections"][0])
        results = []
        for box, score, cls in zip(out["detection_boxes"][0, :n].numpy(), out["detection_scores"][0, :n].numpy(),
                                   out["detection_classes"][0, :n].numpy()):
            y0, x0, y1, x1 = box[0] * height, box[1] * width, box[2] * height, box[3] * width
            if x1 > x0 and y1 > y0:
                results.append({"image_id": image_id, "category_id": int(cls), "score": float(score),
                                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]})
        evaluator.add_coco_results(results, image_ids=[image_id])
    metrics = evaluator.result()
    return {k: round(metrics[k], 4) for k in METRICS}


def run_peer(name, args, work, image_size, batch_size):
    out_json = os.path.join(work, f"peer_{name}.json")
    cmd = [sys.executable, os.path.join("benchmarks", "yolov8_peer.py"), f"--tfrecord_dir={args.tfrecord_dirs[name]}",
           f"--image_size={image_size}", f"--minutes={args.minutes}",
           f"--eval_every_minutes={args.eval_every_minutes}", f"--batch_size={batch_size}",
           f"--size={args.peer_size}", f"--json={out_json}"]
    run_logged(cmd, os.path.join(work, "logs", f"peer_{name}.log"), label=f"peer {name}")
    with open(out_json) as f:
        result = json.load(f)
    final = result["history"][-1]
    for r in result["history"]:
        log(f"peer {name}: {r['minutes']:.1f} min, step {r['step']}: AP {r['AP']:.3f} AP50 {r['AP50']:.3f}")
    return {**{k: round(final[k], 4) for k in METRICS}, "images_per_s": round(result["images_per_s"], 3),
            "parameters": result["parameters"], "history": result["history"]}


# ------------------------------------------------------------------ report
def table(results, names):
    rows = ["| model | dataset | AP | AP50 | AP75 | images/s | load before |", "|---|---|---|---|---|---|---|"]
    for model in ("ours", "ours_joint", "peer"):
        for name in names:
            r = results.get(model, {}).get(name)
            if r:
                rows.append(f"| {model} | {name} | {r['AP']:.3f} | {r['AP50']:.3f} | {r['AP75']:.3f} | "
                            f"{r['images_per_s']:.2f} | {r.get('load', '')} |")
    return "\n".join(rows)


def plot(results, names, path):
    """AP50 against training minutes, one panel per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"ours": ("tab:blue", "-"), "ours_joint": ("tab:green", "--"), "peer": ("tab:red", "-")}
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        for model, (colour, line) in styles.items():
            r = results.get(model, {}).get(name)
            if not r:
                continue
            xs = [0.0] + [h["minutes"] for h in r["history"]]
            ys = [0.0] + [h["AP50"] for h in r["history"]]
            label = {"ours": "ours (this dataset)", "ours_joint": "ours, joint (all datasets)",
                     "peer": "keras-cv YOLOv8"}[model]
            ax.plot(xs, ys, line, color=colour, marker="o", markersize=3, label=label)
        ax.set_title(name)
        ax.set_xlabel("training minutes (2 CPU cores)")
        ax.set_ylabel("COCO AP50")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plot(results, names, work):
    try:
        plot(results, names, os.path.join(work, "ap50_vs_minutes.png"))
        log(f"plot: {os.path.join(work, 'ap50_vs_minutes.png')}")
    except ImportError:
        log("matplotlib is not installed (pip install -e '.[bench]'): no plot")


def merge_runs(paths, work):
    """One results.json, table and plot from several runs (e.g. ours and the
    peer in one run, the joint model in another): what a budget too long
    for one sitting needs."""
    results = {"ours": {}, "ours_joint": {}, "peer": {}}
    metas = []
    for path in paths:
        with open(path) as f:
            run = json.load(f)
        metas.append({"from": os.path.abspath(path), **run.get("meta", {})})
        for model in results:
            results[model].update(run.get(model, {}))
    names = list(dict.fromkeys(name for per in results.values() for name in per))
    os.makedirs(work, exist_ok=True)
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump({"meta": {"merged": metas}, **results}, f, indent=1)
    print(table(results, names))
    write_plot(results, names, work)
    return results


def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        return merge_runs(args.merge.split(","), os.path.abspath(args.work_dir))
    specs = args.dataset or DEFAULT_DATASETS
    if args.dataset is None and args.val_split is None:
        args.val_split = DEFAULT_VAL_SPLIT
    args.datasets = dict(s.split("=", 1) for s in specs)
    names = list(args.datasets)
    models = set(args.models.split(","))
    work = os.path.abspath(args.work_dir)
    os.makedirs(work, exist_ok=True)
    cache_dir = os.path.join(work, "data_cache")
    flags = read_flagfile(args.flagfile)
    image_size = args.image_size = args.image_size or int(flags.get("image_size", 512))
    batch_size = args.peer_batch_size or int(flags.get("batch_size", 8))
    log(f"datasets {args.datasets}; {args.minutes:g} min per model and dataset; {image_size} px; "
        f"{os.cpu_count()} CPUs; load {load_average()}")
    args.tfrecord_dirs = convert(args.datasets, args.val_split, cache_dir)

    results = {"ours": {}, "ours_joint": {}, "peer": {}}
    for name in names:
        if "ours" in models:
            load = load_average()
            results["ours"].update({k: {**v, "load": load} for k, v in
                                    run_ours([name], args, work, cache_dir, args.minutes, f"ours_{name}").items()})
        if "peer" in models:
            load = load_average()
            results["peer"][name] = {**run_peer(name, args, work, image_size, batch_size), "load": load}
    if "ours_joint" in models and len(names) > 1:
        load = load_average()
        joint = run_ours(names, args, work, cache_dir, args.minutes * len(names), "ours_joint")
        results["ours_joint"] = {k: {**v, "load": load} for k, v in joint.items()}

    meta = {"minutes": args.minutes, "image_size": image_size, "flagfile": os.path.relpath(args.flagfile, ROOT),
            "datasets": args.datasets, "val_split": args.val_split, "cpus": os.cpu_count()}
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump({"meta": meta, **results}, f, indent=1)
    print(table(results, names))
    write_plot(results, names, work)
    summary = {model: {name: {k: r[k] for k in (*METRICS, "images_per_s")} for name, r in per.items()}
               for model, per in results.items()}
    print(json.dumps(summary))
    return results


if __name__ == "__main__":
    main()
