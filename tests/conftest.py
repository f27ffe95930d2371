"""Shared test helpers: the tiny model presets and the round trips every
model part's test runs (keras-hub's TestCase.run_model_saving_test is the
model). Tests stay small: 64-128 px, narrow widths."""

import keras
import numpy as np

# The tiny Detector most tests build: 128 px, 1/8 width, one BiFPN repeat.
TINY_DETECTOR = dict(image_size=128, width_multiplier=0.125, depth_multiplier=0.34, fpn_channels=16,
                     fpn_repeats=1, head_depth=1)


def config_round_trip(obj):
    """type(obj).from_config(obj.get_config()) with an equal config: returns
    the clone for further checks."""
    config = obj.get_config()
    clone = type(obj).from_config(config)
    assert clone.get_config() == config, type(obj).__name__
    return clone


def saving_round_trip(model, inputs, path, atol=1e-6):
    """model.save(path) -> keras.saving.load_model: the same class and the
    same outputs on `inputs` in inference mode (any nesting of outputs;
    atol=0 asks for bit-identical). Returns the loaded model."""
    before = model(inputs, training=False)
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is type(model), (type(loaded), type(model))
    after = loaded(inputs, training=False)
    expected, got = keras.tree.flatten(before), keras.tree.flatten(after)
    assert len(expected) == len(got)
    for a, b in zip(expected, got):
        a, b = keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b)
        if atol:
            np.testing.assert_allclose(a, b, atol=atol)
        else:
            np.testing.assert_array_equal(a, b)
    return loaded
