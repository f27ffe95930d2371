"""The training recipe's optimizer: schedule, weight decay, clipping, EMA.

EfficientDet's recipe (Tan et al. 2020, sec. 5.1; google/automl
efficientdet `det_model_fn.py` and `hparams_config.py`) differs from what
Keras's optimizers do with the same numbers in three places, each fixed
here:

1. Weight decay. automl's `weight_decay=4e-5` is an L2 term added to the
   loss, `wd * sum(l2_loss(v))` = `wd/2 * sum(v**2)` over every variable but
   BatchNorm's and the biases (`reg_l2_loss`), so its gradient `wd * v`
   goes through SGD's momentum: ~1/(1 - 0.9) = 10x the pull of Keras's
   decoupled `weight_decay`, which shrinks `v` by `lr * wd * v` outside the
   momentum. `--l2_weight_decay` is the former (Detector.compile adds the
   term to the loss); `--weight_decay` is the latter, for AdamW.
2. Gradient clipping. Keras 3.15 clips in `_backend_apply_gradients`
   before `_backend_update_step` sums the replicas' gradients, so under a
   distribution strategy `global_clipnorm` bounds each replica's share, not
   the gradient of the global batch. automl clips the aggregated gradient.
   `_Recipe._backend_update_step` all-reduces, then clips, then applies.
3. The weight EMA. Keras's `use_ema` uses the fixed momentum from step 1
   (`_update_model_variables_moving_average`): with 0.9998, the average
   after 600 steps still holds 0.9998**600 = 89% of the random init. automl
   uses `tf.train.ExponentialMovingAverage(decay, num_updates=step)` (its
   Keras trainer: `MovingAverage(..., dynamic_decay=True)`), whose decay
   at step t is min(decay, (1 + t) / (10 + t)), and averages BatchNorm's
   moving mean and variance with the weights (`ema_vars` in
   `det_model_fn.py`). `_Recipe` keeps that average in optimizer variables,
   so the backup of the optimizer state resumes it exactly.

Everything that reaches into Keras internals is in `_Recipe`; each use says
the Keras version it was checked against.
"""

import contextlib
import functools
import math

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from effdet_tf import compat

# EfficientDet warms up from lr_warmup_init = 0.008 to 0.08: 10% of the peak
# (google/automl efficientdet/hparams_config.py).
WARMUP_START_FRACTION = 0.1

_BASES = {"sgd": keras.optimizers.SGD, "adam": keras.optimizers.Adam, "adamw": keras.optimizers.AdamW}


def ema_decay(step, momentum):
    """Decay of the weight average at optimizer step `step` (0-based).

    automl's warm-up: min(momentum, (1 + t) / (10 + t)), so the average
    follows the weights closely early on (0.1 at t = 0, 0.5 at t = 8) and
    reaches `momentum` only after ~1 / (1 - momentum) steps. Step 0 copies
    the weights (decay 0): the average then starts from the weights the
    first step updated, which may have been loaded after the optimizer was
    built (Darknet backbone weights), never from the random init.
    """
    step = tf.cast(step, tf.float32)
    warm = tf.minimum(tf.cast(momentum, tf.float32), (1.0 + step) / (10.0 + step))
    return tf.where(step > 0, warm, 0.0)


def no_decay_variables(model):
    """BatchNorm gammas/betas and biases: EfficientDet decays neither
    (google/automl efficientdet/det_model_fn.py, reg_l2_loss)."""
    out = []
    for layer in compat.sublayers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            out += [v for v in (layer.gamma, layer.beta) if v is not None]
        bias = getattr(layer, "bias", None)
        if isinstance(bias, keras.Variable):
            out.append(bias)
    return out


def decay_variables(model):
    """The variables weight decay applies to: every trainable variable but
    BatchNorm's and the biases (conv and dense kernels, BiFPN fusion
    weights), as automl's reg_l2_loss selects them."""
    skip = {id(v) for v in no_decay_variables(model)}
    return [v for v in model.trainable_variables if id(v) not in skip]


