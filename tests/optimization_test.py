"""The recipe's optimizer: EMA warm-up over weights and BatchNorm statistics,
exact resume of the average, L2 weight decay as a loss term, and gradient
clipping after the all-reduce (two logical CPUs, in a subprocess), and the
schedule --train_minutes re-plans."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from effdet_tf import checkpoint, optimization
from effdet_tf.config import TrainConfig
from effdet_tf.modeling.detector import Detector

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}


def test_ema_decay_warms_up_as_automl():
    steps = [0, 1, 8, 90, 10_000, 100_000]
    decays = [float(optimization.ema_decay(t, 0.9998)) for t in steps]
    # (1 + t) / (10 + t): 2/11, 9/18, 91/100, 10001/10010; capped at 0.9998
    # from t = 44,991 on; step 0 copies the weights.
    np.testing.assert_allclose(decays, [0.0, 2 / 11, 0.5, 0.91, 10_001 / 10_010, 0.9998], rtol=1e-6)


def _bn_model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((3,))
    x = keras.layers.Dense(4)(inputs)
    x = keras.layers.BatchNormalization()(x)
    return keras.Model(inputs, keras.layers.Dense(2)(x))


def _compile(model, momentum, clip=None):
    optimizer = optimization.recipe_class("sgd")(
        learning_rate=0.1, momentum=0.9, global_clipnorm=clip, average_decay=momentum,
        averaged_extra=optimization.batchnorm_statistics(model))
    model.compile(optimizer, "mse")
    return optimizer


class _Record(keras.callbacks.Callback):
    """The averaged variables' values after every step."""

    def __init__(self, optimizer):
        super().__init__()
        self.optimizer, self.values = optimizer, []

    def on_train_batch_end(self, batch, logs=None):
        self.values.append([v.numpy().copy() for v in self.optimizer.averaged_variables])


def _data():
    rng = np.random.default_rng(0)
    return rng.random((16, 3), np.float32), rng.random((16, 2), np.float32)


def test_average_covers_weights_and_batchnorm_statistics_and_swaps_back():
    model = _bn_model()
    optimizer = _compile(model, 0.9)
    record = _Record(optimizer)
    model.fit(*_data(), batch_size=4, epochs=2, verbose=0, callbacks=[record])
    names = [v.name for v in optimizer.averaged_variables]
    assert "moving_mean" in names and "moving_variance" in names
    assert len(optimizer.averages) == len(model.trainable_variables) + 2

    # The recurrence, replayed by hand: step 0 copies, then decay
    # min(0.9, (1 + t) / (10 + t)).
    average = None
    for t, values in enumerate(record.values):
        decay = 0.0 if t == 0 else min(0.9, (1 + t) / (10 + t))
        average = values if average is None else [decay * a + (1 - decay) * v for a, v in zip(average, values)]
    for expected, got in zip(average, optimizer.averages):
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)

    trained = [v.numpy().copy() for v in optimizer.averaged_variables]
    with optimization.averaged_weights(model):
        for expected, v in zip(average, optimizer.averaged_variables):
            np.testing.assert_allclose(v.numpy(), expected, rtol=1e-5, atol=1e-6)
    for expected, v in zip(trained, optimizer.averaged_variables):
        np.testing.assert_array_equal(v.numpy(), expected)


def test_slow_average_follows_a_short_run():
    """0.9998 over 40 steps: Keras's fixed momentum would leave the average
    at ~99% of the initial weights; with the warm-up it tracks the run."""
    model = _bn_model()
    initial = [v.numpy().copy() for v in model.trainable_variables]
    optimizer = _compile(model, 0.9998)
    model.fit(*_data(), batch_size=4, epochs=10, verbose=0)
    final = [v.numpy() for v in model.trainable_variables]
    averages = [a.numpy() for a in optimizer.averages[:len(final)]]
    moved = sum(np.sum((f - i) ** 2) for f, i in zip(final, initial)) ** 0.5
    behind = sum(np.sum((f - a) ** 2) for f, a in zip(final, averages)) ** 0.5
    assert moved > 0.1
    assert behind < 0.25 * moved, (behind, moved)


