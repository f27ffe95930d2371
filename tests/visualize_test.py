"""Tests for effdet_tf.visualize.draw_detections."""

import numpy as np
import pytest

from effdet_tf.visualize import class_color, draw_detections


def _blank(h=100, w=160):
    return np.zeros((h, w, 3), np.uint8)


def test_draws_box_edges_in_class_color_and_leaves_input_untouched():
    image = _blank()
    out = draw_detections(image, [[20, 30, 80, 120]], [3], [0.9], {3: "cup"})
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert not image.any(), "input must not be modified"
    color = np.array(class_color(3))
    # Left and bottom edges carry the box colour (label sits at the top).
    assert (out[50, 30] == color).all()
    assert (out[80, 75] == color).all()
    # The inside of the box, away from the label, stays untouched.
    assert not out[60, 75].any()


def test_label_is_drawn_and_fixed_color_used():
    out = draw_detections(_blank(), [[40, 30, 90, 150]], [0], [0.5], ["thing"], color=(0, 255, 0))
    assert (out[70, 30] == (0, 255, 0)).all()
    # A filled label background above the box.
    label_region = out[20:40, 31:60]
    assert (label_region == (0, 255, 0)).all(axis=-1).mean() > 0.3


def test_names_from_list_dict_string_keys_and_missing():
    for names in (["a", "b"], {1: "b"}, {"1": "b"}, None, {}):
        out = draw_detections(_blank(), [[10, 10, 50, 50]], [1], None, names)
        assert out.any()


def test_clipped_empty_and_nonfinite_boxes():
    out = draw_detections(
        _blank(),
        [[-10, -10, 500, 500], [30, 30, 30, 60], [np.nan, 0, 10, 10]],
        [0, 1, 2],
        [0.9, 0.8, 0.7],
        None,
    )
    assert out.any()
    # Empty input draws nothing.
    out = draw_detections(_blank(), np.zeros((0, 4)), np.zeros((0,)), np.zeros((0,)), None)
    assert not out.any()


def test_float_image_and_bad_shapes():
    out = draw_detections(np.full((64, 64, 3), 300.0), [[5, 5, 40, 40]], [0], None, None)
    assert out.dtype == np.uint8
    with pytest.raises(ValueError):
        draw_detections(np.zeros((64, 64)), [[0, 0, 1, 1]], [0], None, None)
    with pytest.raises(ValueError):
        draw_detections(_blank(), [[0, 0, 10, 10]], [0, 1], None, None)
    with pytest.raises(ValueError):
        draw_detections(_blank(), [[0, 0, 10, 10]], [0], [0.1, 0.2], None)


def test_distinct_class_colors():
    colors = {class_color(i) for i in range(20)}
    assert len(colors) == 20