def trainable_batchnorm_layers(model):
    """The BatchNorm layers whose statistics move in training (a frozen
    layer, --freeze, normalises in inference mode)."""
    return [layer for layer in compat.sublayers(model)
            if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable]


def batchnorm_statistics(model):
    """Every trainable BatchNorm layer's moving mean and variance: averaged
    with the weights, as automl's EMA does. A frozen layer's (--freeze)
    are left out, as its weights are: they do not change, and averaging a
    constant would still round it."""
    return [v for layer in trainable_batchnorm_layers(model) for v in (layer.moving_mean, layer.moving_variance)]


class _Recipe(compat.OptimizerHooks):
    """Mixed into a Keras optimizer class: clipping after the all-reduce and
    a warmed-up EMA of the weights and the BatchNorm statistics.

    Args (besides the base optimizer's):
      global_clipnorm: clips the all-reduced gradient (not passed to Keras,
        which would clip each replica's share).
      average_decay: EMA momentum; 0 keeps no average.
      averaged_extra: non-trainable variables averaged too (BatchNorm
        moving statistics).
    """

    def __init__(self, *args, global_clipnorm=None, average_decay=0.0, averaged_extra=(), **kwargs):
        if kwargs.get("use_ema") or kwargs.get("clipnorm") or kwargs.get("clipvalue"):
            raise ValueError("Use global_clipnorm and average_decay: Keras's own EMA and clipping are "
                             "the ones this class replaces.")
        super().__init__(*args, **kwargs)
        self.clip_after_reduce = float(global_clipnorm or 0.0)
        self.transforms_reduced_gradients = self.clip_after_reduce > 0
        self.average_decay = float(average_decay)
        self._extra_fn = lambda: list(averaged_extra)  # a closure: Keras would track a list as weights
        self.averages = []

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        if self.average_decay > 0:
            averaged = list(variables) + self._extra_fn()
            self._averaged_fn = lambda: averaged
            # Checked against Keras 3.15: add_variable_from_reference makes a
            # zero variable colocated with its reference under the strategy.
            self.averages = [self.add_variable_from_reference(v, name="ema") for v in averaged]
            for average, v in zip(self.averages, averaged):
                average.assign(v)

    @property
    def averaged_variables(self):
        """The model variables `averages` shadow, in the same order."""
        return self._averaged_fn() if self.averages else []

    # -- compat.OptimizerHooks
    def reduced_gradients(self, grads):
        clipped, _ = tf.clip_by_global_norm(grads, self.clip_after_reduce)
        return clipped

    def after_apply(self):
        if self.averages:
            # Before apply() increments iterations: the first update sees 0.
            decay = ema_decay(self.iterations, self.average_decay)
            compat.merge_call(self._update_averages, self.distribution(), decay)

    def _update_averages(self, distribution, decay):
        def update(average, value, decay):
            decay = tf.cast(decay, average.dtype)
            return average.assign(decay * average + (1.0 - decay) * tf.cast(value, average.dtype))

        for average, v in zip(self.averages, self.averaged_variables):
            distribution.extended.update(compat.tf_variable(average), update, args=(compat.tf_variable(v), decay),
                                         group=False)

    def swap_averages(self):
        """Exchanges the model variables' values with their averages, on
        every replica (cross-replica context: callbacks, evaluation)."""
        def swap(v, average):
            held = tf.identity(v)
            v.assign(average)
            return average.assign(held)

        strategy = self.distribution()
        for average, v in zip(self.averages, self.averaged_variables):
            strategy.extended.update(compat.tf_variable(v), swap, args=(compat.tf_variable(average),), group=False)


@functools.lru_cache(maxsize=None)
def recipe_class(name):
    """The Keras optimizer class `name` (sgd, adam, adamw) with `_Recipe`."""
    base = _BASES[name]
    return type(f"Recipe{base.__name__}", (_Recipe, base), {})


def inner(optimizer):
    """The optimizer inside a LossScaleOptimizer (or the optimizer)."""
    return getattr(optimizer, "inner_optimizer", optimizer)


