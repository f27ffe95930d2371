"""Train input pipeline throughput (images/s) next to two same-run baselines.

  floor  read + decode + letterbox resize (the package's, as fast as the
         full pipeline's) + batch: no pipeline can beat it.
  naive  decode, resize (plain tf.image.resize), ragged batch, keras-cv
         Mosaic, keras-cv MixUp, the layers called as documented (the
         composition issue 3 measured).
  full   effdet_tf.data.pipeline.train_dataset with its defaults: shuffle,
         decode, scale / translate / flip, Mosaic (p=0.5), MixUp (p=0.15),
         anchor targets with the model's LabelEncoder (49,104 anchors at
         512, XLA-compiled), batch, HSV jitter + float32. Its default
         cache="auto" keeps decoded images in memory for datasets whose
         shards total <= 32 MiB (the real samples: 6.8 MB).
  full_uncached  the same with `cache=False`: decodes every image every
         time, as a large dataset (COCO) would.

Every pipeline reads the same TFRecords, repeats forever, is run once for
--prewarm batches (one-time costs: XLA compiles of the label encoder's
box-count buckets, the decode cache), then is timed in rounds: each round
makes a fresh iterator per pipeline (after the previous one's threads have
gone idle), warms it up, then times `--batches` batches. Pipelines
alternate within a round so a load change on a shared machine hits all of
them. Reported: medians over rounds with the ratios of those medians, and
the median over rounds of each round's own ratio (paired: steadier under a
changing load), both as wall-clock images/s and as process CPU
milliseconds per image (the cost; on a machine shared with other jobs the
wall clock partly measures the neighbours, and the CPU ratio is the
throughput ratio the pipelines would have alone).

  python benchmarks/input_pipeline.py                       # real samples
  python benchmarks/input_pipeline.py --records='/data/coco/train-*.tfrecord'
  python benchmarks/input_pipeline.py --pipelines=floor,full --rounds=3

Without --records the two real COCO samples (../shared/data, train splits)
are converted once into --work_dir with effdet_tf.data.coco_tfrecord.
"""

import os
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import gc
import glob
import json
import os
import statistics
import time

import keras_cv
import tensorflow as tf

from effdet_tf.data import augment as augment_lib
from effdet_tf.data import decoder
from effdet_tf.data import pipeline
from effdet_tf.ops.anchors import Anchors
from effdet_tf.ops.label_encoder import LabelEncoder

AUTOTUNE = tf.data.AUTOTUNE
_HERE = os.path.dirname(os.path.abspath(__file__))
_SAMPLES = os.path.normpath(os.path.join(_HERE, "..", "..", "shared", "data"))


def _convert_samples(sample_root, work_dir):
    """COCO roots under sample_root -> train TFRecords; returns a glob."""
    from effdet_tf.data import coco_tfrecord

    roots = sorted(
        d for d in glob.glob(os.path.join(sample_root, "*"))
        if os.path.isdir(os.path.join(d, "annotations"))
    )
    if not roots:
        raise SystemExit(f"no COCO roots under {sample_root}; pass --records")
    for root in roots:
        out = os.path.join(work_dir, os.path.basename(root))
        if not glob.glob(os.path.join(out, "train-*.tfrecord")):
            coco_tfrecord.convert_coco(
                root, output_dir=out, split="train", progress=False,
                verbose=False,
            )
    return os.path.join(work_dir, "*", "train-*.tfrecord")


def _source(pattern, seed):
    files = sorted(tf.io.gfile.glob(pattern))
    ds = tf.data.Dataset.from_tensor_slices(files).interleave(
        tf.data.TFRecordDataset, cycle_length=len(files),
        num_parallel_calls=AUTOTUNE,
    )
    return ds.repeat().shuffle(256, seed=seed)