def test_resume_restores_the_average_exactly(tmp_path):
    x, y = _data()
    model = _bn_model()
    optimizer = _compile(model, 0.99)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    path = str(tmp_path / "state.weights.h5")
    model.save_weights(path)  # what ResumableBackup writes

    resumed = _bn_model(seed=1)
    resumed_optimizer = _compile(resumed, 0.99)
    resumed_optimizer.build(resumed.trainable_variables)
    resumed.load_weights(path)
    for a, b in zip(optimizer.averages, resumed_optimizer.averages):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # The next steps continue the same recurrence (same step count, decay).
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
    resumed.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
    assert int(resumed_optimizer.iterations.numpy()) == int(optimizer.iterations.numpy()) == 8
    for a, b in zip(optimizer.averages, resumed_optimizer.averages):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)


def test_saved_ema_weights_hold_the_averaged_batchnorm_statistics(tmp_path):
    model = _bn_model()
    optimizer = _compile(model, 0.9)
    model.fit(*_data(), batch_size=4, epochs=1, verbose=0)
    bn = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)][0]
    index = [v.name for v in optimizer.averaged_variables].index("moving_mean")
    averaged_mean = optimizer.averages[index].numpy()
    assert not np.allclose(averaged_mean, bn.moving_mean.numpy())
    checkpoint.save_ema_weights(model, str(tmp_path), "last")
    fresh = _bn_model(seed=2)
    fresh.load_weights(os.path.join(tmp_path, checkpoint.LAST_WEIGHTS))
    fresh_bn = [layer for layer in fresh.layers if isinstance(layer, keras.layers.BatchNormalization)][0]
    np.testing.assert_allclose(fresh_bn.moving_mean.numpy(), averaged_mean, rtol=1e-6)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]


