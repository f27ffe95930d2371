"""Per-anchor training targets from ground-truth boxes (tf.data-safe).

Matching follows the EfficientDet reference (google/automl
`efficientdet/anchors.py` AnchorLabeler: an ArgMaxMatcher with
`force_match_for_each_row=True` and a Faster R-CNN box coder without scale
factors): an anchor is positive when its best IoU with a ground-truth box is
>= `match_threshold`, negative below `unmatched_threshold`, ignored between.
Each ground-truth box is also forced onto its best anchor, so small boxes
whose IoU never reaches the threshold still get a positive.

Crowd boxes (COCO `iscrowd=1`) are never matched. Negatives lying mostly
inside a crowd region (intersection / anchor area > `crowd_ioa_threshold`)
are ignored instead of being pushed to background: they may well cover
people of the crowd. The 0.7 default is Detectron's
`TRAIN.CROWD_FILTER_THRESH`, measured the same way (over the proposal area).
"""

import tensorflow as tf

from effdet_tf.ops import boxes as box_ops
from effdet_tf.ops.anchors import Anchors

BACKGROUND = -1
IGNORE = -2


class LabelEncoder:
    """Maps one image's boxes to per-anchor class and box targets.

    Args:
      anchors: an `Anchors` or a float32 [N, 4] yxyx pixel tensor/array.
      match_threshold: IoU at or above which an anchor is positive.
      unmatched_threshold: IoU below which an anchor is background.
      crowd_ioa_threshold: background anchors covered by a crowd box by more
        than this fraction of their own area become "ignore".

    Call with `boxes` [M, 4] yxyx pixels of the model input, `classes` [M]
    int contiguous indices, `is_crowd` [M] bool (optional). M may be 0.
    Boxes with zero area or a negative class are dropped (padding).

    Returns {"cls_targets": int32 [N] (>= 0 class, -1 background,
    -2 ignore), "box_targets": float32 [N, 4] encoded deltas, zero where
    not positive}. Works eagerly and inside `tf.data.Dataset.map`; call it
    per image, before batching.
    """

    def __init__(
        self,
        anchors,
        match_threshold=0.5,
        unmatched_threshold=0.5,
        crowd_ioa_threshold=0.7,
    ):
        if unmatched_threshold > match_threshold:
            raise ValueError(
                "unmatched_threshold must be <= match_threshold, got "
                f"{unmatched_threshold} > {match_threshold}"
            )
        self.anchors = anchors
        self.match_threshold = float(match_threshold)
        self.unmatched_threshold = float(unmatched_threshold)
        self.crowd_ioa_threshold = float(crowd_ioa_threshold)

    def _anchor_boxes(self):
        if isinstance(self.anchors, Anchors):
            return self.anchors.boxes
        return tf.cast(self.anchors, tf.float32)

    def __call__(self, boxes, classes, is_crowd=None):
        anchors = self._anchor_boxes()
        num_anchors = tf.shape(anchors)[0]
        boxes = tf.reshape(tf.cast(boxes, tf.float32), [-1, 4])
        classes = tf.reshape(tf.cast(classes, tf.int32), [-1])
        if is_crowd is None:
            is_crowd = tf.zeros_like(classes, tf.bool)
        is_crowd = tf.reshape(tf.cast(is_crowd, tf.bool), [-1])
        num_gt = tf.shape(boxes)[0]

        has_area = box_ops.area(boxes) > 0.0
        valid = has_area & tf.logical_not(is_crowd) & (classes >= 0)
        crowd = has_area & is_crowd

        # [N, M]; columns of crowd/padding boxes can never win the argmax.
        similarity = tf.where(
            valid[None, :], box_ops.iou(anchors, boxes), -1.0
        )
        # A dummy column (index M, IoU -1) keeps argmax/max defined at M = 0
        # and gives unmatched anchors something harmless to gather.
        padded = tf.concat([similarity, -tf.ones([num_anchors, 1])], axis=1)
        matched_gt = tf.argmax(padded, axis=1, output_type=tf.int32)
        max_iou = tf.reduce_max(padded, axis=1)

        # Force-match every valid box onto its best anchor. When two boxes
        # share a best anchor, the lower index wins (deterministic, unlike a
        # scatter with duplicate indices).
        best_anchor = tf.argmax(similarity, axis=0, output_type=tf.int32)
        best_iou = tf.reduce_max(
            tf.concat([similarity, -tf.ones([1, num_gt])], axis=0), axis=0
        )
        segment = tf.where(valid & (best_iou > 0.0), best_anchor, -1)
        forced_gt = tf.math.unsorted_segment_min(
            tf.range(num_gt), segment, num_segments=num_anchors
        )
        forced = forced_gt < num_gt  # empty segments hold int32 max
        matched_gt = tf.where(forced, forced_gt, matched_gt)

        positive = forced | (max_iou >= self.match_threshold)
        negative = tf.logical_not(positive) & (
            max_iou < self.unmatched_threshold
        )

        crowd_ioa = tf.where(crowd[None, :], box_ops.ioa(anchors, boxes), 0.0)
        crowd_cover = tf.reduce_max(
            tf.concat([crowd_ioa, tf.zeros([num_anchors, 1])], axis=1), axis=1
        )
        negative &= crowd_cover <= self.crowd_ioa_threshold

        padded_classes = tf.concat([classes, [BACKGROUND]], axis=0)
        padded_boxes = tf.concat([boxes, tf.zeros([1, 4])], axis=0)
        cls_targets = tf.where(
            positive,
            tf.gather(padded_classes, matched_gt),
            tf.where(negative, BACKGROUND, IGNORE),
        )
        deltas = box_ops.encode(tf.gather(padded_boxes, matched_gt), anchors)
        box_targets = tf.where(positive[:, None], deltas, 0.0)
        return {
            "cls_targets": tf.cast(cls_targets, tf.int32),
            "box_targets": box_targets,
        }

    def get_config(self):
        anchors = self.anchors
        if isinstance(anchors, Anchors):
            anchors = anchors.get_config()
        else:
            anchors = tf.convert_to_tensor(anchors).numpy().tolist()
        return {
            "anchors": anchors,
            "match_threshold": self.match_threshold,
            "unmatched_threshold": self.unmatched_threshold,
            "crowd_ioa_threshold": self.crowd_ioa_threshold,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config["anchors"], dict):
            config["anchors"] = Anchors(**config["anchors"])
        return cls(**config)
