"""Training and evaluation workflow: strategy, data, model, optimizer, fit.

`run(config)` is what train.py calls with the frozen Config. `model.fit`
drives training (the Detector's compute_loss), so Keras callbacks,
distribution strategies and mixed precision behave as Keras users expect.

Steps, epochs and resuming. fit's epochs are checkpoint intervals
(intervals.py). ResumableBackup saves the full state (weights, optimizer
slots, EMA, loss scale, step) at every interval end, and a restarted run
starts fit at the interval of the saved step and seeds its input stream
with the step (train_data), so it continues at the saved step with data it
has not just trained on.
"""

import dataclasses
import json
import math
import os
import shutil
import sys

import keras
import tensorflow as tf
from absl import logging

from effdet_tf import callbacks as callbacks_lib
from effdet_tf import checkpoint, compat, evaluation, label_audit, optimization, transfer
from effdet_tf.config import Config, ConfigError, check_replicas, classes_from_label_map
from effdet_tf.intervals import Intervals
from effdet_tf.modeling import factory

# ---------------------------------------------------------------- strategy
def make_strategy(name):
    if name == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker":
        if not os.environ.get("TF_CONFIG"):
            raise ConfigError("--strategy=multi_worker needs the TF_CONFIG environment variable "
                              "(cluster and task of this worker).")
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        compat.patch_multi_worker_logs()
        return strategy
    raise ConfigError(f"--strategy={name}: unknown strategy.")


def num_workers(config: Config):
    """Machines (TF_CONFIG's chief and worker tasks) of a multi_worker run;
    1 otherwise. Read before the strategy exists: the converter writes at
    least this many shards, so each worker reads whole files of its own."""
    if config.train.strategy != "multi_worker":
        return 1
    try:
        cluster = json.loads(os.environ.get("TF_CONFIG") or "{}").get("cluster", {})
    except ValueError as e:
        raise ConfigError(f"TF_CONFIG is not JSON: {e}") from None
    return max(1, len(cluster.get("chief", [])) + len(cluster.get("worker", [])))


def is_chief(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "cluster_spec", None) or not resolver.cluster_spec().as_dict():
        return True
    return resolver.task_type in ("chief", None) or (
        resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in resolver.cluster_spec().as_dict())