@contextlib.contextmanager
def averaged_weights(model):
    """Inside the block the model holds its EMA weights and BatchNorm
    statistics (if its optimizer keeps an average); the training values come
    back on exit. Swaps in place: no copy of the model."""
    optimizer = inner(getattr(model, "optimizer", None))
    if not getattr(optimizer, "averages", None):
        yield model
        return
    optimizer.swap_averages()
    try:
        yield model
    finally:
        optimizer.swap_averages()


class BatchNormRefresh:
    """Recomputes every trainable BatchNorm layer's moving statistics for
    the model's current weights ("PreciseBN": Wu & Johnson, "Rethinking
    'Batch' in BatchNorm", 2021, sec. 3).

    A moving average with momentum m mixes the statistics of the last
    ~1 / (1 - m) steps' weights. While the learning rate is high, those
    weights differ enough from the current ones that the inference-mode
    network is a different function: in a 400-step run of
    configs/cpu_real.flags without EMA, the raccoon model's AP50 fell from
    0.62 at step 120 to 0.17 at step 160 and was back at 0.78 by step 180,
    with the training loss still falling; the step-160 weights with
    statistics recomputed from training batches scored AP 0.23-0.32 against
    0.06 (BENCHMARKS.md, "The collapse is stale BatchNorm statistics").

    `batches` yields model inputs (the training pipeline's images: the
    statistics are those of the distribution the layers normalise in
    training). Each call runs `num_batches` of them through the model in
    training mode with the weights fixed and sets each layer's moving mean
    to the mean of the batch means and its moving variance to the pooled
    variance, E[var_b + mean_b^2] - E[mean_b]^2 (equal batch sizes), so the
    spread of the batch means is counted, unlike an average of the batch
    variances. Layers that do not train (--freeze) keep theirs.

    Call it where the model holds the weights to be evaluated (inside
    averaged_weights: the recomputed values then replace the EMA's
    statistics, which the EMA keeps averaging from) and in cross-replica
    context, as evaluation runs. Nothing else changes: the trainable
    weights, the optimizer state and the training step, whose BatchNorm
    layers normalise with batch statistics, are the same with or without it.
    """

    def __init__(self, model, batches, num_batches):
        if num_batches < 1:
            raise ValueError(f"num_batches={num_batches}: must be >= 1.")
        self.model = model
        self.batches = batches
        self._iterator = None  # made at the first call: a tf.data iterator starts reading when made
        self.num_batches = int(num_batches)
        self.layers = trainable_batchnorm_layers(model)
        # Traced at the first call, while every momentum is 0.
        self._forward = tf.function(lambda x: model(x, training=True))

    def _batch_statistics(self, inputs):
        """Each layer's (mean, variance) of one batch: with momentum 0 the
        layer's own update leaves exactly its batch moments in its moving
        variables (the unbiased variance in modeling.layers'
        FusedBatchNormalization, as in its training updates). Momentum is
        read when the function is traced, so it is traced while it is 0."""
        self._forward(inputs)
        return [(layer.moving_mean.numpy(), layer.moving_variance.numpy()) for layer in self.layers]

    def __call__(self):
        if self._iterator is None:
            self._iterator = iter(self.batches)
        momenta = [layer.momentum for layer in self.layers]
        saved = [(layer.moving_mean.numpy(), layer.moving_variance.numpy()) for layer in self.layers]
        sums = [[0.0, 0.0] for _ in self.layers]
        try:
            for layer in self.layers:
                layer.momentum = 0.0
            for _ in range(self.num_batches):
                for total, (mean, variance) in zip(sums, self._batch_statistics(next(self._iterator))):
                    total[0] = total[0] + mean
                    total[1] = total[1] + variance + mean * mean
        except BaseException:
            for layer, (mean, variance) in zip(self.layers, saved):
                layer.moving_mean.assign(mean)
                layer.moving_variance.assign(variance)
            raise
        finally:
            for layer, momentum in zip(self.layers, momenta):
                layer.momentum = momentum
        for layer, (mean_sum, square_sum) in zip(self.layers, sums):
            mean = mean_sum / self.num_batches
            layer.moving_mean.assign(mean)
            layer.moving_variance.assign(np.maximum(square_sum / self.num_batches - mean * mean, 0.0))
        logging.info("BatchNorm statistics of %d layers recomputed from %d training batches.",
                     len(self.layers), self.num_batches)


