"""Tests for effdet_tf.ops.postprocess: decode, per-class NMS, padding."""

import numpy as np
import tensorflow as tf

from effdet_tf.ops import boxes as box_ops
from effdet_tf.ops.anchors import Anchors
from effdet_tf.ops.postprocess import postprocess

ANCHORS = Anchors(128)
N = ANCHORS.num_anchors
C = 3
BOXES = ANCHORS.numpy()


def _location(level_offset, row, col, width, anchor):
    return level_offset + (row * width + col) * 9 + anchor


# Level 3 at 128 px: 16x16 grid. Octave 0 and octave 1 ratio-1 anchors at
# the same location overlap with IoU 2^(-2/3) = 0.63 > 0.5.
A_BIG = _location(0, 4, 4, 16, 3)    # octave 1, ratio 1
A_SMALL = _location(0, 4, 4, 16, 0)  # octave 0, ratio 1, same centre
A_FAR = _location(0, 12, 12, 16, 0)


def _outputs(planted, batch=1):
    logits = np.full((batch, N, C), -8.0, np.float32)
    for b, anchor, cls, logit in planted:
        logits[b, anchor, cls] = logit
    return tf.constant(logits), tf.zeros((batch, N, 4))


def test_overlap_premise():
    iou = box_ops.iou(BOXES[[A_BIG]], BOXES[[A_SMALL]]).numpy()[0, 0]
    assert 0.6 < iou < 0.65


def test_planted_boxes_come_back_with_their_classes():
    logits, deltas = _outputs([(0, A_FAR, 2, 5.0), (0, A_BIG, 0, 3.0)])
    # A non-zero delta moves the far box: decoding must be applied.
    deltas = deltas.numpy()
    deltas[0, A_FAR] = [0.25, -0.25, np.log(2.0), 0.0]
    out = postprocess(logits, tf.constant(deltas), ANCHORS, max_detections=10)
    assert out["boxes"].shape == (1, 10, 4)
    assert out["classes"].dtype == tf.int32
    assert out["num_detections"].numpy().tolist() == [2]
    np.testing.assert_array_equal(out["classes"].numpy()[0, :2], [2, 0])
    np.testing.assert_allclose(out["scores"].numpy()[0, :2],
                               1 / (1 + np.exp([-5.0, -3.0])), rtol=1e-5)
    want_far = box_ops.decode(deltas[0, A_FAR], BOXES[A_FAR]).numpy()
    np.testing.assert_allclose(out["boxes"].numpy()[0, 0], want_far,
                               rtol=1e-5)
    np.testing.assert_allclose(out["boxes"].numpy()[0, 1], BOXES[A_BIG],
                               rtol=1e-5)
    # Padding to max_detections with zeros.
    assert np.all(out["scores"].numpy()[0, 2:] == 0.0)
    assert np.all(out["boxes"].numpy()[0, 2:] == 0.0)


def test_nms_suppresses_within_class_not_across_classes():
    same = _outputs([(0, A_BIG, 1, 4.0), (0, A_SMALL, 1, 3.0)])
    out = postprocess(*same, ANCHORS)
    assert out["num_detections"].numpy()[0] == 1
    np.testing.assert_allclose(out["boxes"].numpy()[0, 0], BOXES[A_BIG],
                               rtol=1e-5)
    across = _outputs([(0, A_BIG, 1, 4.0), (0, A_SMALL, 2, 3.0)])
    out = postprocess(*across, ANCHORS)
    assert out["num_detections"].numpy()[0] == 2
    np.testing.assert_array_equal(out["classes"].numpy()[0, :2], [1, 2])
    # A looser IoU threshold keeps both same-class boxes.
    out = postprocess(*same, ANCHORS, iou_threshold=0.7)
    assert out["num_detections"].numpy()[0] == 2


def test_thresholds_topk_and_max_detections():
    planted = [(0, _location(0, r, 2, 16, 0), 0, 2.0 + 0.1 * r)
               for r in range(0, 16, 2)]  # 8 disjoint boxes
    planted.append((0, A_FAR, 1, -2.5))  # sigmoid 0.076
    logits, deltas = _outputs(planted)
    assert postprocess(logits, deltas, ANCHORS)["num_detections"][0] == 9
    assert postprocess(logits, deltas, ANCHORS,
                       score_threshold=0.1)["num_detections"][0] == 8
    capped = postprocess(logits, deltas, ANCHORS, max_detections=3)
    assert capped["scores"].shape == (1, 3)
    assert capped["num_detections"].numpy()[0] == 3
    # Best first.
    np.testing.assert_allclose(capped["scores"].numpy()[0],
                               1 / (1 + np.exp(-np.array([3.4, 3.2, 3.0]))),
                               rtol=1e-5)
    top2 = postprocess(logits, deltas, ANCHORS, pre_nms_topk=2)
    assert top2["num_detections"].numpy()[0] == 2


