"""Tests for benchmarks/yolov8_peer.py, the keras-cv YOLOV8Detector side of
benchmarks/real_data.py: the letterbox's inverse. tests/real_data_test.py runs
the peer end to end through the benchmark (its CLI, a tiny budget)."""

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import yolov8_peer  # noqa: E402


def test_letterbox_maps_back_to_original_pixels():
    import keras_cv
    import tensorflow as tf

    # The pixels: a bright rectangle found in the letterboxed image maps back
    # onto where it was drawn (a stretch, centred padding or the wrong axis
    # would move it by tens of pixels).
    image = np.zeros((90, 150, 3), np.uint8)
    image[20:60, 30:75] = 255
    boxed, factors = yolov8_peer.letterbox(tf.constant(image), 64)
    assert boxed.shape == (64, 64, 3)
    ys, xs = np.nonzero(boxed.numpy()[..., 0] > 127)
    found = [[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]]
    back = yolov8_peer.to_original(found, factors.numpy(), 90, 150)
    np.testing.assert_allclose(back, [[30, 20, 75, 60]], atol=2.5)  # 1 model px = 2.3 px here

    # The boxes: keras-cv's own forward mapping of ground truth, undone
    # exactly, on a size whose resized side is not a whole number
    # (333 * 0.64 = 213.12).
    h, w = 333, 500
    boxes = np.array([[10, 20, 110, 70], [250, 100, 500, 333], [0, 0, 500, 333]], np.float32)
    resize = keras_cv.layers.Resizing(320, 320, pad_to_aspect_ratio=True, bounding_box_format="xyxy")
    out = resize({"images": tf.zeros([h, w, 3]),
                  "bounding_boxes": {"boxes": tf.constant(boxes), "classes": tf.zeros([3])}})
    forward = keras_cv.bounding_box.to_dense(out["bounding_boxes"])["boxes"].numpy()
    _, factors = yolov8_peer.letterbox(tf.zeros([h, w, 3], tf.uint8), 320)
    np.testing.assert_allclose(yolov8_peer.to_original(forward, factors.numpy(), h, w), boxes, atol=1e-3)
    # Clipped to the original image (the padding lies outside it).
    assert yolov8_peer.to_original([[300, 200, 320, 320]], factors.numpy(), h, w)[0, 3] == h