def _refresh_model():
    """BN on the inputs, Dense, BN, Dense, and a frozen BN at the end."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((3,))
    x = keras.layers.BatchNormalization(momentum=0.97, name="on_inputs")(inputs)
    dense = keras.layers.Dense(4, name="hidden")
    x = keras.layers.BatchNormalization(momentum=0.97, name="on_dense")(dense(x))
    x = keras.layers.Dense(2)(x)
    frozen = keras.layers.BatchNormalization(name="frozen")
    out = frozen(x)
    frozen.trainable = False
    return keras.Model(inputs, out), dense


def _shifted_batches():
    """Four batches of 8 whose means differ: their pooled variance is well
    above the mean of their variances."""
    rng = np.random.default_rng(1)
    return [(rng.normal(size=(8, 3)) * [1.0, 2.0, 0.5] + shift).astype(np.float32) for shift in (0.0, 1.0, 3.0, -2.0)]


def _layer(model, name):
    return next(layer for layer in model.layers if layer.name == name)


def test_batchnorm_refresh_gives_the_population_statistics_of_the_fixed_weights():
    model, dense = _refresh_model()
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(np.full(layer.moving_mean.shape, 5.0, np.float32))
            layer.moving_variance.assign(np.full(layer.moving_variance.shape, 9.0, np.float32))
    weights = [v.numpy().copy() for v in model.trainable_variables]
    batches = _shifted_batches()
    refresh = optimization.BatchNormRefresh(model, batches, num_batches=4)
    assert [layer.name for layer in refresh.layers] == ["on_inputs", "on_dense"]
    refresh()

    data = np.concatenate(batches).astype(np.float64)
    first = _layer(model, "on_inputs")
    np.testing.assert_allclose(first.moving_mean.numpy(), data.mean(0), rtol=1e-5)
    np.testing.assert_allclose(first.moving_variance.numpy(), data.var(0), rtol=1e-5)
    # The second layer sees the first one's training-mode output (each batch
    # normalised by its own moments) through the dense layer.
    gamma, beta = first.gamma.numpy(), first.beta.numpy()
    normalised = np.concatenate([(b - b.mean(0)) / np.sqrt(b.var(0) + first.epsilon) * gamma + beta for b in batches])
    kernel, bias = (v.numpy() for v in dense.weights)
    hidden = normalised @ kernel + bias
    second = _layer(model, "on_dense")
    np.testing.assert_allclose(second.moving_mean.numpy(), hidden.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(second.moving_variance.numpy(), hidden.var(0), rtol=1e-4)

    frozen = _layer(model, "frozen")
    np.testing.assert_array_equal(frozen.moving_mean.numpy(), 5.0)
    np.testing.assert_array_equal(frozen.moving_variance.numpy(), 9.0)
    assert first.momentum == second.momentum == 0.97 and frozen.momentum == 0.99
    for before, v in zip(weights, model.trainable_variables):
        np.testing.assert_array_equal(v.numpy(), before)


def test_batchnorm_refresh_inside_the_average_replaces_the_emas_statistics():
    model = _bn_model()
    optimizer = _compile(model, 0.9)
    model.fit(*_data(), batch_size=4, epochs=1, verbose=0)
    bn = next(layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization))
    raw = bn.moving_mean.numpy().copy(), bn.moving_variance.numpy().copy()
    averages = [v.numpy().copy() for v in optimizer.averages]
    x = _data()[0]
    with optimization.averaged_weights(model):
        optimization.BatchNormRefresh(model, [x[:8], x[8:]], num_batches=2)()
        # Expected: the EMA kernel and bias give the layer's inputs.
        kernel, bias = model.layers[1].kernel.numpy(), model.layers[1].bias.numpy()
        hidden = x.astype(np.float64) @ kernel + bias
    names = [v.name for v in optimizer.averaged_variables]
    mean = optimizer.averages[names.index("moving_mean")].numpy()
    variance = optimizer.averages[names.index("moving_variance")].numpy()
    np.testing.assert_allclose(mean, hidden.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(variance, hidden.var(0), rtol=1e-4)
    # The raw statistics and every other average are untouched.
    np.testing.assert_array_equal(bn.moving_mean.numpy(), raw[0])
    np.testing.assert_array_equal(bn.moving_variance.numpy(), raw[1])
    for name, before, after in zip(names, averages, optimizer.averages):
        if name not in ("moving_mean", "moving_variance"):
            np.testing.assert_array_equal(after.numpy(), before)


def test_l2_term_gradient_is_decay_times_kernel_and_spares_batchnorm_and_biases():
    detector = Detector(heads={"a": 2}, image_size=128, width_multiplier=0.125, fpn_channels=16,
                        fpn_repeats=1, head_depth=1)
    decay = 4e-5
    detector.compile(optimizer="sgd", l2_weight_decay=decay, l2_variables=optimization.decay_variables(detector))
    with tf.GradientTape() as tape:
        loss = detector.l2_loss()
    grads = tape.gradient(loss, detector.trainable_variables)
    spared = {id(v) for v in optimization.no_decay_variables(detector)}
    kernels = [(v, g) for v, g in zip(detector.trainable_variables, grads) if id(v) not in spared]
    others = [(v, g) for v, g in zip(detector.trainable_variables, grads) if id(v) in spared]
    assert any("kernel" in v.name for v, _ in kernels)
    assert any(v.name in ("gamma", "beta") for v, _ in others) and any(v.name == "bias" for v, _ in others)
    assert not [v.name for v, _ in kernels if v.name in ("gamma", "beta", "bias")]
    for v, g in kernels:
        np.testing.assert_allclose(g.numpy(), decay * v.numpy(), rtol=1e-5, atol=1e-12)
    for v, g in others:
        assert g is None or not np.any(g.numpy()), v.path
    # The value is decay * sum(v**2) / 2 over the kernels.
    expected = decay * sum(float(np.sum(v.numpy().astype(np.float64) ** 2)) for v, _ in kernels) / 2
    np.testing.assert_allclose(float(loss), expected, rtol=1e-4)


# One SGD step with clipping active, on two logical CPUs and on one device,
# for the same global batch, with Keras's SGD and with the recipe's: a tiny
# Detector with synchronised BatchNorm. The second replica's half holds no
# object: each head's loss is normalised by the global batch's positives
# (losses.normaliser), so the two-replica loss is still the one-device loss;
# a per-replica count would divide that half's background loss by 1.
TWO_REPLICAS = """
import json, sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from effdet_tf import optimization, train_lib
from effdet_tf.modeling.detector import Detector
from effdet_tf.ops.label_encoder import LabelEncoder

TINY = dict(heads={"a": 3}, image_size=128, width_multiplier=0.125, depth_multiplier=0.34, fpn_channels=16,
            fpn_repeats=1, head_depth=1)

def updates(strategy, data):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        detector = Detector(**TINY)
        if isinstance(strategy, tf.distribute.MirroredStrategy):
            train_lib.set_sync_batchnorm(detector)
    initial = detector.get_weights()
    out = {}
    for kind in sys.argv[1:]:
        detector.set_weights(initial)
        with strategy.scope():
            make = keras.optimizers.SGD if kind == "keras" else optimization.recipe_class("sgd")
            optimizer = make(0.05, momentum=0.9, global_clipnorm=0.05)
            detector.compile(optimizer=optimizer)
            optimizer.build(detector.trainable_variables)
        before = [v.numpy() for v in detector.trainable_variables]
        detector.fit(data, epochs=1, verbose=0, shuffle=False)
        out[kind] = [v.numpy() - b for v, b in zip(detector.trainable_variables, before)]
    return out

