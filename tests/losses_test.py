"""Tests for effdet_tf.ops.losses: focal, Huber, GIoU/CIoU, normalisation."""

import math

import numpy as np
import pytest
import tensorflow as tf

from effdet_tf.ops import boxes as box_ops
from effdet_tf.ops.losses import DetectionLoss, focal_loss

ANCHORS = np.array([[0, 0, 10, 10], [0, 0, 20, 20], [10, 10, 30, 50],
                    [5, 5, 15, 15]], np.float32)


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def _focal_by_hand(logit, label, alpha=0.25, gamma=1.5):
    p = _sigmoid(logit)
    if label:
        return -alpha * (1 - p) ** gamma * math.log(p)
    return -(1 - alpha) * p ** gamma * math.log(1 - p)


def _batch():
    # One image, 4 anchors, 2 classes: anchor 0 class 0 (positive),
    # anchor 1 background, anchor 2 ignored, anchor 3 class 1 (positive).
    targets = {
        "cls_targets": tf.constant([[0, -1, -2, 1]], tf.int32),
        "box_targets": tf.constant([[[0.1, -0.2, 0.0, 0.3],
                                     [0.0, 0.0, 0.0, 0.0],
                                     [0.0, 0.0, 0.0, 0.0],
                                     [0.0, 0.05, -0.1, 0.0]]], tf.float32),
    }
    outputs = {
        "cls_logits": tf.constant([[[2.0, -1.0], [0.5, -3.0],
                                    [30.0, 30.0], [-2.0, 1.5]]]),
        "box_deltas": tf.constant([[[0.15, 0.1, 0.0, 0.3],
                                    [5.0, 5.0, 5.0, 5.0],
                                    [9.0, 9.0, 9.0, 9.0],
                                    [0.0, 0.0, 0.0, 0.0]]]),
    }
    return targets, outputs


def test_focal_loss_against_hand_value():
    targets, outputs = _batch()
    result = DetectionLoss(num_classes=2)(targets, outputs)
    logits = outputs["cls_logits"].numpy()[0]
    want = (_focal_by_hand(logits[0, 0], 1) + _focal_by_hand(logits[0, 1], 0)
            + _focal_by_hand(logits[1, 0], 0) + _focal_by_hand(logits[1, 1], 0)
            + _focal_by_hand(logits[3, 0], 0) + _focal_by_hand(logits[3, 1], 1))
    # Anchor 2 (ignore, huge wrong logits) adds nothing; 2 positives + 1.
    np.testing.assert_allclose(result["cls_loss"].numpy(), want / 3.0,
                               rtol=1e-5)
    single = focal_loss(tf.constant([1.0]), tf.constant([2.0])).numpy()[0]
    np.testing.assert_allclose(single, _focal_by_hand(2.0, 1), rtol=1e-6)


def test_label_smoothing_moves_only_the_cross_entropy_targets():
    """eps = 0.2: the cross-entropy aims at 0.9 / 0.1, the focal factor
    alpha_t (1 - p_t)^gamma still reads the hard label."""
    eps, alpha, gamma = 0.2, 0.25, 1.5
    for label, logit in ((1.0, 2.0), (0.0, 2.0), (0.0, -3.0), (1.0, -1.0)):
        p = 1.0 / (1.0 + math.exp(-logit))
        target = 0.9 if label else 0.1
        ce = -(target * math.log(p) + (1.0 - target) * math.log(1.0 - p))
        p_t = p if label else 1.0 - p
        weight = (alpha if label else 1.0 - alpha) * (1.0 - p_t) ** gamma
        got = focal_loss(tf.constant([label]), tf.constant([logit]), alpha, gamma, label_smoothing=eps)
        np.testing.assert_allclose(got.numpy()[0], weight * ce, rtol=1e-5)
    # Through DetectionLoss: a different class loss, the same box loss.
    targets, outputs = _batch()
    hard = DetectionLoss(num_classes=2)(targets, outputs)
    soft = DetectionLoss(num_classes=2, label_smoothing=eps)(targets, outputs)
    assert abs(soft["cls_loss"].numpy() - hard["cls_loss"].numpy()) > 1e-3
    np.testing.assert_allclose(soft["box_loss"].numpy(), hard["box_loss"].numpy())


def test_focal_loss_keeps_gradient_for_confident_mistakes():
    logits = tf.constant([40.0])
    with tf.GradientTape() as tape:
        tape.watch(logits)
        loss = focal_loss(tf.constant([0.0]), logits)
    assert tape.gradient(loss, logits).numpy()[0] > 0.1


def test_huber_box_loss_and_total():
    targets, outputs = _batch()
    result = DetectionLoss(num_classes=2)(targets, outputs)

    def huber(d, delta=0.1):
        d = abs(d)
        return 0.5 * d * d if d <= delta else delta * (d - 0.5 * delta)

    t = targets["box_targets"].numpy()[0]
    p = outputs["box_deltas"].numpy()[0]
    # Only positives (anchors 0 and 3); the wild deltas of 1 and 2 add 0.
    total = sum(huber(p[i, j] - t[i, j]) for i in (0, 3) for j in range(4))
    np.testing.assert_allclose(result["box_loss"].numpy(),
                               total / (4 * 3), rtol=1e-5)
    np.testing.assert_allclose(
        result["loss"].numpy(),
        result["cls_loss"].numpy() + 50.0 * result["box_loss"].numpy(),
        rtol=1e-6)
    weighted = DetectionLoss(num_classes=2, box_loss_weight=2.0)(targets,
                                                                 outputs)
    np.testing.assert_allclose(
        weighted["loss"].numpy(),
        result["cls_loss"].numpy() + 2.0 * result["box_loss"].numpy(),
        rtol=1e-6)


