"""Tests for effdet_tf.ops.label_encoder: matching, forcing, crowd, tf.data."""

import numpy as np
import tensorflow as tf

from conftest import config_round_trip
from effdet_tf.ops import boxes as box_ops
from effdet_tf.ops.anchors import Anchors
from effdet_tf.ops.label_encoder import LabelEncoder

ANCHORS = Anchors(128)  # 2304 + 576 + 144 + 36 + 9 anchors: fast


def _encode(encoder, boxes, classes, crowd=None):
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    classes = np.asarray(classes, np.int32).reshape(-1)
    crowd = (np.zeros(len(classes), bool) if crowd is None
             else np.asarray(crowd, bool))
    out = encoder(boxes, classes, crowd)
    return out["cls_targets"].numpy(), out["box_targets"].numpy()


def test_box_equal_to_anchor_is_positive_and_targets_decode_back():
    anchors = ANCHORS.numpy()
    gt = np.stack([anchors[100], [30.0, 40.0, 90.0, 70.0]])
    cls, box = _encode(LabelEncoder(ANCHORS), gt, [3, 1])
    assert cls.shape == (ANCHORS.num_anchors,) and cls.dtype == np.int32
    assert box.shape == (ANCHORS.num_anchors, 4)
    assert cls[100] == 3
    np.testing.assert_allclose(box[100], 0.0, atol=1e-6)
    positives = np.where(cls >= 0)[0]
    assert set(cls[positives]) == {1, 3}
    # Every positive decodes back to the box of its class.
    decoded = box_ops.decode(box[positives], anchors[positives]).numpy()
    want = gt[np.where(cls[positives] == 3, 0, 1)]
    np.testing.assert_allclose(decoded, want, rtol=1e-4, atol=1e-3)
    # Every positive has IoU >= 0.5 with its box or is that box's best.
    all_ious = box_ops.iou(anchors, gt).numpy()
    own = all_ious[positives, np.where(cls[positives] == 3, 0, 1)]
    best = set(np.argmax(all_ious, axis=0))
    assert all(iou >= 0.5 or p in best for p, iou in zip(positives, own))
    assert np.all(cls[all_ious.max(axis=1) >= 0.5] >= 0)
    assert np.all(box[cls < 0] == 0.0)


def test_tiny_box_is_force_matched_to_its_best_anchor():
    tiny = np.array([[50.0, 60.0, 53.0, 62.0]], np.float32)  # 3x2 px
    ious = box_ops.iou(ANCHORS.numpy(), tiny).numpy()[:, 0]
    assert ious.max() < 0.5  # would get no positive without forcing
    cls, box = _encode(LabelEncoder(ANCHORS), tiny, [7])
    assert np.count_nonzero(cls >= 0) == 1
    best = int(np.argmax(ious))
    assert cls[best] == 7
    decoded = box_ops.decode(box[best], ANCHORS.numpy()[best]).numpy()
    np.testing.assert_allclose(decoded, tiny[0], atol=1e-3)


def test_crowd_is_never_matched_and_covered_anchors_are_ignored():
    anchors = ANCHORS.numpy()
    crowd_box = [0.0, 0.0, 64.0, 64.0]
    # A crowd box that equals an anchor exactly (IoU 1) must not match it.
    cls, box = _encode(LabelEncoder(ANCHORS),
                       [crowd_box, anchors[5]], [2, 4], crowd=[True, True])
    assert not np.any(cls >= 0)
    assert np.all(box == 0.0)
    inside = np.all((anchors[:, :2] >= 0) & (anchors[:, 2:] <= 64), axis=1)
    far = anchors[:, 0] >= 80
    assert inside.sum() > 0 and far.sum() > 0
    assert np.all(cls[inside] == -2)
    assert np.all(cls[far] == -1)
    # A real box inside the crowd still gets its positives.
    cls, _ = _encode(LabelEncoder(ANCHORS), [crowd_box, [8, 8, 40, 40]],
                     [2, 4], crowd=[True, False])
    assert np.any(cls == 4) and not np.any(cls == 2)