rng = np.random.default_rng(0)
encoder = LabelEncoder(Detector(**TINY).anchors)
none = np.zeros((0, 4), "float32")
boxes = [np.array([[10, 10, 60, 70], [70, 20, 120, 50]], "float32"), np.array([[30, 40, 100, 110]], "float32"),
         none, none]
classes = [np.array([0, 2], "int32"), np.array([1], "int32"), np.zeros(0, "int32"), np.zeros(0, "int32")]
encoded = [encoder(tf.constant(b), tf.constant(c), tf.zeros(len(c), tf.bool)) for b, c in zip(boxes, classes)]
images = rng.uniform(0, 255, size=(4, 128, 128, 3)).astype("float32")
targets = {k: tf.stack([e[k] for e in encoded]) for k in encoded[0]}
data = tf.data.Dataset.from_tensors(({"a": images}, {"a": targets}))
two = updates(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), data)
one = updates(tf.distribute.OneDeviceStrategy("/cpu:0"), data)

def norm(u):
    return sum(float(np.sum(x.astype(np.float64) ** 2)) for x in u) ** 0.5

print(json.dumps({kind: {"two_vs_one": norm([a - b for a, b in zip(two[kind], one[kind])]) / norm(one[kind]),
                         "two_over_one_norm": norm(two[kind]) / norm(one[kind])} for kind in two}))
"""


def two_replica_updates(*kinds):
    """{kind: two-replica vs one-device update} for optimizer kinds
    "recipe" and/or "keras" (Keras's own SGD with global_clipnorm)."""
    done = subprocess.run([sys.executable, "-c", TWO_REPLICAS, *kinds], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_clipping_applies_to_the_global_gradient_under_two_replicas():
    """The recipe clips the sum of the replicas' gradients, as one device
    does: same update. (Keras clips each replica's half, so with both halves
    clipped its two-replica step is twice the one-device step:
    `python tests/optimization_test.py` prints both; BENCHMARKS.md.)"""
    r = two_replica_updates("recipe")
    assert r["recipe"]["two_vs_one"] < 1e-3, r
    np.testing.assert_allclose(r["recipe"]["two_over_one_norm"], 1.0, atol=1e-3)


if __name__ == "__main__":
    print(json.dumps(two_replica_updates("keras", "recipe")))


def test_replannable_schedule_is_keras_cosine_of_the_planned_length():
    """--train_minutes' schedule equals Keras's CosineDecay with warm-up of
    the length it was (re)planned to, at every step."""
    peak, warmup = 0.01, 5
    schedule = optimization.ReplannableSchedule(peak, total_steps=40, warmup_steps=warmup)
    for total in (40, 25, 90):
        schedule.replan(total)
        reference, _ = optimization.learning_rate_schedule(peak, total, warmup)
        steps = np.arange(0, total + 10)
        ours = np.array([float(schedule(s)) for s in steps])
        keras_lr = np.array([float(reference(s)) for s in steps])
        np.testing.assert_allclose(ours, keras_lr, rtol=1e-5, atol=1e-9)
        assert ours[warmup] == pytest.approx(peak) and ours[total] == pytest.approx(0.0, abs=1e-9)


def test_train_minutes_builds_the_replannable_schedule():
    config = TrainConfig(optimizer="adam", train_minutes=5.0, warmup_epochs=1.0, epochs=10, learning_rate=0.008,
                         lr_reference_batch=64, ema_momentum=0.0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    optimizer = optimization.make_optimizer(config, model, images_per_step=8, steps_per_epoch=20)
    schedule = optimizer.replannable_schedule
    assert isinstance(schedule, optimization.ReplannableSchedule)
    schedule.replan(60)
    # Peak 0.008 * 8 / 64 at the end of the 20-step warm-up; half of it
    # halfway through the cosine (step 20 + 40 / 2).
    assert float(schedule(20)) == pytest.approx(0.001)
    assert float(schedule(40)) == pytest.approx(0.0005)
    fixed = optimization.make_optimizer(dataclasses.replace(config, train_minutes=0.0), model, 8, 20)
    assert not hasattr(fixed, "replannable_schedule")
