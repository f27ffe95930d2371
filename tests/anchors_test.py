"""Tests for effdet_tf.ops.anchors: count, layout, known positions."""

import math

import numpy as np

from conftest import config_round_trip
from effdet_tf.ops.anchors import Anchors


def test_count_and_level_sizes_at_512():
    anchors = Anchors(512)
    assert anchors.num_anchors_per_location == 9
    assert anchors.level_sizes == [(64, 64), (32, 32), (16, 16), (8, 8),
                                   (4, 4)]
    assert anchors.boxes.shape == (49104, 4)
    assert anchors.num_anchors == 49104
    assert anchors.level_num_anchors == [36864, 9216, 2304, 576, 144]


def test_first_anchors_of_level_3_by_hand():
    boxes = Anchors(512).numpy()
    # Level 3: stride 8, centre (4, 4), base 4 * 8 = 32.
    np.testing.assert_allclose(boxes[0], [-12.0, -12.0, 20.0, 20.0])
    # Anchor 1 of the location: octave 0, ratio 2 (w = 32 sqrt2, h = 32/sqrt2).
    half_w, half_h = 16 * math.sqrt(2), 16 / math.sqrt(2)
    np.testing.assert_allclose(
        boxes[1], [4 - half_h, 4 - half_w, 4 + half_h, 4 + half_w], rtol=1e-6)
    # Row 1, column 2, anchor 5 (octave 1, ratio 0.5): centre (12, 20).
    index = (1 * 64 + 2) * 9 + 5
    base = 32 * 2 ** (1 / 3)
    half_w, half_h = base * math.sqrt(0.5) / 2, base / math.sqrt(0.5) / 2
    np.testing.assert_allclose(
        boxes[index], [12 - half_h, 20 - half_w, 12 + half_h, 20 + half_w],
        rtol=1e-6)


def test_level_7_anchor_by_hand():
    boxes = Anchors(512).numpy()
    start = 36864 + 9216 + 2304 + 576
    # Level 7: stride 128, 4x4 grid; row 3, column 1 -> centre (448, 192);
    # anchor 6 = octave 2, ratio 1: side 4 * 128 * 2^(2/3).
    index = start + (3 * 4 + 1) * 9 + 6
    half = 4 * 128 * 2 ** (2 / 3) / 2
    np.testing.assert_allclose(
        boxes[index], [448 - half, 192 - half, 448 + half, 192 + half],
        rtol=1e-6)
    np.testing.assert_allclose(boxes[start], [-192, -192, 320, 320])


def test_order_is_level_row_column_anchor():
    boxes = Anchors(512).numpy()
    level3 = boxes[:36864].reshape(64, 64, 9, 4)
    centres_y = (level3[..., 0] + level3[..., 2]) / 2
    centres_x = (level3[..., 1] + level3[..., 3]) / 2
    np.testing.assert_allclose(centres_y[:, 0, 0], 4 + 8 * np.arange(64))
    np.testing.assert_allclose(centres_x[0, :, 0], 4 + 8 * np.arange(64))
    # The 9 anchors of a location share the centre; scale-major then ratio.
    np.testing.assert_allclose(centres_y[5, 7], 44.0)
    heights = level3[0, 0, :, 2] - level3[0, 0, :, 0]
    widths = level3[0, 0, :, 3] - level3[0, 0, :, 1]
    np.testing.assert_allclose(widths / heights,
                               [1, 2, 0.5] * 3, rtol=1e-5)
    np.testing.assert_allclose(np.sqrt(widths * heights)[::3],
                               32 * 2 ** (np.arange(3) / 3), rtol=1e-5)


def test_small_and_non_square_sizes():
    small = Anchors(64)
    # ceil-halving: 8, 4, 2, 1, 1 -> (64 + 16 + 4 + 1 + 1) * 9.
    assert small.level_sizes == [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    assert small.num_anchors == 774
    rect = Anchors((256, 128), min_level=3, max_level=5, num_scales=1,
                   aspect_ratios=(1.0,), anchor_scale=1.0)
    assert rect.num_anchors_per_location == 1
    assert rect.num_anchors == 32 * 16 + 16 * 8 + 8 * 4
    np.testing.assert_allclose(rect.numpy()[0], [0, 0, 8, 8])


def test_get_config_round_trip():
    anchors = Anchors(128, aspect_ratios=(1.0, 2.0), anchor_scale=3.0)
    clone = config_round_trip(anchors)
    np.testing.assert_array_equal(clone.numpy(), anchors.numpy())