def learning_rate_schedule(peak, total_steps, warmup_steps):
    """Linear warm-up from 10% of `peak`, then cosine decay to 0."""
    warmup = min(warmup_steps, max(total_steps - 1, 0))
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=peak * WARMUP_START_FRACTION if warmup else peak,
        decay_steps=max(total_steps - warmup, 1), alpha=0.0,
        warmup_target=peak if warmup else None, warmup_steps=warmup), warmup


class ReplannableSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """learning_rate_schedule's warm-up and cosine, with a length that can
    change during training: `replan(total_steps)` (callbacks.TrainingClock,
    for --train_minutes, where the number of steps the budget holds is only
    known once the step time is measured). The length is a variable, so the
    traced train step reads the new one."""

    def __init__(self, peak, total_steps, warmup_steps):
        self.peak = float(peak)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = tf.Variable(float(max(total_steps, self.warmup_steps + 1)), trainable=False,
                                       dtype=tf.float32, name="planned_steps")

    def replan(self, total_steps):
        self.total_steps.assign(float(max(total_steps, self.warmup_steps + 1)))

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warmup = float(max(self.warmup_steps, 1))
        start = self.peak * WARMUP_START_FRACTION
        warm = start + (self.peak - start) * step / warmup
        decay = tf.maximum(self.total_steps - self.warmup_steps, 1.0)
        progress = tf.clip_by_value((step - self.warmup_steps) / decay, 0.0, 1.0)
        cosine = 0.5 * self.peak * (1.0 + tf.cos(math.pi * progress))
        return tf.where(step < self.warmup_steps, warm, cosine)

    def get_config(self):
        return {"peak": self.peak, "total_steps": float(self.total_steps.numpy()),
                "warmup_steps": self.warmup_steps}


def make_optimizer(train_config, model, images_per_step, steps_per_epoch):
    """The optimizer of `train_config` (TrainConfig) for `model`.

    L2 weight decay is not here: it is a loss term (Detector.compile,
    ops.losses.weight_l2_loss).
    """
    t = train_config
    total = steps_per_epoch * t.epochs
    peak = t.learning_rate * images_per_step / t.lr_reference_batch
    if t.train_minutes:
        # Planned for --epochs until the step time is measured
        # (callbacks.TrainingClock calls replan).
        warmup = min(t.warmup_steps(steps_per_epoch), max(total - 1, 0))
        schedule = ReplannableSchedule(peak, total, warmup)
    else:
        schedule, warmup = learning_rate_schedule(peak, total, t.warmup_steps(steps_per_epoch))
    kwargs = dict(learning_rate=schedule, weight_decay=t.weight_decay or None,
                  global_clipnorm=t.global_clipnorm or None, average_decay=t.ema_momentum,
                  averaged_extra=batchnorm_statistics(model) if t.ema_momentum > 0 else ())
    if t.optimizer == "sgd":
        kwargs["momentum"] = t.momentum
    else:
        kwargs["beta_1"] = t.momentum
    optimizer = recipe_class(t.optimizer)(**kwargs)
    if isinstance(schedule, ReplannableSchedule):
        optimizer.replannable_schedule = schedule  # for train_lib's TrainingClock
    if t.weight_decay:
        optimizer.exclude_from_weight_decay(var_list=no_decay_variables(model))
    logging.info("%s: peak LR %.5g (%g per %d images x %d images/step), warmup %d steps, cosine over %d "
                 "steps; L2 %g, decoupled decay %g, clip norm %g (after the all-reduce), EMA %g with warm-up.",
                 t.optimizer, peak, t.learning_rate, t.lr_reference_batch, images_per_step, warmup, total,
                 t.l2_weight_decay, t.weight_decay, t.global_clipnorm, t.ema_momentum)
    if t.precision == "mixed_float16":
        # Dynamic loss scaling; a step with non-finite gradients is skipped.
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer
