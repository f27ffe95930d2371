"""Training callbacks that Keras does not ship: a non-finite loss watcher,
step summaries (learning rate, loss scale, images/s), and evaluation with
COCO mAP, TensorBoard images and best/last EMA checkpoints.

Keras' own TensorBoard callback writes the loss metrics (total and per
head: `<name>_cls_loss`, `<name>_box_loss`, `<name>_loss`); these write
what it does not, into the same model_dir/train and model_dir/eval folders.
"""

import json
import math
import os
import shutil
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from effdet_tf import checkpoint, evaluation

# In MODEL_DIR/eval: one JSON line per evaluation; the last evaluation in full.
EVAL_HISTORY = "history.jsonl"
EVAL_REPORT = "report.json"


class NonFiniteLossError(RuntimeError):
    """The loss stayed NaN/inf for too many consecutive steps."""


class StepCounter(keras.callbacks.Callback):
    """Training steps run so far, resumed runs included. First in the
    callback list, so the others read the step of the batch that just ended.

    Not optimizer.iterations: under mixed_float16 the LossScaleOptimizer
    leaves it unchanged on the steps it skips (non-finite gradients), and a
    run that skipped steps would resume at a step before the one it saved.
    """

    def __init__(self, initial_step=0):
        super().__init__()
        self.step = int(initial_step)

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1


class TrainingClock(keras.callbacks.Callback):
    """Training time, a wall-clock budget and time-based ticks.

    `seconds` sums each train batch's wall time (on_train_batch_begin to
    on_train_batch_end: the step and the input it waited for), so time
    spent in evaluations, checkpoints or `on_tick` between batches is not
    training time. The first batch of a fit call, which traces the step
    and starts the input pipeline (a minute for the CPU flagfile), is
    timed apart (`first_step_seconds`), not counted. Once `budget_seconds`
    (0: none) have passed, the model stops after the current batch
    (`expired`). Every `every_seconds` (0: never) of training,
    `on_tick(clock)` runs after the batch that crossed the mark, or `due()`
    says so to a caller that polls at its own points and calls `tick()`
    (train_lib evaluates at checkpoint-interval ends). The clock is this
    process's: a resumed run starts its budget afresh.

    `plan(total_steps)`, when given, is called once the step time is known
    (after `calibration_steps` untraced steps) and again at every tick, with
    the number of steps the budget holds at the rate measured so far: the
    learning-rate schedule's length (optimization.ReplannableSchedule).
    """

    def __init__(self, budget_seconds=0.0, every_seconds=0.0, on_tick=None, plan=None,
                 calibration_steps=10, initial_step=0):
        super().__init__()
        self.budget_seconds = float(budget_seconds)
        self.every_seconds = float(every_seconds)
        self.on_tick = on_tick
        self.plan = plan
        self.calibration_steps = calibration_steps
        self.seconds = 0.0
        self.first_step_seconds = None
        self.steps = 0
        self.initial_step = int(initial_step)
        self.expired = False
        self._next_tick = self.every_seconds
        self._begin = None
        self._timed = []  # seconds of each counted batch
        self._planned = False

    def on_train_batch_begin(self, batch, logs=None):
        self._begin = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if self._begin is None:
            return
        took = time.perf_counter() - self._begin
        self._begin = None
        self.steps += 1
        if self.first_step_seconds is None:
            self.first_step_seconds = took
            return
        self.seconds += took
        self._timed.append(took)
        if self.plan and not self._planned and len(self._timed) >= self.calibration_steps:
            self._replan()
            self._planned = True
        if self.budget_seconds and self.seconds >= self.budget_seconds:
            self.expired = True
            self.model.stop_training = True
        if self.on_tick is not None and self.due():
            self.tick()

    def due(self):
        return bool(self.every_seconds) and self.seconds >= self._next_tick

    def tick(self):
        """Marks the tick done (the next one is `every_seconds` later) and
        runs on_tick; the time it takes is not training time."""
        while self._next_tick <= self.seconds:
            self._next_tick += self.every_seconds
        if self.plan and self._planned and not self.expired:
            self._replan()
        if self.on_tick is not None:
            self.on_tick(self)

    def _replan(self):
        # Recent steps: the rate once tracing and the input cache's first
        # pass are behind.
        recent = self._timed[-200:]
        per_step = float(np.median(recent))
        left = max(self.budget_seconds - self.seconds, 0.0)
        total = self.initial_step + self.steps + int(left / max(per_step, 1e-6))
        logging.info("Time budget: %.1f of %.1f min trained, %.3f s/step: the schedule ends at step %d.",
                     self.seconds / 60, self.budget_seconds / 60, per_step, total)
        self.plan(total)


