"""Tests for effdet_tf.ops.boxes: formats, IoU, deltas, GIoU/CIoU."""

import math

import keras
import numpy as np
import tensorflow as tf

from effdet_tf.ops import boxes as box_ops


def _random_boxes(rng, n, size=512.0):
    yx = rng.uniform(0, size * 0.8, (n, 2))
    hw = rng.uniform(4, size * 0.5, (n, 2))
    return np.concatenate([yx, yx + hw], -1).astype(np.float32)


def test_iou_known_values_and_shapes():
    a = tf.constant([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 20.0]])
    b = tf.constant([[5.0, 5.0, 15.0, 15.0], [20.0, 20.0, 30.0, 30.0],
                     [0.0, 0.0, 10.0, 10.0]])
    got = box_ops.iou(a, b).numpy()
    want = np.array([[25 / 175, 0.0, 1.0],
                     [50 / 250, 0.0, 0.5]], np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # Empty side and batched leading dims.
    assert box_ops.iou(a, tf.zeros([0, 4])).shape == (2, 0)
    batched = box_ops.iou(tf.stack([a, a]), tf.stack([b, b]))
    np.testing.assert_allclose(batched.numpy()[1], want, rtol=1e-6)
    # Degenerate boxes: no NaN.
    z = tf.zeros([1, 4])
    assert box_ops.iou(z, z).numpy()[0, 0] == 0.0


def test_ioa_is_fraction_of_first_box():
    anchor = tf.constant([[0.0, 0.0, 10.0, 10.0]])
    crowd = tf.constant([[0.0, 0.0, 100.0, 5.0]])
    np.testing.assert_allclose(box_ops.ioa(anchor, crowd).numpy(), [[0.5]])


def test_encode_known_values():
    anchors = tf.constant([[0.0, 0.0, 10.0, 20.0]])  # cy 5, cx 10, h 10, w 20
    boxes = tf.constant([[5.0, 0.0, 15.0, 40.0]])    # cy 10, cx 20, h 10, w 40
    got = box_ops.encode(boxes, anchors).numpy()
    np.testing.assert_allclose(got, [[0.5, 0.5, 0.0, math.log(2.0)]],
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(box_ops.encode(anchors, anchors).numpy(),
                               np.zeros((1, 4)), atol=1e-7)


def test_degenerate_boxes_encode_to_finite_deltas():
    # A zero-height, zero-width box (padding) still gives finite targets:
    # centre_size floors the sides before encode divides and takes logs.
    flat = tf.constant([[5.0, 5.0, 5.0, 5.0]])
    cy, cx, h, w = box_ops.centre_size(flat)
    assert cy.numpy()[0] == 5.0 and h.numpy()[0] > 0.0 and w.numpy()[0] > 0.0
    deltas = box_ops.encode(flat, tf.constant([[0.0, 0.0, 10.0, 10.0]]))
    assert np.all(np.isfinite(deltas.numpy()))


def test_encode_decode_round_trip():
    rng = np.random.default_rng(0)
    boxes = _random_boxes(rng, 200)
    anchors = _random_boxes(rng, 200)
    deltas = box_ops.encode(boxes, anchors)
    assert deltas.dtype == tf.float32
    back = box_ops.decode(deltas, anchors).numpy()
    np.testing.assert_allclose(back, boxes, rtol=1e-4, atol=1e-3)
    # Broadcasting: one anchor set for a batch of deltas.
    batched = box_ops.decode(tf.stack([deltas, deltas]), anchors).numpy()
    np.testing.assert_allclose(batched[1], boxes, rtol=1e-4, atol=1e-3)


def test_decode_clamps_huge_deltas():
    anchors = tf.constant([[0.0, 0.0, 16.0, 16.0]])
    out = box_ops.decode(tf.constant([[0.0, 0.0, 100.0, 100.0]]), anchors)
    out = out.numpy()
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[0, 2] - out[0, 0], 1000.0, rtol=1e-4)


def test_format_conversions():
    yxyx = tf.constant([[10.0, 20.0, 50.0, 80.0]])
    np.testing.assert_allclose(box_ops.yxyx_to_xywh(yxyx).numpy(),
                               [[20.0, 10.0, 60.0, 40.0]])
    np.testing.assert_allclose(
        box_ops.xywh_to_yxyx(box_ops.yxyx_to_xywh(yxyx)).numpy(), yxyx)
    np.testing.assert_allclose(box_ops.yxyx_to_cxcywh(yxyx).numpy(),
                               [[30.0, 50.0, 40.0, 60.0]])
    np.testing.assert_allclose(
        box_ops.cxcywh_to_yxyx(box_ops.yxyx_to_cxcywh(yxyx)).numpy(), yxyx)
    norm = box_ops.normalize(yxyx, 100, 200).numpy()
    np.testing.assert_allclose(norm, [[0.1, 0.1, 0.5, 0.4]], rtol=1e-6)
    np.testing.assert_allclose(
        box_ops.denormalize(norm, 100, 200).numpy(), yxyx, rtol=1e-6)
    # Per-image sizes broadcast over a batch [B, K, 4] with [B, 1].
    batch = tf.stack([yxyx, yxyx])
    per_image = box_ops.normalize(batch, tf.constant([[100], [50]]),
                                  tf.constant([[200], [100]])).numpy()
    np.testing.assert_allclose(per_image[1], [[0.2, 0.2, 1.0, 0.8]],
                               rtol=1e-6)
    clipped = box_ops.clip(tf.constant([[-5.0, 10.0, 120.0, 300.0]]), 100,
                           200).numpy()
    np.testing.assert_allclose(clipped, [[0.0, 10.0, 100.0, 200.0]])


def test_giou_hand_values():
    a = tf.constant([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    b = tf.constant([[0.0, 2.0, 1.0, 3.0], [0.0, 0.0, 2.0, 2.0]])
    # Disjoint unit boxes: IoU 0, enclosure 3, union 2 -> -1/3. Same box: 1.
    np.testing.assert_allclose(box_ops.giou(a, b).numpy(), [-1 / 3, 1.0],
                               rtol=1e-5)


def test_giou_matches_keras_cv():
    import keras_cv  # tests may import keras-cv; the package may not.

    rng = np.random.default_rng(1)
    a = _random_boxes(rng, 32, 100.0)
    b = _random_boxes(rng, 32, 100.0)
    ours = np.mean(1.0 - box_ops.giou(a, b).numpy())
    theirs = keras_cv.losses.GIoULoss(bounding_box_format="yxyx")(a, b)
    np.testing.assert_allclose(ours, float(theirs), rtol=1e-5, atol=1e-6)


def test_ciou_matches_references():
    import keras_cv

    rng = np.random.default_rng(2)
    a = _random_boxes(rng, 32, 100.0)
    b = _random_boxes(rng, 32, 100.0)
    # General boxes: Keras core's compute_ciou (has the keras#20780 fix).
    theirs = keras.utils.bounding_boxes.compute_ciou(a, b, "yxyx")
    np.testing.assert_allclose(box_ops.ciou(a, b).numpy(),
                               np.asarray(theirs), rtol=1e-4, atol=1e-5)
    # keras-cv 0.9 squares 4/pi^2 in v; with equal aspect ratios v = 0 and
    # its CIoULoss must agree with ours exactly.
    hw = b[:, 2:] - b[:, :2]
    a_same_aspect = np.concatenate([a[:, :2], a[:, :2] + hw * 0.7], -1)
    ours = np.mean(1.0 - box_ops.ciou(a_same_aspect, b).numpy())
    kcv = keras_cv.losses.CIoULoss(bounding_box_format="yxyx")(
        a_same_aspect, b)
    np.testing.assert_allclose(ours, float(kcv), rtol=1e-5, atol=1e-6)
    # Identical boxes: CIoU 1; the aspect term is what separates these two.
    np.testing.assert_allclose(box_ops.ciou(a, a).numpy(), 1.0, atol=1e-5)


def test_works_in_tf_function_with_unknown_shapes():
    spec = tf.TensorSpec([None, None, 4], tf.float32)

    @tf.function(input_signature=[spec, spec])
    def fn(b1, b2):
        return (box_ops.iou(b1, b2),
                box_ops.decode(box_ops.encode(b1, b2), b2),
                box_ops.ciou(b1, b2))

    rng = np.random.default_rng(3)
    a = _random_boxes(rng, 6)[None]
    b = _random_boxes(rng, 6)[None]
    pairwise, round_trip, c = fn(a, b)
    assert pairwise.shape == (1, 6, 6)
    np.testing.assert_allclose(round_trip.numpy(), a, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(c.numpy(), box_ops.ciou(a, b).numpy(),
                               rtol=1e-6)