def test_images_in_a_batch_are_independent_and_float16_works():
    logits, deltas = _outputs([(0, A_BIG, 0, 4.0), (1, A_FAR, 2, 4.0),
                               (1, A_SMALL, 1, 3.0)], batch=2)
    out = postprocess(tf.cast(logits, tf.float16), tf.cast(deltas, tf.float16),
                      ANCHORS.boxes)
    assert out["scores"].dtype == tf.float32
    assert out["num_detections"].numpy().tolist() == [1, 2]
    np.testing.assert_array_equal(out["classes"].numpy()[1, :2], [2, 1])


def test_exports_with_unknown_batch(tmp_path):
    class Module(tf.Module):
        @tf.function(input_signature=[
            tf.TensorSpec([None, N, C], tf.float32),
            tf.TensorSpec([None, N, 4], tf.float32)])
        def detect(self, logits, deltas):
            return postprocess(logits, deltas, ANCHORS, max_detections=7)

    module = Module()
    concrete = module.detect.get_concrete_function()
    assert concrete.structured_outputs["boxes"].shape.as_list() == [None, 7,
                                                                    4]
    assert concrete.structured_outputs["num_detections"].shape.as_list() == [
        None]
    tf.saved_model.save(module, str(tmp_path))
    loaded = tf.saved_model.load(str(tmp_path))
    logits, deltas = _outputs([(2, A_FAR, 1, 4.0)], batch=3)
    out = loaded.detect(logits, deltas)
    assert out["num_detections"].numpy().tolist() == [0, 0, 1]
    np.testing.assert_allclose(out["boxes"].numpy()[2, 0], BOXES[A_FAR],
                               rtol=1e-5)


# ---------------------------------------------------------------- Soft-NMS


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def _gaussian_decay(iou, sigma):
    """Bodla et al. 2017's Gaussian penalty in TF's parameterisation
    (tf.image.non_max_suppression_with_scores: exp(-iou^2 / (2 sigma)))."""
    return np.exp(-(iou ** 2) / (2.0 * sigma))


def test_soft_nms_lowers_an_overlapping_score_instead_of_removing_it():
    same = _outputs([(0, A_BIG, 1, 4.0), (0, A_SMALL, 1, 3.0), (0, A_FAR, 2, 2.0)])
    hard = postprocess(*same, ANCHORS)  # the default is hard NMS
    assert hard["num_detections"].numpy()[0] == 2
    soft = postprocess(*same, ANCHORS, nms_method="gaussian", soft_nms_sigma=0.5)
    assert soft["num_detections"].numpy()[0] == 3
    iou = box_ops.iou(BOXES[[A_BIG]], BOXES[[A_SMALL]]).numpy()[0, 0]
    decayed = _sigmoid(3.0) * _gaussian_decay(iou, 0.5)
    # Best first: the top box untouched, the far box (other class, no
    # overlap) untouched, the overlapping one lowered, not gone.
    np.testing.assert_allclose(soft["scores"].numpy()[0, :3],
                               [_sigmoid(4.0), _sigmoid(2.0), decayed], rtol=1e-5)
    np.testing.assert_array_equal(soft["classes"].numpy()[0, :3], [1, 2, 1])
    np.testing.assert_allclose(soft["boxes"].numpy()[0, 2], BOXES[A_SMALL], rtol=1e-5)
    assert np.all(soft["scores"].numpy()[0, 3:] == 0.0)
    assert np.all(soft["boxes"].numpy()[0, 3:] == 0.0)
    # A smaller sigma decays more; below the score threshold the box goes.
    sharper = postprocess(*same, ANCHORS, nms_method="gaussian", soft_nms_sigma=0.1)
    np.testing.assert_allclose(sharper["scores"].numpy()[0, 2], _sigmoid(3.0) * _gaussian_decay(iou, 0.1),
                               rtol=1e-5)
    gone = postprocess(*same, ANCHORS, nms_method="gaussian", soft_nms_sigma=0.5,
                       score_threshold=float(decayed) + 0.01)
    assert gone["num_detections"].numpy()[0] == 2


