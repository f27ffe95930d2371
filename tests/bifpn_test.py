"""Tests for effdet_tf.modeling.bifpn.BiFPN."""

import os

import numpy as np

import keras

from conftest import config_round_trip, saving_round_trip
from effdet_tf.modeling.bifpn import BiFPN, bifpn_nodes


def _features(size, channels=(256, 512, 1024), batch=1, seed=0):
    rng = np.random.default_rng(seed)
    return {
        f"P{l}": rng.random((batch, size // 2**l, size // 2**l, c), "float32")
        for l, c in zip((3, 4, 5), channels)
    }


def _to_global_ids(min_level, max_level):
    """Our (level, index) node list in automl's global-id numbering."""
    ids = {l: [l - min_level] for l in range(min_level, max_level + 1)}
    next_id = max_level - min_level + 1
    out = []
    for level, inputs in bifpn_nodes(min_level, max_level):
        out.append((level, [ids[l][i] for l, i in inputs]))
        ids[level].append(next_id)
        next_id += 1
    return out


def test_node_graph_matches_automl_bifpn_config():
    # google/automl efficientdet/keras/fpn_configs.py, bifpn_config(3, 7):
    # P6'=[3,4] P5'=[2,5] P4'=[1,6] P3"=[0,7] P4"=[1,7,8] P5"=[2,6,9]
    # P6"=[3,5,10] P7"=[4,11].
    assert _to_global_ids(3, 7) == [
        (6, [3, 4]),
        (5, [2, 5]),
        (4, [1, 6]),
        (3, [0, 7]),
        (4, [1, 7, 8]),
        (5, [2, 6, 9]),
        (6, [3, 5, 10]),
        (7, [4, 11]),
    ]


def test_d0_shapes_at_512():
    neck = BiFPN()
    out = neck(_features(512))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "P3": (1, 64, 64, 64),
        "P4": (1, 32, 32, 64),
        "P5": (1, 16, 16, 64),
        "P6": (1, 8, 8, 64),
        "P7": (1, 4, 4, 64),
    }
    # 3 cells x 8 nodes, each with one fusion and one separable conv.
    assert sum(1 for w in neck.weights if "fusion_weights" in w.path) == 24
    # Resampling 1x1 convs: P6 from P5, then per edge in the first cell:
    # P5', P4', P3", P4", P5" each take one backbone map of != 64 channels.
    resample = [w for w in neck.weights if "resample_conv" in w.path]
    assert len(resample) == 6


def test_small_size_and_symbolic_shapes_agree():
    neck = BiFPN(num_channels=16, num_repeats=2)
    feats = _features(128, channels=(16, 32, 64), batch=2)
    out = neck(feats)
    expected = neck.compute_output_shape({k: v.shape for k, v in feats.items()})
    for k in out:
        assert tuple(out[k].shape) == tuple(expected[k])
    assert tuple(out["P7"].shape) == (2, 1, 1, 16)


def test_no_resample_conv_when_channels_match():
    neck = BiFPN(num_channels=16, num_repeats=1)
    neck(_features(128, channels=(16, 16, 16)))
    assert not [w for w in neck.weights if "resample" in w.path]


def test_odd_sizes_are_cropped_or_padded():
    neck = BiFPN(num_channels=8, num_repeats=1)
    # What the backbone gives for a 200x104 input (floor halving).
    feats = {
        "P3": np.ones((1, 25, 13, 8), "float32"),
        "P4": np.ones((1, 12, 6, 8), "float32"),
        "P5": np.ones((1, 6, 3, 8), "float32"),
    }
    out = neck(feats)
    shapes = {k: tuple(v.shape[1:3]) for k, v in out.items()}
    assert shapes == {"P3": (25, 13), "P4": (12, 6), "P5": (6, 3), "P6": (3, 2), "P7": (2, 1)}


def test_dynamic_shapes_in_a_traced_graph():
    import tensorflow as tf

    neck = BiFPN(num_channels=8, num_repeats=1)
    spec = {
        f"P{l}": tf.TensorSpec((None, None, None, c), tf.float32)
        for l, c in zip((3, 4, 5), (8, 16, 32))
    }
    fn = tf.function(lambda f: neck(f), input_signature=[spec])
    for size in (128, 200):
        feats = {
            "P3": np.ones((1, size // 8, size // 8, 8), "float32"),
            "P4": np.ones((1, size // 16, size // 16, 16), "float32"),
            "P5": np.ones((1, size // 32, size // 32, 32), "float32"),
        }
        out = fn(feats)
        assert tuple(out["P3"].shape) == (1, size // 8, size // 8, 8)
        assert tuple(out["P7"].shape[1:3]) == (-(-size // 128),) * 2


def test_fusion_uses_all_inputs():
    # Gradient w.r.t. each backbone input is non-zero: every map feeds the output.
    import tensorflow as tf

    neck = BiFPN(num_channels=8, num_repeats=1)
    feats = {k: tf.constant(v) for k, v in _features(128, (8, 16, 32)).items()}
    with tf.GradientTape() as tape:
        tape.watch(feats)
        out = neck(feats, training=True)
        loss = sum(tf.reduce_sum(v * v) for v in out.values())
    grads = tape.gradient(loss, feats)
    for k, g in grads.items():
        assert float(tf.reduce_sum(tf.abs(g))) > 0, k


def test_config_and_keras_round_trip(tmp_path):
    neck = BiFPN(num_channels=8, num_repeats=2, name="neck")
    config_round_trip(neck)

    inputs = {
        "P3": keras.Input((16, 16, 8), name="P3"),
        "P4": keras.Input((8, 8, 16), name="P4"),
        "P5": keras.Input((4, 4, 32), name="P5"),
    }
    model = keras.Model(inputs, neck(inputs))
    feats = _features(128, (8, 16, 32), seed=1)
    model(feats, training=True)  # move BN statistics off their defaults
    saving_round_trip(model, feats, os.path.join(tmp_path, "neck.keras"))