def _decode_letterbox(record, size, resize=None):
    """Decode + letterbox: the package's (`pipeline.letterbox`, the floor's)
    or, with `resize`, the same geometry through that resize function."""
    example = decoder.decode_example(record)
    if resize is None:
        image, scale = pipeline.letterbox(example["image"], size)
    else:
        shape = tf.cast(tf.shape(example["image"])[:2], tf.float32)
        scale = size / tf.reduce_max(shape)
        new_size = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), 1)
        image = tf.image.pad_to_bounding_box(
            resize(example["image"], new_size), 0, 0, size, size)
    return image, example["boxes"] * scale, example["classes"]


def floor_dataset(pattern, size, batch, seed):
    ds = _source(pattern, seed).map(
        lambda r: _decode_letterbox(r, size)[0], num_parallel_calls=AUTOTUNE
    )
    return ds.batch(batch, drop_remainder=True).prefetch(AUTOTUNE)


def naive_dataset(pattern, size, batch, seed):
    mosaic = keras_cv.layers.Mosaic(bounding_box_format="yxyx")
    mixup = keras_cv.layers.MixUp()

    def to_kcv(record):
        # Plain tf.image.resize, as a user would write it (the package's
        # letterbox casts to float32 first, which is faster on CPU).
        image, boxes, classes = _decode_letterbox(record, size, tf.image.resize)
        return {
            "images": image,
            "bounding_boxes": {
                "boxes": boxes, "classes": tf.cast(classes, tf.float32)
            },
        }

    ds = _source(pattern, seed).map(to_kcv, num_parallel_calls=AUTOTUNE)
    ds = ds.ragged_batch(batch, drop_remainder=True)
    ds = ds.map(mosaic, num_parallel_calls=AUTOTUNE)
    ds = ds.map(mixup, num_parallel_calls=AUTOTUNE)
    return ds.prefetch(AUTOTUNE)


def full_dataset(pattern, size, batch, seed, encoder, cache="auto", jit=True):
    return pipeline.train_dataset(
        pattern, batch, size, encoder,
        augment_lib.AugmentConfig(), cache=cache, seed=seed,
        jit_label_encoder=jit,
    )


def _quiesce(limit_s=5.0, step_s=0.1):
    """Waits until the process uses < 10% of a core (or `limit_s`).

    A deleted iterator's threads finish their in-flight map calls (a naive
    Mosaic call on a batch takes ~0.1 s) after `del`; without this wait
    that work would land in the next pipeline's timed window, because the
    CPU time measured is the whole process's.
    """
    deadline = time.perf_counter() + limit_s
    while time.perf_counter() < deadline:
        cpu = time.process_time()
        time.sleep(step_s)
        if time.process_time() - cpu < 0.1 * step_s:
            return