def test_soft_nms_never_decays_across_classes_and_keeps_k():
    across = _outputs([(0, A_BIG, 1, 4.0), (0, A_SMALL, 2, 3.0)])
    out = postprocess(*across, ANCHORS, nms_method="gaussian")
    np.testing.assert_allclose(out["scores"].numpy()[0, :2], _sigmoid([4.0, 3.0]), rtol=1e-5)
    planted = [(0, _location(0, r, 2, 16, 0), r % 3, 2.0 + 0.1 * r) for r in range(0, 16, 2)]
    capped = postprocess(*_outputs(planted), ANCHORS, nms_method="gaussian", max_detections=3)
    assert capped["scores"].shape == (1, 3)
    assert capped["num_detections"].numpy()[0] == 3
    np.testing.assert_allclose(capped["scores"].numpy()[0], _sigmoid([3.4, 3.2, 3.0]), rtol=1e-5)
    np.testing.assert_array_equal(capped["classes"].numpy()[0], [14 % 3, 12 % 3, 10 % 3])


def test_soft_nms_batch_images_are_independent():
    logits, deltas = _outputs([(0, A_BIG, 0, 4.0), (1, A_FAR, 2, 4.0), (1, A_SMALL, 1, 3.0)], batch=2)
    out = postprocess(logits, deltas, ANCHORS, nms_method="gaussian")
    assert out["num_detections"].numpy().tolist() == [1, 2]
    np.testing.assert_array_equal(out["classes"].numpy()[1, :2], [2, 1])
    np.testing.assert_allclose(out["boxes"].numpy()[1, 0], BOXES[A_FAR], rtol=1e-5)


def test_unknown_nms_method_is_an_error():
    import pytest

    with pytest.raises(ValueError, match="nms_method"):
        postprocess(*_outputs([(0, A_FAR, 1, 4.0)]), ANCHORS, nms_method="linear")


def test_soft_nms_exports_with_unknown_batch(tmp_path):
    class Module(tf.Module):
        @tf.function(input_signature=[
            tf.TensorSpec([None, N, C], tf.float32),
            tf.TensorSpec([None, N, 4], tf.float32)])
        def detect(self, logits, deltas):
            return postprocess(logits, deltas, ANCHORS, max_detections=7, nms_method="gaussian")

    tf.saved_model.save(Module(), str(tmp_path))
    loaded = tf.saved_model.load(str(tmp_path))
    inputs = _outputs([(2, A_FAR, 1, 4.0), (2, A_BIG, 0, 4.0), (2, A_SMALL, 0, 3.0)], batch=3)
    out = loaded.detect(*inputs)
    eager = postprocess(*inputs, ANCHORS, max_detections=7, nms_method="gaussian")
    assert out["num_detections"].numpy().tolist() == [0, 0, 3]
    for key in ("boxes", "scores", "classes", "num_detections"):
        np.testing.assert_allclose(out[key].numpy(), eager[key].numpy(), rtol=1e-6)


def test_suppress_across_heads_only_between_heads_within_a_group():
    from effdet_tf.ops.postprocess import suppress_across_heads

    box = [0.0, 0.0, 10.0, 10.0]
    boxes = tf.constant([[box, [0.0, 0.0, 10.0, 10.5], [0.0, 0.0, 9.8, 10.0], [50.0, 50.0, 60.0, 60.0],
                          [0.0, 0.0, 10.0, 10.0], box, box]], tf.float32)
    # 0: head 0, kept. 1: head 1, same group, overlaps 0: dropped. 2: head 0
    # like 0 (one head never suppresses itself): kept. 3: elsewhere: kept.
    # 4: padding. 5: head 1 on 0's box but another group: kept. 6: head 2,
    # group of 0, scored above 1 but below 0: dropped by 0.
    scores = tf.constant([[0.9, 0.8, 0.7, 0.6, -1.0, 0.5, 0.85]])
    groups = tf.constant([[1, 1, 1, 1, 1, 2, 1]])
    heads = tf.constant([[0, 1, 0, 1, 1, 1, 2]])
    keep = suppress_across_heads(boxes, scores, groups, heads, 0.5).numpy()
    assert keep.tolist() == [[True, False, True, True, False, True, False]]
    # Greedy: a dropped detection suppresses nothing. 1 (dropped by 0)
    # overlaps 2 (another head than 1's), which therefore stays.
    chain = suppress_across_heads(
        tf.constant([[[0.0, 0.0, 10.0, 10.0], [0.0, 3.0, 10.0, 13.0], [0.0, 6.0, 10.0, 16.0]]]),
        tf.constant([[0.9, 0.8, 0.7]]), tf.constant([[1, 1, 1]]), tf.constant([[0, 1, 0]]), 0.4).numpy()
    # IoU(0,1) = IoU(1,2) = 7/13 > 0.4, IoU(0,2) = 4/16: 1 goes, so 2 stays.
    assert chain.tolist() == [[True, False, True]]
