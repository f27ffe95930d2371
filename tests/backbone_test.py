"""Tests for effdet_tf.modeling.backbone.CSPDarknet53."""

import os

import numpy as np
import pytest

import keras

from conftest import config_round_trip, saving_round_trip
from effdet_tf.modeling.backbone import CSPDarknet53, num_darknet_convs

NARROW = dict(width_multiplier=0.25, depth_multiplier=0.34)


def test_full_backbone_param_count_and_shapes_at_512():
    # Symbolic shapes only: building at 512 costs no compute.
    model = CSPDarknet53(image_shape=(512, 512, 3))
    # keras-hub's CSPNetBackbone configured as timm's cspdarknet53 (Mish)
    # has exactly this many (BatchNorm moving statistics included).
    assert model.count_params() == 26_652_512
    shapes = {k: tuple(v.shape) for k, v in model.output.items()}
    assert shapes == {
        "P3": (None, 64, 64, 256),
        "P4": (None, 32, 32, 512),
        "P5": (None, 16, 16, 1024),
    }
    layers = model.darknet_layers()
    assert len(layers) == 72 == num_darknet_convs(1.0)
    # Darknet's order for stage 1 (yolov4.cfg layers 1-10).
    assert [l.name for l in layers[:9]] == [
        "stem",
        "stage1_down",
        "stage1_part2",
        "stage1_part1",
        "stage1_block0_conv1",
        "stage1_block0_conv2",
        "stage1_post",
        "stage1_transition",
        "stage2_down",
    ]
    # Stage 1's special widths: partial paths keep 64, the block's inner is 32.
    widths = {l.name: l.filters for l in layers}
    assert widths["stage1_part1"] == widths["stage1_part2"] == 64
    assert widths["stage1_block0_conv1"] == 32
    assert widths["stage1_block0_conv2"] == widths["stage1_post"] == 64
    assert widths["stage3_part1"] == widths["stage3_block7_conv1"] == 128
    assert widths["stage5_transition"] == 1024


def test_every_conv_is_biasless_conv_bn_mish():
    model = CSPDarknet53(**NARROW)
    for layer in model.darknet_layers():
        assert layer.conv.use_bias is False
        assert layer.activation == "mish"
        expected = 2 if layer.name.endswith("_down") else 1
        assert layer.strides == expected


@pytest.mark.parametrize("size", [128, 96])
def test_narrow_forward_shapes(size):
    model = CSPDarknet53(**NARROW)
    out = model(np.random.rand(2, size, size, 3).astype("float32"))
    assert set(out) == {"P3", "P4", "P5"}
    assert tuple(out["P3"].shape) == (2, size // 8, size // 8, 64)
    assert tuple(out["P4"].shape) == (2, size // 16, size // 16, 128)
    assert tuple(out["P5"].shape) == (2, size // 32, size // 32, 256)
    # Depth 0.34 -> blocks (1, 1, 3, 3, 1).
    assert len(model.darknet_layers()) == 1 + 5 * 5 + 2 * 9


def test_get_config_round_trip():
    model = CSPDarknet53(**NARROW, name="bb")
    clone = config_round_trip(model)
    assert clone.count_params() == model.count_params()
    clone.set_weights(model.get_weights())
    x = np.random.rand(1, 64, 64, 3).astype("float32")
    a, b = model(x), clone(x)
    for k in a:
        np.testing.assert_allclose(keras.ops.convert_to_numpy(a[k]), keras.ops.convert_to_numpy(b[k]), atol=1e-6)


def test_keras_save_load_round_trip(tmp_path):
    model = CSPDarknet53(**NARROW)
    # Train-mode pass so BatchNorm statistics are not at their defaults.
    x = np.random.rand(2, 64, 64, 3).astype("float32")
    model(x, training=True)
    loaded = saving_round_trip(model, x, os.path.join(tmp_path, "bb.keras"))
    assert set(loaded(x)) == {"P3", "P4", "P5"}