def test_ignore_band_between_thresholds():
    anchors = ANCHORS.numpy()
    gt = anchors[40].copy()
    gt[3] += (gt[3] - gt[1]) * 0.25  # widen: IoU with anchor 40 is 0.8
    ious = box_ops.iou(anchors, gt[None]).numpy()[:, 0]
    band = (ious >= 0.3) & (ious < 0.5)
    assert band.any()
    cls, _ = _encode(LabelEncoder(ANCHORS, 0.5, 0.3), gt[None], [0])
    assert np.all(cls[band] == -2)
    assert np.all(cls[ious < 0.3] == -1)
    assert np.all(cls[ious >= 0.5] == 0)
    # Default thresholds (0.5/0.5): no ignore band at all.
    cls, _ = _encode(LabelEncoder(ANCHORS), gt[None], [0])
    assert not np.any(cls == -2)


def test_empty_image_is_all_background():
    cls, box = _encode(LabelEncoder(ANCHORS), np.zeros([0, 4]), [])
    assert np.all(cls == -1)
    assert np.all(box == 0.0)
    # Padding rows (zero area, class -1) behave like no boxes.
    cls, _ = _encode(LabelEncoder(ANCHORS), np.zeros([3, 4]), [-1, -1, 0])
    assert np.all(cls == -1)


def _examples():
    anchors = ANCHORS.numpy()
    return [
        (np.zeros([0, 4], np.float32), np.zeros([0], np.int32),
         np.zeros([0], bool)),
        (np.array([[10, 20, 60, 90], [50, 60, 52, 63]], np.float32),
         np.array([0, 2], np.int32), np.array([False, False])),
        (np.stack([anchors[7], [0, 0, 128, 60]]).astype(np.float32),
         np.array([1, 1], np.int32), np.array([False, True])),
    ]


def test_dataset_map_matches_eager():
    encoder = LabelEncoder(ANCHORS)
    examples = _examples()
    ds = tf.data.Dataset.from_generator(
        lambda: iter(examples),
        output_signature=(tf.TensorSpec([None, 4], tf.float32),
                          tf.TensorSpec([None], tf.int32),
                          tf.TensorSpec([None], tf.bool)))
    mapped = list(ds.map(encoder).batch(3).as_numpy_iterator())
    assert len(mapped) == 1
    for i, (boxes, classes, crowd) in enumerate(examples):
        eager = encoder(boxes, classes, crowd)
        np.testing.assert_array_equal(mapped[0]["cls_targets"][i],
                                      eager["cls_targets"].numpy())
        np.testing.assert_allclose(mapped[0]["box_targets"][i],
                                   eager["box_targets"].numpy(), atol=1e-6)
    assert np.any(mapped[0]["cls_targets"][1] == 2)


def test_tensor_anchors_and_config_round_trip():
    encoder = LabelEncoder(ANCHORS, 0.6, 0.4, 0.5)
    config_round_trip(encoder)
    gt, labels = _examples()[1][:2]
    by_tensor = LabelEncoder(ANCHORS.boxes)(gt, labels)
    by_object = LabelEncoder(ANCHORS)(gt, labels)
    np.testing.assert_array_equal(by_tensor["cls_targets"],
                                  by_object["cls_targets"])


def _reference(anchors, boxes, classes, crowd, match=0.5, unmatched=0.5, crowd_ioa=0.7):
    """Straight numpy: argmax matching, forced best anchors, crowd ignore."""
    num = len(anchors)
    ious = box_ops.iou(anchors, boxes).numpy().reshape(num, -1)
    ioas = box_ops.ioa(anchors, boxes).numpy().reshape(num, -1)
    has_area = box_ops.area(boxes).numpy().reshape(-1) > 0
    valid = has_area & ~crowd & (classes >= 0)
    sim = np.where(valid[None], ious, -1.0)
    sim = np.concatenate([sim, -np.ones([num, 1])], axis=1)
    matched = sim.argmax(axis=1)
    max_iou = sim.max(axis=1)
    forced = np.full(num, -1)
    for j in reversed(range(len(classes))):
        if valid[j] and sim[:, j].max() > 0:
            forced[sim[:, j].argmax()] = j
    matched = np.where(forced >= 0, forced, matched)
    positive = (forced >= 0) | (max_iou >= match)
    cover = np.where((crowd & has_area)[None], ioas, 0.0).max(axis=1, initial=0.0)
    negative = ~positive & (max_iou < unmatched) & (cover <= crowd_ioa)
    padded = np.concatenate([classes, [-1]])
    cls = np.where(positive, padded[matched], np.where(negative, -1, -2))
    padded_boxes = np.concatenate([boxes.reshape(-1, 4), np.zeros([1, 4], np.float32)])
    deltas = box_ops.encode(padded_boxes[matched], anchors).numpy()
    return cls, np.where(positive[:, None], deltas, 0.0)