# ---------------------------------------------------------------- data
def generate_demo_data(root, seed):
    """Writes the demo dataset pair into `root` once (tmp + rename, so a
    concurrent worker or a killed run never sees half of it)."""
    from effdet_tf.data import synthetic

    if os.path.isdir(root):
        return
    parent = os.path.dirname(root.rstrip("/")) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = f"{root}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    logging.info("Generating the demo datasets into %s", root)
    synthetic.make_demo_datasets(tmp, seed=seed)
    try:
        os.rename(tmp, root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isdir(root):
            raise


def _count_records(pattern):
    files = tf.io.gfile.glob(pattern)
    return sum(1 for f in files for _ in tf.data.TFRecordDataset(f))


def resolve_datasets(config: Config) -> Config:
    """Converts COCO roots into TFRecords (cache dir, never the source) and
    fills each dataset's label map and training-set size from the
    converter's output. Logs which split trains and which evaluates (the
    one written as val: --val_split, else val, valid, test)."""
    from effdet_tf.data import data_cache, layouts
    from effdet_tf.data.coco_checks import ConversionError

    cache = config.data.data_cache_dir or os.path.join(config.train.model_dir, "data_cache")
    try:
        val_splits = layouts.parse_val_split(config.data.val_split, config.data.head_names)
    except ConversionError as e:
        raise ConfigError(str(e)) from None
    # Several machines: a shard per worker at least (one machine keeps the
    # conversions it made before, whose fingerprint has no min_shards).
    workers = num_workers(config)
    shards = {"min_shards": workers} if workers > 1 else {}
    resolved = []
    for ds in config.data.datasets:
        try:
            tf_dir = str(data_cache.ensure_tfrecords(ds.path, cache, name=ds.name,
                                                     val_split=val_splits[ds.name], **shards))
        except ConversionError as e:
            raise ConfigError(f"--dataset={ds.name}={ds.path}: {e}") from None
        logging.info("Dataset %s %s", ds.name, data_cache.describe_conversion(tf_dir))
        with open(os.path.join(tf_dir, "label_map.json")) as f:
            classes = classes_from_label_map(json.load(f))
        report = os.path.join(tf_dir, "report_train.json")
        n = 0
        if os.path.exists(report):
            with open(report) as f:
                n = int(json.load(f).get("images", {}).get("written", 0))
        n = n or _count_records(os.path.join(tf_dir, "train-*.tfrecord"))
        if n == 0:
            raise ConfigError(f"--dataset={ds.name}={ds.path}: no training images in {tf_dir}.")
        if ds.trains and n < workers:
            raise ConfigError(f"--dataset={ds.name}={ds.path}: {n} training images for {workers} "
                              "workers; each worker needs one of its own at least.")
        resolved.append(dataclasses.replace(ds, tfrecord_dir=tf_dir, classes=classes, num_train_examples=n))
    return config.with_datasets(resolved)


def schedule_lengths(config: Config) -> Intervals:
    """The run's epochs as checkpoint intervals; an epoch is --steps_per_epoch
    or one pass over the largest training dataset."""
    t = config.train
    steps = t.steps_per_epoch or max(
        math.ceil(d.num_train_examples / d.batch_size) for d in config.data.training_datasets)
    return Intervals.plan(steps, t.checkpoint_every_steps, t.epochs)


def train_data(config: Config, detector, start_step=0, input_context=None):
    """({name: images}, {name: targets}) batches of one input pipeline.

    Without `input_context`: the global batch per dataset, all records.
    With one (tf.distribute.InputContext, from distributed_train_data):
    this worker's pipeline, which reads only its share of each dataset's
    records (pipeline.train_dataset's `shard`) and batches its replicas'
    share of the global batch, so N workers decode, augment and encode
    each record once between them, not N times.

    The stream is a function of (--seed, worker, start_step): a run resumed
    at step s reads a stream seeded with s, so it neither replays the
    batches it trained on before the kill nor costs the time to skip past
    them (Dataset.skip would run the whole augmentation for every skipped
    step); each worker draws its own Mosaic layouts and colours.
    """
    from effdet_tf.data import pipeline
    from effdet_tf.ops.label_encoder import LabelEncoder

    d = config.data
    workers, worker = 1, 0
    if input_context is not None:
        workers, worker = input_context.num_input_pipelines, input_context.input_pipeline_id
    encoder = LabelEncoder(detector.anchors)
    per_dataset = {}
    for i, ds in enumerate(d.training_datasets):
        batch_size = ds.batch_size
        if input_context is not None:
            batch_size = input_context.get_per_replica_batch_size(ds.batch_size)
        per_dataset[ds.name] = pipeline.train_dataset(
            os.path.join(ds.tfrecord_dir, "train-*.tfrecord"),
            batch_size=batch_size,
            image_size=config.model.image_size,
            label_encoder=encoder,
            augment=config.augment,
            shuffle_buffer=d.shuffle_buffer,
            cache={"auto": "auto", "yes": True, "no": False}[d.cache_images],
            seed=(d.seed * 1_000_003 + 7919 * i + 104_729 * worker + start_step) % (2**31 - 1),
            shard=(workers, worker) if workers > 1 else None,
        )
    return pipeline.multi_dataset(per_dataset)


# --precise_bn_batches reads its own copy of the training stream, seeded
# apart from the training one (train_data's seed moves with start_step).
PRECISE_BN_STREAM = 1 << 30


def batchnorm_refresh(config: Config, detector, start_step=0):
    """optimization.BatchNormRefresh over a training pipeline of its own
    (images only, not cached in memory a second time), or None when
    --precise_bn_batches is 0."""
    n = config.train.precise_bn_batches
    if not n:
        return None
    uncached = dataclasses.replace(config, data=dataclasses.replace(config.data, cache_images="no"))
    images = train_data(uncached, detector, start_step=PRECISE_BN_STREAM + start_step).map(lambda x, y: x)
    return optimization.BatchNormRefresh(detector, images, n)


def distributed_train_data(config: Config, strategy, detector, start_step=0):
    """train_data built once per input pipeline (worker) by the strategy,
    each batched per replica: what model.fit trains on."""
    return strategy.distribute_datasets_from_function(
        lambda context: train_data(config, detector, start_step, input_context=context))


def eval_data(config: Config, split="val"):
    """{name: (eval dataset, CocoEvaluator)} for datasets that have `split`."""
    from effdet_tf.data import pipeline

    out = {}
    for ds in config.data.datasets:
        gt = os.path.join(ds.tfrecord_dir, f"{split}_annotations.json")
        pattern = os.path.join(ds.tfrecord_dir, f"{split}-*.tfrecord")
        if not os.path.exists(gt) or not tf.io.gfile.glob(pattern):
            logging.warning("Dataset %s has no %s split: not evaluated.", ds.name, split)
            continue
        dataset = pipeline.eval_dataset(pattern, batch_size=config.data.eval_batch_size,
                                        image_size=config.model.image_size)
        out[ds.name] = (dataset, evaluation.CocoEvaluator(gt, [c.id for c in ds.classes]))
    return out


# ---------------------------------------------------------------- model
def set_sync_batchnorm(model):
    """Cross-replica BatchNorm statistics (read by BN at call time)."""
    n = 0
    for layer in compat.sublayers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = True
            n += 1
    logging.info("Synchronised BatchNorm in %d layers.", n)


def build_model(config: Config, strategy, steps_per_epoch):
    with strategy.scope():
        detector = factory.build_detector(config)
        if config.train.sync_batchnorm:
            set_sync_batchnorm(detector)
        transfer.apply_freeze(detector, config.train.freeze)  # before the optimizer picks its variables
        optimizer = optimization.make_optimizer(config.train, detector, config.data.images_per_step,
                                                steps_per_epoch)
        detector.compile(optimizer=optimizer, l2_weight_decay=config.train.l2_weight_decay,
                         l2_variables=optimization.decay_variables(detector))
        optimizer.build(detector.trainable_variables)
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        compat.skip_symbolic_build(detector)  # model and optimizer are built above
    return detector


# ---------------------------------------------------------------- workflows
def prepare(config: Config):
    """Strategy, precision, data conversion and the model dir check.
    Returns (resolved config, strategy, is_chief)."""
    # Data first: the converter forks worker processes, which must not
    # inherit the threads a (multi-worker) strategy starts.
    if config.train.generate_demo_data:
        generate_demo_data(config.train.generate_demo_data, config.data.seed)
    config = transfer.plan(resolve_datasets(config))
    strategy = make_strategy(config.train.strategy)
    check_replicas(config, strategy.num_replicas_in_sync)
    keras.mixed_precision.set_global_policy(config.train.precision)
    chief = is_chief(strategy)
    checkpoint.prepare_model_dir(config, write=chief)
    if chief:
        label_audit.write_label_audit(config, config.train.model_dir)
    return config, strategy, chief


def fit_verbosity(verbose, stream=None):
    """--verbose=-1: Keras's live bar on a terminal; one line per fit epoch
    (checkpoint interval) when stdout is a file, where the bar's per-step
    redraws would fill the log (the demo's 6-minute log was 380 KB)."""
    if verbose >= 0:
        return verbose
    stream = stream or sys.stdout
    return 1 if getattr(stream, "isatty", lambda: False)() else 2


def train(config: Config, strategy, chief=True, evaluate_during=True):
    t = config.train
    model_dir = t.model_dir
    keras.utils.set_random_seed(config.data.seed)
    intervals = schedule_lengths(config)
    model = build_model(config, strategy, intervals.steps_per_epoch)

    state = checkpoint.restore_training_state(model, model_dir)
    step = int(state["step"]) if state else 0
    if state is None and t.init_from:
        transfer.load_initial_weights(model, config)
    elif state is None and t.backbone_weights:
        from effdet_tf.modeling.darknet_weights import load_darknet_weights

        logging.info("Darknet weights: %s", load_darknet_weights(model.backbone, t.backbone_weights))
    first = intervals.first_keras_epoch(step)
    if first >= intervals.total:
        logging.info("Training already finished at step %d (%d epochs).", step, t.epochs)
        return {"step": step, "resumed": state is not None}
    logging.info("%s at step %d: %d epochs of %d steps, checkpoint every %d steps, %d replica(s).",
                 "Resuming" if state else "Starting", step, t.epochs, intervals.steps_per_epoch,
                 intervals.interval_steps,
                 strategy.num_replicas_in_sync)

    eval_sets = eval_data(config) if evaluate_during else {}
    barrier = make_barrier(strategy) if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) else None
    evaluator = callbacks_lib.Evaluator(config, eval_sets, os.path.join(model_dir, "eval"), is_chief=chief)
    counter = callbacks_lib.StepCounter(step)
    watcher = callbacks_lib.NonFiniteLossWatcher(config.head_names, patience=t.max_nonfinite_steps, counter=counter)
    history = {"eval": []}
    schedule = getattr(optimization.inner(model.optimizer), "replannable_schedule", None)
    clock = callbacks_lib.TrainingClock(
        budget_seconds=t.train_minutes * 60, every_seconds=t.eval_every_minutes * 60, initial_step=step,
        plan=schedule.replan if schedule is not None else None)

    # On the chief, which evaluates and saves the EMA weights; other workers'
    # copies of the EMA's statistics are never read.
    refresh = batchnorm_refresh(config, model, step) if chief else None

    def end_of_epoch(epoch, last):
        if watcher.failed:
            return
        step_now = counter.step
        last = last or clock.expired
        due = clock.due()
        if due:
            clock.tick()
        metrics = mean = None
        evaluating = bool(eval_sets) and (epoch % t.eval_every_epochs == 0 or last or due)
        if refresh is not None and (evaluating or last):
            with optimization.averaged_weights(model):
                refresh()
        if evaluating:
            # The chief evaluates every image once; the other workers wait
            # (see evaluate_on_chief).
            metrics, mean = evaluate_on_chief(chief, model, evaluator, step_now, barrier)
            if chief:
                record = {"epoch": epoch, "step": step_now, "train_minutes": round(clock.seconds / 60, 4),
                          "metrics": metrics, "mean_ap": mean}
                history["eval"].append(record)
                callbacks_lib.append_eval_history(model_dir, record)
        if chief:
            callbacks_lib.save_best_and_last(model, model_dir, epoch, step_now, metrics, mean,
                                             per_dataset=t.keep_best_per_dataset)

    log_dir = model_dir if chief else os.path.join(model_dir, f".worker-{os.getpid()}")
    cbs = [
        counter,
        watcher,
        keras.callbacks.TensorBoard(log_dir=log_dir, update_freq=max(1, min(intervals.interval_steps, 50))),
        callbacks_lib.StepSummaries(os.path.join(model_dir, "train"), config.data.images_per_step,
                                    every=max(1, min(intervals.interval_steps, 10)), enabled=chief, counter=counter),
        # Evaluation and best/last run before the backup so a kill during a
        # long evaluation resumes before it and evaluates again.
        clock,
        callbacks_lib.EpochEnd(intervals, end_of_epoch, also_if=clock.due),
        # A run stopped by --train_minutes within an interval keeps the
        # backup of the interval before (resuming needs interval ends).
        callbacks_lib.ResumableBackup(model_dir, is_chief=chief, step_fn=lambda: counter.step,
                                   skip_if=lambda: watcher.failed or not intervals.is_interval_end(counter.step)),
    ]
    dataset = distributed_train_data(config, strategy, model, start_step=step)
    fit = model.fit(dataset, epochs=intervals.total, initial_epoch=first, steps_per_epoch=intervals.interval_steps,
                    callbacks=cbs, verbose=fit_verbosity(t.verbose), shuffle=False)
    if not chief:
        shutil.rmtree(log_dir, ignore_errors=True)
    if watcher.failed:
        raise watcher.error
    if clock.expired:
        logging.info("Training stopped at step %d: --train_minutes=%g spent.", counter.step, t.train_minutes)
    return {"step": counter.step, "resumed": state is not None, "replicas": strategy.num_replicas_in_sync,
            "history": fit.history, "eval": history["eval"], "model": model,
            "train_seconds": clock.seconds}


