"""Tests for effdet_tf.modeling.darknet_weights (files written by the test)."""

import numpy as np
import pytest

import keras

from effdet_tf.modeling.backbone import CSPDarknet53
from effdet_tf.modeling.darknet_weights import (
    DarknetWeightsError,
    darknet_cfg_indices,
    load_darknet_weights,
)

NARROW = dict(width_multiplier=0.25, depth_multiplier=0.34)


def _write_weights(path, backbone, version=(0, 2, 5), seen=123456, extra=0, cut=0, seed=0):
    """Write a Darknet file for `backbone`; return the per-layer arrays."""
    rng = np.random.default_rng(seed)
    major, minor, revision = version
    chunks, expected = [], []
    for layer in backbone.darknet_layers():
        h, w, c_in, n = layer.conv.kernel.shape
        beta = rng.standard_normal(n).astype("float32")
        gamma = rng.standard_normal(n).astype("float32")
        mean = rng.standard_normal(n).astype("float32")
        var = rng.random(n).astype("float32") + 0.5
        kernel = rng.standard_normal((n, c_in, h, w)).astype("float32")  # Darknet
        chunks += [beta, gamma, mean, var, kernel.ravel()]
        expected.append(dict(beta=beta, gamma=gamma, mean=mean, var=var, kernel=kernel))
    chunks.append(rng.standard_normal(extra).astype("float32"))
    body = np.concatenate(chunks).astype("<f4").tobytes()
    if cut:
        body = body[: len(body) - cut]
    wide = major * 10 + minor >= 2 and major < 1000 and minor < 1000
    header = np.array([major, minor, revision], "<i4").tobytes()
    header += np.array([seen], "<i8" if wide else "<i4").tobytes()
    with open(path, "wb") as f:
        f.write(header + body)
    return expected


def test_values_land_in_the_right_variables(tmp_path):
    backbone = CSPDarknet53(**NARROW)
    path = tmp_path / "narrow.weights"
    expected = _write_weights(path, backbone, extra=777)
    report = load_darknet_weights(backbone, path)

    layers = backbone.darknet_layers()
    assert report["version"] == "0.2.5"
    assert report["seen"] == 123456
    assert report["layers_loaded"] == len(layers) == 44
    assert report["values_left_unread"] == 777
    assert report["trailing_bytes"] == 0
    # Every value read is a backbone parameter (kernel + 4 BN vectors).
    assert report["values_loaded"] == backbone.count_params()

    for layer, e in zip(layers, expected):
        kernel = keras.ops.convert_to_numpy(layer.conv.kernel)
        n, c_in, h, w = e["kernel"].shape
        assert kernel.shape == (h, w, c_in, n)
        # Spot-check the transpose on one element, then everything.
        assert kernel[h - 1, 0, c_in - 1, 0] == e["kernel"][0, c_in - 1, h - 1, 0]
        np.testing.assert_array_equal(kernel, e["kernel"].transpose(2, 3, 1, 0))
        bn = layer.bn
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(bn.beta), e["beta"])
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(bn.gamma), e["gamma"])
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(bn.moving_mean), e["mean"])
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(bn.moving_variance), e["var"])


def test_loaded_stem_computes_darknet_conv(tmp_path):
    # The stem's output channel 0 at an interior pixel equals the Darknet
    # formula: mish(gamma * (conv - mean) / sqrt(var + eps) + beta).
    backbone = CSPDarknet53(**NARROW)
    path = tmp_path / "narrow.weights"
    e = _write_weights(path, backbone)[0]
    load_darknet_weights(backbone, path)
    stem = backbone.get_layer("stem")
    x = np.random.default_rng(1).random((1, 8, 8, 3)).astype("float32")
    y = keras.ops.convert_to_numpy(stem(x, training=False))
    patch = x[0, 2:5, 3:6, :]  # centred on (3, 4), 3x3 "same"
    conv = np.sum(patch.transpose(2, 0, 1) * e["kernel"][0])
    z = e["gamma"][0] * (conv - e["mean"][0]) / np.sqrt(e["var"][0] + stem.bn_epsilon) + e["beta"][0]
    mish = z * np.tanh(np.log1p(np.exp(z)))
    np.testing.assert_allclose(y[0, 3, 4, 0], mish, rtol=1e-4, atol=1e-5)


def test_old_header_with_int32_seen(tmp_path):
    backbone = CSPDarknet53(**NARROW)
    path = tmp_path / "old.weights"
    _write_weights(path, backbone, version=(0, 1, 0), seen=42)
    report = load_darknet_weights(backbone, path)
    assert report["version"] == "0.1.0" and report["seen"] == 42
    assert report["values_left_unread"] == 0


def test_truncated_file_names_layer_and_counts(tmp_path):
    backbone = CSPDarknet53(**NARROW)
    path = tmp_path / "cut.weights"
    _write_weights(path, backbone, cut=4 * 10 + 2)  # 10.5 float32s short
    last = backbone.darknet_layers()[-1]
    h, w, c_in, n = last.conv.kernel.shape
    expected = 4 * n + n * c_in * h * w
    with pytest.raises(DarknetWeightsError) as err:
        load_darknet_weights(backbone, path)
    msg = str(err.value)
    assert "truncated at conv 44 of 44" in msg
    assert "stage5_transition" in msg
    assert f"expected {expected} float32 values, found {expected - 11}" in msg


def test_header_that_cannot_be_darknet(tmp_path):
    backbone = CSPDarknet53(**NARROW)
    path = tmp_path / "png.weights"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(DarknetWeightsError, match="cannot be a Darknet weights file"):
        load_darknet_weights(backbone, path)
    path.write_bytes(bytes(6))
    with pytest.raises(DarknetWeightsError, match="expected 12 bytes"):
        load_darknet_weights(backbone, path)


def test_full_backbone_cfg_layer_numbers():
    # yolov4.cfg: stem 0; stage 1 = 1 (down), 2 (part2), 4 (part1), 5, 6
    # (block), 8 (post), 10 (transition); stage 2 starts at 11; the
    # backbone's last conv is layer 104 (yolov4.conv.137 stops at 136).
    backbone = CSPDarknet53(image_shape=(64, 64, 3))
    idx = darknet_cfg_indices(backbone.darknet_layer_names)
    assert len(idx) == 72
    assert idx[:12] == [0, 1, 2, 4, 5, 6, 8, 10, 11, 12, 14, 15]
    assert idx[-1] == 104
    # Stage boundaries (downsample convs) at 1, 11, 24, 55, 86.
    downs = [i for i, n in zip(idx, backbone.darknet_layer_names) if n.endswith("_down")]
    assert downs == [1, 11, 24, 55, 86]