@pytest.mark.parametrize("mode", ["giou", "ciou"])
def test_iou_box_loss_values(mode):
    targets, outputs = _batch()
    result = DetectionLoss(num_classes=2, box_loss=mode,
                           anchors=ANCHORS)(targets, outputs)
    fn = box_ops.giou if mode == "giou" else box_ops.ciou
    pos = [0, 3]
    true = box_ops.decode(targets["box_targets"][0].numpy()[pos], ANCHORS[pos])
    pred = box_ops.decode(outputs["box_deltas"][0].numpy()[pos], ANCHORS[pos])
    want = np.sum(1.0 - fn(true, pred).numpy()) / 3.0
    assert want > 0.01
    np.testing.assert_allclose(result["box_loss"].numpy(), want, rtol=1e-5)
    # Default weight for IoU losses is 1.0.
    np.testing.assert_allclose(
        result["loss"].numpy(),
        result["cls_loss"].numpy() + result["box_loss"].numpy(), rtol=1e-6)


def test_float16_logits_give_float32_losses():
    targets, outputs = _batch()
    half = {k: tf.cast(v, tf.float16) for k, v in outputs.items()}
    full = DetectionLoss(num_classes=2)(targets, outputs)
    result = DetectionLoss(num_classes=2)(targets, half)
    for key in ("cls_loss", "box_loss", "loss"):
        assert result[key].dtype == tf.float32
        assert result[key].shape == ()
        np.testing.assert_allclose(result[key].numpy(), full[key].numpy(),
                                   rtol=2e-2)


@pytest.mark.parametrize("mode", ["huber", "giou", "ciou"])
def test_empty_batch_finite_and_gradients_finite(mode):
    anchors = np.tile(ANCHORS, [4, 1])  # 16 anchors
    loss_fn = DetectionLoss(num_classes=3, box_loss=mode, anchors=anchors)
    rng = np.random.default_rng(1)
    deltas = tf.Variable(rng.normal(0, 3, (2, 16, 4)).astype(np.float32))
    logits = tf.Variable(rng.normal(0, 3, (2, 16, 3)).astype(np.float32))
    cls = np.full((2, 16), -1, np.int32)
    cls[0, 2], cls[1, 5] = 1, 2
    box_targets = np.zeros((2, 16, 4), np.float32)
    box_targets[0, 2] = [0.1, 0.1, 0.2, -0.2]
    def step(cls_targets):
        with tf.GradientTape() as tape:
            out = loss_fn({"cls_targets": cls_targets,
                           "box_targets": box_targets},
                          {"cls_logits": logits, "box_deltas": deltas})
        return out, tape.gradient(out["loss"], [logits, deltas])

    # Eagerly and in a graph (grappler rewrites can differ: see boxes.ciou).
    for run in (step, tf.function(step)):
        for cls_targets in (cls, np.full((2, 16), -1, np.int32)):
            out, grads = run(tf.constant(cls_targets))
            assert np.isfinite(out["loss"].numpy())
            for g in grads:
                assert np.all(np.isfinite(tf.convert_to_tensor(g).numpy()))
    # No positives: box loss exactly 0, class loss normalised by 0 + 1.
    assert out["box_loss"].numpy() == 0.0


def test_works_in_tf_function_with_unknown_batch():
    loss_fn = DetectionLoss(num_classes=2, box_loss="ciou", anchors=ANCHORS)
    targets, outputs = _batch()

    @tf.function(input_signature=[
        {"cls_targets": tf.TensorSpec([None, None], tf.int32),
         "box_targets": tf.TensorSpec([None, None, 4], tf.float32)},
        {"cls_logits": tf.TensorSpec([None, None, 2], tf.float32),
         "box_deltas": tf.TensorSpec([None, None, 4], tf.float32)}])
    def fn(t, o):
        return loss_fn(t, o)

    graph = fn(targets, outputs)
    eager = loss_fn(targets, outputs)
    for key in eager:
        np.testing.assert_allclose(graph[key].numpy(), eager[key].numpy(),
                                   rtol=1e-6)


def test_config_round_trip_and_validation():
    loss_fn = DetectionLoss(num_classes=5, gamma=2.0, box_loss="giou",
                            anchors=ANCHORS, label_smoothing=0.1)
    clone = DetectionLoss.from_config(loss_fn.get_config())
    assert clone.get_config() == loss_fn.get_config()
    with pytest.raises(ValueError):
        DetectionLoss(num_classes=5, box_loss="giou")
    with pytest.raises(ValueError):
        DetectionLoss(num_classes=5, box_loss="l1")