def make_barrier(strategy):
    """A function that returns once every worker has called it: an
    all-reduce of one value per replica (it returns the replica count)."""
    @tf.function
    def barrier():
        ones = strategy.run(lambda: tf.constant(1.0))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, ones, axis=None)

    return lambda: int(barrier())


def evaluate_on_chief(chief, model, evaluator, step, barrier=None):
    """COCO metrics of the EMA weights, computed by the chief alone, while
    the other workers wait at `barrier` (make_barrier; None: one worker).
    Returns (metrics, mean AP) on the chief, (None, None) elsewhere.

    Chosen over each worker scoring a share of the images: evaluation sets
    are small beside training (BCCD's 36 test images take seconds), the
    metrics are by construction those of one machine on the same weights
    (the same code as --mode=eval), and nothing has to gather detections
    across workers or hold them on shared storage. What it costs: N - 1
    workers idle for the evaluation's length, every --eval_every_epochs.
    """
    metrics = mean = None
    if chief:
        with optimization.averaged_weights(model):
            metrics, mean = evaluator(model, step)
    else:
        logging.info("step %d: evaluation runs on the chief; this worker waits.", step)
    if barrier is not None:
        barrier()
    return metrics, mean


def evaluate_model_dir(config: Config, which="best"):
    """--mode=eval: COCO mAP of the saved EMA weights on each val split."""
    detector, _ = checkpoint.load_detector(config.train.model_dir, which=which)
    step = (checkpoint.best_metrics(config.train.model_dir) or {}).get("step", 0) if which == "best" else 0
    eval_sets = eval_data(config)
    if not eval_sets:
        raise ConfigError("--mode=eval: no dataset has a val split to evaluate.")
    evaluator = callbacks_lib.Evaluator(config, eval_sets, os.path.join(config.train.model_dir, "eval"))
    metrics, mean = evaluator(detector, step)
    # "served": how many of the scored detections the exported model keeps.
    return {"metrics": metrics, "mean_ap": mean, "served": dict(evaluator.served),
            "per_class": dict(evaluator.per_class)}