def _time(ds, warmup, batches, batch):
    """-> (images/s, CPU ms per image) over `batches` after `warmup`.

    CPU time is the process's (all threads): on a machine shared with other
    jobs it measures the pipeline's cost even when its wall time is noise.
    """
    _quiesce()
    iterator = iter(ds)
    for _ in range(warmup):
        next(iterator)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(iterator)
    images = max(batches * batch, 1)
    rate = images / (time.perf_counter() - start)
    cpu_ms = (time.process_time() - cpu) / images * 1e3
    del iterator
    gc.collect()
    return rate, cpu_ms


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", default="", help="TFRecord glob; default: convert the real samples")
    parser.add_argument("--samples", default=_SAMPLES, help="folder of COCO roots to convert")
    parser.add_argument("--work_dir", default="/tmp/effdet_tf_bench_records")
    parser.add_argument("--image_size", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--pipelines", default="floor,naive,full,full_uncached")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=8, help="batches per round before timing")
    parser.add_argument("--batches", type=int, default=25, help="timed batches per round")
    parser.add_argument("--prewarm", type=int, default=100,
                        help="untimed batches per pipeline once, before round 1")
    parser.add_argument("--no_jit", action="store_true", help="label encoder without XLA")
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args(argv)

    pattern = args.records or _convert_samples(args.samples, args.work_dir)
    files = tf.io.gfile.glob(pattern)
    num_images = sum(1 for f in files for _ in tf.data.TFRecordDataset(f))
    print(f"{len(files)} files, {num_images} images: {pattern}")

    size, batch = args.image_size, args.batch_size
    # One encoder for the full variants, as train_lib shares one between
    # datasets: its compiled programs are shared too.
    encoder = LabelEncoder(Anchors(size))
    builders = {
        "floor": lambda: floor_dataset(pattern, size, batch, 0),
        "naive": lambda: naive_dataset(pattern, size, batch, 0),
        "full": lambda: full_dataset(pattern, size, batch, 0, encoder, jit=not args.no_jit),
        "full_uncached": lambda: full_dataset(
            pattern, size, batch, 0, encoder, cache=False, jit=not args.no_jit
        ),
        "full_cached": lambda: full_dataset(
            pattern, size, batch, 0, encoder, cache=True, jit=not args.no_jit
        ),
    }
    names = [n for n in args.pipelines.split(",") if n]
    datasets = {n: builders[n]() for n in names}
    # Steady state: the full pipeline XLA-compiles its label encoder once
    # per box-count bucket (~0.35 s CPU each), when a bucket first occurs.
    # A training run amortises these; a short timed window would not.
    for n in names:
        _time(datasets[n], args.prewarm, 0, batch)
    rates = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for r in range(args.rounds):
        for n in names:
            rate, cpu_ms = _time(datasets[n], args.warmup, args.batches, batch)
            rates[n].append(rate)
            cpu[n].append(cpu_ms)
        print(f"round {r + 1}: " + ", ".join(
            f"{n} {rates[n][-1]:.1f} img/s ({cpu[n][-1]:.2f} cpu-ms/img)"
            for n in names))

    med = {n: statistics.median(v) for n, v in rates.items()}
    med_cpu = {n: statistics.median(v) for n, v in cpu.items()}
    print(f"\nat {size}, batch {batch}: median of {args.rounds} rounds x "
          f"{args.batches} batches ({os.cpu_count()} cores)")
    print(f"  {'pipeline':14s} {'img/s':>8s} {'x floor':>8s} {'x naive':>8s}"
          f" {'cpu-ms/img':>11s} {'x floor':>8s} {'x naive':>8s}")
    for n in names:
        cells = [f"{med[n]:8.1f}"]
        for base in ("floor", "naive"):
            ok = base in med and n != base
            cells.append(f"{med[n] / med[base]:8.2f}" if ok else f"{'':8s}")
        cells.append(f"{med_cpu[n]:11.2f}")
        # CPU cost ratio as a throughput ratio: base cost / this cost.
        for base in ("floor", "naive"):
            ok = base in med_cpu and n != base
            cells.append(f"{med_cpu[base] / med_cpu[n]:8.2f}" if ok else f"{'':8s}")
        print(f"  {n:14s} " + " ".join(cells))

    # Paired: each round's ratio to the baselines timed in that same round,
    # then the median (and range) over rounds. A load change between
    # rounds moves a pipeline and its baselines together, so these vary
    # less than the ratios of the medians above.
    print("\n  same-round ratios, median (min-max) over rounds:")
    print(f"  {'pipeline':14s} {'x floor':>17s} {'x naive':>17s}"
          f" {'x floor (CPU)':>17s} {'x naive (CPU)':>17s}")
    paired = {}
    for n in names:
        cells = []
        for values, invert in ((rates, False), (cpu, True)):
            for base in ("floor", "naive"):
                if base not in values or n == base:
                    cells.append(f"{'':>17s}")
                    continue
                ratios = [(b / a if invert else a / b)
                          for a, b in zip(values[n], values[base])]
                paired[f"{n}/{base}/{'cpu' if invert else 'wall'}"] = ratios
                cells.append(f"{statistics.median(ratios):5.2f} "
                             f"({min(ratios):4.2f}-{max(ratios):4.2f})")
        print(f"  {n:14s} " + " ".join(cells))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"images_per_s": rates, "cpu_ms_per_image": cpu,
                       "median_images_per_s": med, "median_cpu_ms": med_cpu,
                       "same_round_ratios": paired,
                       "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()
