"""Tests for effdet_tf.modeling.heads (ClassNet, BoxNet)."""

import math
import os

import numpy as np

import keras

from conftest import config_round_trip, saving_round_trip
from effdet_tf.modeling.heads import BoxNet, ClassNet


def _levels(size, channels=64, batch=1, seed=0):
    rng = np.random.default_rng(seed)
    return [
        rng.standard_normal((batch, size // 2**l, size // 2**l, channels)).astype("float32")
        for l in range(3, 8)
    ]


def test_shapes_at_512():
    feats = _levels(512)
    cls = ClassNet(5)(feats)
    box = BoxNet()(feats)
    # 9 * (64^2 + 32^2 + 16^2 + 8^2 + 4^2) anchors.
    assert tuple(cls.shape) == (1, 49104, 5)
    assert tuple(box.shape) == (1, 49104, 4)


def test_shapes_at_128_and_symbolic_shape():
    feats = _levels(128, channels=16, batch=2)
    net = ClassNet(10, width=16, depth=2)
    out = net(feats)
    n = 9 * (16 * 16 + 8 * 8 + 4 * 4 + 2 * 2 + 1)
    assert tuple(out.shape) == (2, n, 10)
    assert net.compute_output_shape([f.shape for f in feats]) == (2, n, 10)


def test_shared_convs_per_level_bn_and_prior_bias():
    net = ClassNet(3, width=16, depth=3)
    net(_levels(128, channels=16))
    paths = [w.path for w in net.weights]
    # One depthwise+pointwise kernel per repeat (shared), plus the predictor.
    assert sum("depthwise_kernel" in p for p in paths) == 4
    # BN per repeat and level: 3 * 5 gammas.
    assert sum(p.endswith("gamma") for p in paths) == 15
    bias = keras.ops.convert_to_numpy(net.predict.bias)
    np.testing.assert_allclose(bias, -math.log(0.99 / 0.01), rtol=1e-6)
    # At initialisation every anchor's probability is near the 0.01 prior.
    box = BoxNet(width=16)
    box(_levels(128, channels=16))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(box.predict.bias), 0.0)


def test_output_order_is_level_row_column_anchor():
    # Make the predictor output channel c = anchor * K + k equal to a known
    # per-location code, then check where each value lands in [B, N, K].
    k, a = 2, 3
    net = ClassNet(k, num_anchors=a, width=4, depth=1, num_levels=2)
    feats = [np.zeros((1, 4, 4, 4), "float32"), np.zeros((1, 2, 2, 4), "float32")]
    net(feats)
    # Zero kernels: output = bias; give channel c bias c.
    net.predict.depthwise_kernel.assign(np.zeros_like(net.predict.depthwise_kernel))
    net.predict.pointwise_kernel.assign(np.zeros_like(net.predict.pointwise_kernel))
    net.predict.bias.assign(np.arange(a * k, dtype="float32"))
    out = keras.ops.convert_to_numpy(net(feats))
    assert out.shape == (1, (16 + 4) * a, k)
    # Anchor index j within a location: row j % a holds channels [j*K, j*K+K).
    for n in range(out.shape[1]):
        anchor = n % a
        np.testing.assert_array_equal(out[0, n], [anchor * k, anchor * k + 1])


def test_float32_outputs_under_mixed_precision():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        feats = [keras.ops.cast(f, "float16") for f in _levels(128, channels=16)]
        cls = ClassNet(5, width=16)
        box = BoxNet(width=16)
        assert cls.convs[0].compute_dtype == "float16"
        assert keras.backend.standardize_dtype(cls(feats).dtype) == "float32"
        assert keras.backend.standardize_dtype(box(feats).dtype) == "float32"
    finally:
        keras.config.set_dtype_policy(previous)
    assert keras.config.dtype_policy().name == previous.name


def test_config_and_keras_round_trip(tmp_path):
    net = ClassNet(7, width=8, depth=2, name="cls")
    config_round_trip(net)
    config_round_trip(BoxNet(width=8))

    inputs = [keras.Input((128 // 2**l, 128 // 2**l, 8), name=f"P{l}") for l in range(3, 8)]
    model = keras.Model(inputs, [net(inputs), BoxNet(width=8, depth=2)(inputs)])
    feats = _levels(128, channels=8, seed=2)
    model(feats, training=True)
    saving_round_trip(model, feats, os.path.join(tmp_path, "heads.keras"))
