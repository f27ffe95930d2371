"""Config -> Detector: the one place where the configuration meets the
network's constructors (the Model Garden's factory.build_retinanet plays
this part there). Training, export, --init_from and the tests build through
it."""

import keras

from effdet_tf.config import Config
from effdet_tf.modeling.detector import Detector


def build_detector(config: Config, dtype=None) -> Detector:
    """A built Detector for `config` (weights freshly initialised), under the
    global dtype policy, or under `dtype` (e.g. "float32") if given."""
    if dtype is None:
        return Detector(**config.detector_kwargs())
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(dtype)
    try:
        return Detector(**config.detector_kwargs(), dtype=dtype)
    finally:
        keras.config.set_dtype_policy(previous)