def _random_cases(num, seed=0, size=128, max_boxes=10):
    """Random images with ties (a box equal to an anchor, duplicates),
    padding rows, crowd boxes and empty images."""
    anchors = ANCHORS.numpy()
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(num):
        m = int(rng.integers(0, max_boxes))
        y = rng.uniform(0, size * 0.8, (m, 2))
        boxes = np.concatenate([y, y + rng.uniform(2, size / 2, (m, 2))], 1)
        boxes = boxes.astype(np.float32)
        if m and i % 3 == 0:
            boxes[0] = anchors[rng.integers(len(anchors))]
            boxes[-1] = boxes[0]
        if m > 1 and i % 4 == 0:
            boxes[1] = 0.0
        classes = rng.integers(-1 if i % 5 == 0 else 0, 5, m).astype(np.int32)
        cases.append((boxes, classes, rng.uniform(size=m) < 0.25))
    return cases


def test_matches_numpy_reference():
    encoder = LabelEncoder(ANCHORS, 0.5, 0.4)
    for boxes, classes, crowd in _random_cases(20):
        cls, box = _encode(encoder, boxes, classes, crowd)
        want_cls, want_box = _reference(ANCHORS.numpy(), boxes, classes, crowd, 0.5, 0.4)
        np.testing.assert_array_equal(cls, want_cls)
        np.testing.assert_allclose(box, want_box, atol=1e-5)


def test_encode_batch_and_split_equal_per_image_call():
    encoder = LabelEncoder(ANCHORS)
    cases = _random_cases(8, seed=1)
    width = max(len(c) for _, c, _ in cases)
    pad = lambda x, value: np.concatenate(
        [x, np.full((width - len(x),) + x.shape[1:], value, x.dtype)])
    batch = encoder.encode_batch(
        np.stack([pad(b, 0.0) for b, _, _ in cases]),
        np.stack([pad(c, -1) for _, c, _ in cases]),
        np.stack([pad(k, False) for _, _, k in cases]))
    split = tf.function(encoder.encode_split, jit_compile=True)
    for i, (boxes, classes, crowd) in enumerate(cases):
        want = encoder(boxes, classes, crowd)
        by_split = split(boxes[~crowd], classes[~crowd], boxes[crowd])
        for got in ({k: v[i] for k, v in batch.items()}, by_split):
            np.testing.assert_array_equal(got["cls_targets"], want["cls_targets"])
            np.testing.assert_allclose(got["box_targets"], want["box_targets"], atol=1e-6)


def test_many_boxes_compiled_match_numpy_reference():
    # From 16 boxes the IoU matrix is laid out anchor-major: same targets,
    # eagerly and XLA-compiled (where FMA contraction could move an IoU
    # of exactly 0.5 across the threshold).
    encoder = LabelEncoder(ANCHORS, 0.5, 0.4)
    split = tf.function(encoder.encode_split, jit_compile=True)
    for boxes, classes, crowd in _random_cases(6, seed=2, max_boxes=60):
        want_cls, want_box = _reference(
            ANCHORS.numpy(), boxes, classes, crowd, 0.5, 0.4)
        cls, box = _encode(encoder, boxes, classes, crowd)
        np.testing.assert_array_equal(cls, want_cls)
        np.testing.assert_allclose(box, want_box, atol=1e-5)
        got = split(boxes[~crowd], classes[~crowd], boxes[crowd])
        np.testing.assert_array_equal(got["cls_targets"], want_cls)
        np.testing.assert_allclose(got["box_targets"], want_box, atol=1e-5)