class NonFiniteLossWatcher(keras.callbacks.Callback):
    """Stops a run whose loss stays non-finite, naming the step and the head.

    Under mixed_float16 the LossScaleOptimizer already skips a step with
    non-finite gradients and lowers the scale; a loss that is non-finite
    step after step is not an overflow the scaler can fix, so after
    `patience` consecutive such steps the run stops with NonFiniteLossError.

    The loss metrics are running means: one NaN would keep the mean NaN
    for the rest of the epoch. A tracker that went non-finite is therefore
    reset after being read, so the next step's value is that step's own.
    """

    def __init__(self, head_names, patience=20, counter=None):
        super().__init__()
        self.counter = counter
        self.head_names = list(head_names)
        self.patience = patience
        self.consecutive = 0
        self.first_step = None
        self.heads = []
        self.error = None

    def _trackers(self):
        return {m.name: m for m in self.model.metrics}

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        bad = [k for k, v in logs.items() if isinstance(v, (int, float, np.floating)) and not math.isfinite(v)]
        if not bad:
            self.consecutive, self.first_step, self.heads = 0, None, []
            return
        step = self.counter.step if self.counter else int(self.model.optimizer.iterations.numpy())
        trackers = self._trackers()
        for name in bad:
            if name in trackers:
                trackers[name].reset_state()
        heads = [h for h in self.head_names if any(k.startswith(f"{h}_") for k in bad)]
        self.consecutive += 1
        if self.first_step is None:
            self.first_step = step
        self.heads = sorted(set(self.heads) | set(heads))
        logging.warning("Non-finite loss at step %d (%s); heads: %s.", step, ", ".join(sorted(bad)),
                        ", ".join(heads) or "none (total only)")
        if self.consecutive >= self.patience:
            self.error = NonFiniteLossError(
                f"Loss non-finite for {self.consecutive} consecutive steps, from step {self.first_step} to "
                f"step {step}; head(s) with a non-finite loss: {', '.join(self.heads) or 'none (total only)'} "
                f"(metrics: {', '.join(sorted(bad))}). Stopping; lower --learning_rate, check the data, "
                f"or use --precision=float32.")
            self.model.stop_training = True

    @property
    def failed(self):
        return self.error is not None


class StepSummaries(keras.callbacks.Callback):
    """learning_rate, loss_scale and images_per_second to model_dir/train,
    every `every` steps and at each fit epoch's end, at the training step.
    Evaluation and checkpoint time between fit epochs is not counted."""

    def __init__(self, log_dir, images_per_step, every=10, enabled=True, counter=None):
        super().__init__()
        self.counter = counter
        self.writer = tf.summary.create_file_writer(log_dir) if enabled else None
        self.images_per_step = images_per_step
        self.every = max(1, every)
        self.rates = []  # images/s of each written interval
        self._t0 = None
        self._timed = 0

    def on_train_begin(self, logs=None):
        self._t0 = None  # the first step of a fit call traces: not timed.
        self._timed = 0

    def on_train_batch_end(self, batch, logs=None):
        if self._t0 is None:
            self._t0 = time.perf_counter()
            return
        self._timed += 1
        if self._timed >= self.every:
            self._write()

    def on_epoch_end(self, epoch, logs=None):
        if self._timed:
            self._write()

    def on_epoch_begin(self, epoch, logs=None):
        if self._t0 is not None:
            self._t0, self._timed = time.perf_counter(), 0

    def _write(self):
        elapsed = time.perf_counter() - self._t0
        rate = self.images_per_step * self._timed / max(elapsed, 1e-9)
        self.rates.append(rate)
        if self.writer is not None:
            step = self.counter.step if self.counter else int(self.model.optimizer.iterations.numpy())
            optimizer = self.model.optimizer
            with self.writer.as_default(step=step):
                tf.summary.scalar("images_per_second", rate)
                tf.summary.scalar("learning_rate", float(np.asarray(optimizer.learning_rate)))
                if hasattr(optimizer, "dynamic_scale"):
                    tf.summary.scalar("loss_scale", float(np.asarray(optimizer.dynamic_scale)))
            self.writer.flush()
        self._timed = 0
        self._t0 = time.perf_counter()


class EpochEnd(keras.callbacks.Callback):
    """Calls `fn(epoch, last)` at the end of each training epoch, at the end
    of a checkpoint interval where `also_if()` is true (a TrainingClock
    tick), and as the last call when training stops early (a spent time
    budget). `intervals`: the run's intervals.Intervals (fit's epochs)."""

    def __init__(self, intervals, fn, also_if=None):
        super().__init__()
        self.intervals = intervals
        self.fn = fn
        self.also_if = also_if or (lambda: False)

    def on_epoch_end(self, keras_epoch, logs=None):
        epoch, epoch_ends, run_ends = self.intervals.epoch_after(keras_epoch)
        last = run_ends or bool(self.model.stop_training)
        if epoch_ends or last or self.also_if():
            self.fn(epoch, last)