def run(config: Config):
    """What train.py runs: --mode=train|eval|train_and_eval, then the
    optional export and picture."""
    config, strategy, chief = prepare(config)
    mode = config.train.mode
    result = {"config": config}
    if mode in ("train", "train_and_eval"):
        result["train"] = train(config, strategy, chief, evaluate_during=mode == "train_and_eval")
    if mode == "eval":
        result["eval"] = evaluate_model_dir(config)
    elif mode == "train_and_eval" and result["train"].get("eval"):
        result["eval"] = result["train"]["eval"][-1]
    if chief and mode != "eval":
        after_training(config, result)
    return result


def after_training(config: Config, result):
    t = config.train
    if t.export_after_training:
        from effdet_tf.serving import export_lib

        # Everything from the model dir's config.json, as export.py reads it.
        path = export_lib.export_from_model_dir(t.model_dir, version=config.export.export_version)
        logging.info("Exported SavedModel: %s", path)
        result["export"] = path
    if t.visualize_after_training:
        result["pictures"] = write_pictures(config)


# Pictures (write_pictures) show detections from this score up: at the
# export's 0.05 an early model covers the image in boxes.
PICTURE_SCORE_THRESHOLD = 0.25


def write_pictures(config: Config, num_images=4):
    """model_dir/detections_<name>.png: val images with ground truth (white)
    and the best checkpoint's detections."""
    import cv2
    import numpy as np

    detector, _ = checkpoint.load_detector(config.train.model_dir, which="best")
    eval_sets = eval_data(config)
    evaluator = callbacks_lib.Evaluator(config, eval_sets, log_dir=None, is_chief=False)
    paths = []
    # Evaluation's post-processing, drawn from a legible score up.
    post = config.postprocess.kwargs(score_threshold=max(PICTURE_SCORE_THRESHOLD, config.postprocess.score_threshold))
    for name, (dataset, coco_evaluator) in eval_sets.items():
        _, samples = evaluation.evaluate(detector, dataset.take(1), coco_evaluator, name,
                                         postprocess_kwargs=post, keep_images=num_images)
        picture = np.concatenate(list(evaluator.drawings(name, samples)), axis=1)
        path = os.path.join(config.train.model_dir, f"detections_{name}.png")
        cv2.imwrite(path, cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
        logging.info("Wrote %s", path)
        paths.append(path)
    return paths
