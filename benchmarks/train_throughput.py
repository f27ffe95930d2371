"""Training throughput (images/s) and peak memory of a train.py config.

    python benchmarks/train_throughput.py --flagfile=configs/demo.flags --steps=20
    python benchmarks/train_throughput.py --flagfile=configs/d0_csp.flags --batch_size=4 --steps=6

Runs train_lib's own model, optimizer and input pipeline (the flags' config,
model dir under /tmp unless --model_dir is given after the flagfile) for
--warmup + --steps steps of model.fit and reports the median images/s over
the timed steps (the first steps trace the graph and fill the pipeline) and
the process's peak resident memory (ru_maxrss). The CPU may be shared: note
the load average printed with the result.
"""

import os
import resource
import sys
import tempfile
import time

from absl import flags as absl_flags

from effdet_tf import flags

absl_flags.DEFINE_integer("steps", 10, "Timed steps.")
absl_flags.DEFINE_integer("warmup", 2, "Untimed first steps (tracing, pipeline fill).")


def main(argv):
    import dataclasses

    import keras
    import numpy as np

    from effdet_tf import train_lib

    flags.define_flags()
    absl_flags.FLAGS(argv)
    config = flags.config_from_flags()
    t = config.train
    model_dir = tempfile.mkdtemp(prefix="effdet_bench_") if "runs/" in t.model_dir else t.model_dir
    config = config.replace(train=dataclasses.replace(
        t, model_dir=model_dir, mode="train", export_after_training=False, visualize_after_training=False))
    config, strategy, _ = train_lib.prepare(config)
    steps = absl_flags.FLAGS.warmup + absl_flags.FLAGS.steps
    model = train_lib.build_model(config, strategy, steps_per_epoch=steps)
    dataset = train_lib.train_data(config, model)
    times = []

    class Timer(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            times.append(time.perf_counter())

    start = time.perf_counter()
    model.fit(dataset, epochs=1, steps_per_epoch=steps, callbacks=[Timer()], verbose=0, shuffle=False)
    per_step = np.diff(times[absl_flags.FLAGS.warmup - 1:]) if absl_flags.FLAGS.warmup else np.diff([start] + times)
    images = config.data.images_per_step
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"config: image_size={config.model.image_size} width={config.model.width_multiplier} "
          f"images/step={images} precision={t.precision} replicas={strategy.num_replicas_in_sync}")
    print(f"first {absl_flags.FLAGS.warmup} steps (trace + pipeline fill): {times[absl_flags.FLAGS.warmup - 1] - start:.1f} s")
    print(f"train images/s: median {images / np.median(per_step):.2f}, "
          f"mean {images * len(per_step) / per_step.sum():.2f} over {len(per_step)} steps")
    print(f"peak RSS: {rss_gb:.2f} GB; load average: {os.getloadavg()}")


if __name__ == "__main__":
    main(sys.argv)