class Evaluator:
    """COCO mAP per dataset with EMA weights; TensorBoard scalars and images;
    best (by mean AP) and last EMA checkpoints. Used by the training
    callback and by --mode=eval.

    Detections come from config.postprocess at its eval_score_threshold:
    the export signatures' settings, so the AP is the served model's. The
    detections each evaluation scored are written to
    `log_dir/<dataset>_detections.json` (log_dir is MODEL_DIR/eval), and
    the log says how many score above the export's score_threshold, i.e.
    what the exported model would return for the same images."""

    def __init__(self, config, eval_datasets, log_dir, is_chief=True, draw=True):
        self.config = config
        self.eval_datasets = eval_datasets  # {name: (tf.data eval dataset, CocoEvaluator)}
        self.writer = tf.summary.create_file_writer(log_dir) if is_chief else None
        self.log_dir = log_dir
        self.is_chief = is_chief
        self.draw = draw
        self._detect_fns = {}
        self.served = {}  # {name: evaluation.served_share(...)} of the last call
        self.per_class = {}  # {name: CocoEvaluator.per_class} of the last call

    def __call__(self, model, step):
        t, post = self.config.train, self.config.postprocess
        metrics, samples = {}, {}
        for name, (dataset, coco_evaluator) in self.eval_datasets.items():
            key = (id(model), name)
            if key not in self._detect_fns:
                self._detect_fns[key] = evaluation.make_detect_fn(model, name, post.eval_kwargs())
            metrics[name], samples[name] = evaluation.evaluate(
                model, dataset, coco_evaluator, name, keep_images=t.tensorboard_images,
                detect_fn=self._detect_fns[key])
            self.per_class[name] = coco_evaluator.per_class
            self._write_detections(name, coco_evaluator)
        mean = evaluation.mean_ap(metrics)
        self._write_report(step, metrics, mean)
        for name, m in metrics.items():
            logging.info("step %d %s: %s", step, name, " ".join(f"{k}={v:.4f}" for k, v in m.items()))
            s = self.served[name]
            logging.info(
                "step %d %s: %d of %d detections score above the export's --score_threshold=%g (what the "
                "exported model returns); %d of %d images keep at least one.", step, name,
                s["served_detections"], s["detections"], post.score_threshold,
                s["images_with_served_detections"], s["images"])
        logging.info("step %d mean AP %.4f", step, mean)
        if self.writer is not None:
            with self.writer.as_default(step=step):
                for name, m in metrics.items():
                    for key in ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large"):
                        tf.summary.scalar(f"{name}/{key}", m[key])
                tf.summary.scalar("mean_AP", mean)
                for name, rows in self.per_class.items():
                    for row in rows:
                        for key in ("AP", "AP50"):
                            if row[key] is not None:
                                tf.summary.scalar(f"{name}/per_class_{key}/{row['name']}", row[key])
                if self.draw:
                    for name, items in samples.items():
                        if items:
                            tf.summary.image(f"{name}/detections", self.drawings(name, items),
                                             max_outputs=len(items))
            self.writer.flush()
        return metrics, mean

    def _write_detections(self, name, coco_evaluator):
        """MODEL_DIR/eval/<name>_detections.json (atomic: a reader never
        sees half a file) and the share the export would keep."""
        self.served[name] = evaluation.served_share(
            coco_evaluator.results, coco_evaluator.image_ids, self.config.postprocess.score_threshold)
        if not (self.is_chief and self.log_dir):
            return
        checkpoint.atomic_write_text(evaluation.detections_file(self.log_dir, name),
                                     json.dumps(coco_evaluator.results))

    def _write_report(self, step, metrics, mean):
        """MODEL_DIR/eval/report.json: the last evaluation's metrics, its
        per-class AP and AP50 for each dataset, and the served share."""
        if not (self.is_chief and self.log_dir):
            return
        report = {"step": int(step), "mean_ap": mean, "metrics": metrics, "per_class": self.per_class,
                  "served": self.served}
        checkpoint.atomic_write_text(os.path.join(self.log_dir, EVAL_REPORT), json.dumps(report, indent=1) + "\n")

    def drawings(self, name, items):
        """Ground truth (white) and detections (a colour per class, with
        scores) on the model's input images."""
        from effdet_tf import visualize

        dataset_config = self.config.data.dataset(name)
        names = {c.index: c.name for c in dataset_config.classes}
        coco = self.eval_datasets[name][1].coco
        ids = [c.id for c in dataset_config.classes]
        # Small inputs (the demo's 128 px) are enlarged so labels stay legible.
        zoom = max(1, 384 // self.config.model.image_size)
        images = []
        for s in items:
            gt_boxes, gt_classes = evaluation.ground_truth_in_model_px(coco, s["image_id"], s["scale"], ids)
            image = np.asarray(s["image"])
            if zoom > 1:
                import cv2

                image = cv2.resize(image, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_LINEAR)
            image = visualize.draw_detections(image, gt_boxes * zoom, gt_classes, None, names, color=(255, 255, 255))
            image = visualize.draw_detections(image, np.asarray(s["boxes"]) * zoom, s["classes"], s["scores"], names)
            images.append(image)
        return np.stack(images).astype(np.uint8)


def append_eval_history(model_dir, record):
    """One JSON line per evaluation in MODEL_DIR/eval/history.jsonl: epoch,
    step, training minutes (TrainingClock) and the metrics per dataset."""
    path = os.path.join(model_dir, "eval", EVAL_HISTORY)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def save_best_and_last(model, model_dir, epoch, step, metrics=None, mean_ap=None, per_dataset=False):
    """last.weights.h5 always; best.weights.h5 (+ best.json) when mean AP
    beats the best so far; with `per_dataset`, best_<dataset>.weights.h5
    (+ .json) when that dataset's AP beats its own best. All hold EMA
    weights. Returns the checkpoints written besides last ("best",
    "best_<dataset>", ...)."""
    checkpoint.save_ema_weights(model, model_dir, "last")
    if metrics is None:
        return []
    candidates = [("best", mean_ap)]
    if per_dataset:
        candidates += [(f"{checkpoint.PER_DATASET_BEST}{name}", m["AP"]) for name, m in metrics.items()]
    written = []
    for which, score in candidates:
        best = checkpoint.best_metrics(model_dir, which)
        if best is not None and best["mean_ap" if which == "best" else "AP"] >= score:
            continue
        checkpoint.save_ema_weights(model, model_dir, which)
        record = {"epoch": epoch, "step": step, "mean_ap": mean_ap, "metrics": metrics}
        if which != "best":
            record["AP"] = score
        checkpoint.atomic_write_text(os.path.join(model_dir, checkpoint.metrics_file(which)),
                                     json.dumps(record, indent=1) + "\n")
        logging.info("New %s (%s %.4f) at epoch %d: %s", which, "mean AP" if which == "best" else "AP", score,
                     epoch, os.path.join(model_dir, checkpoint.weights_file(which)))
        written.append(which)
    return written


class ResumableBackup(keras.callbacks.Callback):
    """Saves the whole training state at the end of every fit epoch.

    A fit epoch is one checkpoint interval (intervals.py), so this runs
    every --checkpoint_every_steps steps. The state (model weights, optimizer
    slots, EMA, loss scale, iteration counter) goes to
    backup/.tmp-<pid>/state.weights.h5 + state.json, then the folder is
    renamed to backup/ckpt-<step>: a half-written checkpoint never carries a
    ckpt- name, so it never replaces a good one. The newest `keep` are kept.

    Why not keras.callbacks.BackupAndRestore: in Keras 3.15 it writes
    latest.weights.h5 in place (a kill -9 during the write leaves a
    truncated file whose load error need not be the OSError its fallback
    catches; weights and metadata can also disagree), and it resumes at an
    epoch start, not at the step saved.
    """

    def __init__(self, model_dir, keep=2, is_chief=True, skip_if=None, step_fn=None):
        super().__init__()
        self.backup_dir = os.path.join(model_dir, checkpoint.BACKUP_DIR)
        self.keep = keep
        self.is_chief = is_chief
        self.skip_if = skip_if  # e.g. the loss went non-finite: keep the good state
        # Steps run, from train_lib's StepCounter. optimizer.iterations is not
        # it under mixed_float16: steps the loss scaler skips do not count.
        self.step_fn = step_fn or (lambda: int(self.model.optimizer.iterations.numpy()))

    def on_epoch_end(self, epoch, logs=None):
        if self.skip_if is not None and self.skip_if():
            return
        self.save(fit_epoch=epoch + 1)

    def save(self, fit_epoch):
        if not self.is_chief:
            return  # Variables are identical on every worker; one writer.
        step = int(self.step_fn())
        final = os.path.join(self.backup_dir, f"ckpt-{step:010d}")
        if os.path.exists(final):
            return  # Same step already saved: same state.
        os.makedirs(self.backup_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=self.backup_dir, prefix=".tmp-")
        try:
            weights = os.path.join(tmp, "state.weights.h5")
            self.model.save_weights(weights)
            with open(weights, "rb") as f:
                os.fsync(f.fileno())
            with open(os.path.join(tmp, "state.json"), "w") as f:
                json.dump({"step": step, "fit_epoch": fit_epoch}, f)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, final)
            checkpoint.fsync_dir(self.backup_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for old in checkpoint.list_backups(self.backup_dir)[self.keep:]:
            shutil.rmtree(old, ignore_errors=True)
