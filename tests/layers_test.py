"""Tests for effdet_tf.modeling.layers."""

import numpy as np
import pytest

import keras

from conftest import config_round_trip
from effdet_tf.modeling.layers import (
    ConvBNMish,
    FusedBatchNormalization,
    SeparableConvBN,
    WeightedFusion,
    mish,
)


def test_mish_values():
    x = np.array([-2.0, 0.0, 1.0, 3.0], "float32")
    expected = x * np.tanh(np.log1p(np.exp(x)))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(mish(x)), expected, rtol=1e-5)


def test_mish_gradient_matches_autodiff():
    import tensorflow as tf

    x = tf.constant(np.linspace(-30, 30, 301, dtype="float32"))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        ours = mish(x)
        ref = x * tf.math.tanh(tf.math.softplus(x))
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        tape.gradient(ours, x).numpy(), tape.gradient(ref, x).numpy(), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("training", [True, False])
def test_fused_batch_norm_matches_keras(training):
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(2.0, 3.0, (4, 5, 6, 7)).astype("float32"))
    ours = FusedBatchNormalization(momentum=0.9, epsilon=1e-3)
    ref = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-3)
    ours.build(x.shape)
    ref.build(x.shape)
    for layer in (ours, ref):
        layer.gamma.assign(rng.random(7).astype("float32") + 0.5)
        layer.beta.assign(np.arange(7, dtype="float32"))
        layer.moving_mean.assign(np.full(7, 1.5, "float32"))
        layer.moving_variance.assign(np.full(7, 4.0, "float32"))
    ref.gamma.assign(ours.gamma)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y1 = ours(x, training=training)
        y2 = ref(x, training=training)
        l1 = tf.reduce_sum(y1 * tf.range(7, dtype="float32"))
        l2 = tf.reduce_sum(y2 * tf.range(7, dtype="float32"))
    np.testing.assert_allclose(y1.numpy(), y2.numpy(), rtol=1e-4, atol=1e-4)
    g1 = tape.gradient(l1, [x, ours.gamma, ours.beta])
    g2 = tape.gradient(l2, [x, ref.gamma, ref.beta])
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(ours.moving_mean.numpy(), ref.moving_mean.numpy(), rtol=1e-5)
    # The fused kernel updates with the unbiased batch variance (n = 120).
    n = 4 * 5 * 6
    if training:
        batch_var = (ref.moving_variance.numpy() - 0.9 * 4.0) / 0.1
        expected = 0.9 * 4.0 + 0.1 * batch_var * n / (n - 1)
    else:
        expected = ref.moving_variance.numpy()
    np.testing.assert_allclose(ours.moving_variance.numpy(), expected, rtol=1e-4)


def test_fused_batch_norm_mixed_precision_and_frozen():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        bn = FusedBatchNormalization()
        x = keras.ops.cast(np.random.rand(2, 3, 3, 4) * 10, "float16")
        y = bn(x, training=True)
        assert keras.backend.standardize_dtype(y.dtype) == "float16"
        assert bn.moving_mean.dtype == "float32"
        assert float(keras.ops.max(bn.moving_mean)) > 0
    finally:
        keras.config.set_dtype_policy(previous)
    # trainable=False means inference mode, as in Keras: statistics frozen.
    bn = FusedBatchNormalization()
    bn.build((1, 2, 2, 3))
    bn.trainable = False
    bn(np.full((1, 2, 2, 3), 5.0, "float32"), training=True)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(bn.moving_mean), 0.0)


def test_conv_bn_mish_stride2_pads_top_left_like_darknet():
    layer = ConvBNMish(1, 3, strides=2, activation="linear")
    x = np.arange(1, 8 * 8 + 1, dtype="float32").reshape(1, 8, 8, 1)
    layer.build(x.shape)
    # A kernel that only reads its top-left tap: out[i, j] = in_padded[2i, 2j].
    kernel = np.zeros((3, 3, 1, 1), "float32")
    kernel[0, 0] = 1.0
    layer.conv.kernel.assign(kernel)
    out = keras.ops.convert_to_numpy(layer(x, training=False))[0, ..., 0]
    assert out.shape == (4, 4)
    scale = 1.0 / np.sqrt(1.0 + layer.bn_epsilon)  # fresh BN: mean 0, var 1
    # Padding is one row/column at the top/left, so tap (0, 0) of output
    # (i, j) reads input (2i - 1, 2j - 1), zero on the first row/column.
    expected = np.zeros((4, 4), "float32")
    img = x[0, ..., 0]
    for i in range(1, 4):
        for j in range(1, 4):
            expected[i, j] = img[2 * i - 1, 2 * j - 1]
    np.testing.assert_allclose(out, expected * scale, rtol=1e-5)


def test_conv_bn_mish_same_padding_and_no_bias():
    layer = ConvBNMish(4, 3)
    y = layer(np.ones((2, 10, 12, 3), "float32"))
    assert tuple(y.shape) == (2, 10, 12, 4)
    assert layer.conv.use_bias is False
    assert len(layer.trainable_weights) == 3  # kernel, gamma, beta


def test_conv_bn_mish_config_round_trip():
    config_round_trip(ConvBNMish(8, 1, strides=1, name="c"))


def test_separable_conv_bn():
    layer = SeparableConvBN(16)
    y = layer(np.ones((1, 8, 8, 5), "float32"))
    assert tuple(y.shape) == (1, 8, 8, 16)
    config_round_trip(layer)


def test_weighted_fusion_is_normalised_and_relu_clipped():
    fuse = WeightedFusion()
    a = np.full((1, 2, 2, 3), 2.0, "float32")
    b = np.full((1, 2, 2, 3), 4.0, "float32")
    out = keras.ops.convert_to_numpy(fuse([a, b]))
    np.testing.assert_allclose(out, 3.0 * 2 / (2 + 1e-4), rtol=1e-6)
    fuse.fusion_weights.assign(np.array([-1.0, 3.0], "float32"))
    out = keras.ops.convert_to_numpy(fuse([a, b]))
    np.testing.assert_allclose(out, 4.0 * 3 / (3 + 1e-4), rtol=1e-6)


def test_weighted_fusion_mixed_precision():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        fuse = WeightedFusion()
        a = keras.ops.ones((1, 2, 2, 3), "float16")
        out = fuse([a, a, a])
        assert keras.backend.standardize_dtype(out.dtype) == "float16"
        assert fuse.fusion_weights.dtype == "float32"
    finally:
        keras.config.set_dtype_policy(previous)
