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

Cost (the input pipeline runs this per image, XLA-compiled): measured at
512 px (49,104 anchors), CPU-ms per call of the compiled `encode_split`,
best of 5 x 50 calls: M = 0 / 4 / 8 / 16 / 48 boxes take 0.3 / 1.6 / 1.7 /
2.0 / 4.9 ms. Of the ~1.5 ms at 4 boxes the matching is ~0.6 and the
per-anchor tail (forced matches, a gather of the matched box, deltas,
outputs) ~0.9. The real samples of benchmarks/input_pipeline.py (Mosaic on)
have 3.8 boxes per image on average (median 3, max 17 in 96 images).

The matching is a few passes over an [M, N] IoU matrix. With 16 or more
boxes it is laid out anchor-major ([N, M]: the per-anchor reductions over
the boxes fuse with the IoU along the contiguous axis), with fewer
box-major (measured faster there). Arg-max/arg-min are a max then the
largest (count - index) reaching it, as a float max (first index wins, as
`tf.argmax`): XLA's CPU backend lowers int min-reductions over these
matrices to slow reduce-windows and a variadic arg-reduce is slower still.
Forced matches are a scatter-min of M box indices, not a pass. Crowd
regions can be passed as their own list (`encode_split`), so that the
common image without any costs no pass at all: inside XLA a `tf.cond` on
"any crowd" is turned into a select that computes both sides.
"""

import tensorflow as tf

from effdet_tf.ops import boxes as box_ops
from effdet_tf.ops.anchors import Anchors

BACKGROUND = -1
IGNORE = -2
# Box counts from which the IoU matrix is laid out anchor-major.
_ANCHOR_MAJOR_MIN_BOXES = 16


class LabelEncoder:
    """Maps boxes to per-anchor class and box targets.

    Args:
      anchors: an `Anchors` or a float32 [N, 4] yxyx pixel tensor/array.
      match_threshold: IoU at or above which an anchor is positive.
      unmatched_threshold: IoU below which an anchor is background.
      crowd_ioa_threshold: background anchors covered by a crowd box by more
        than this fraction of their own area become "ignore".

    Call with one image's `boxes` [M, 4] yxyx pixels of the model input,
    `classes` [M] int contiguous indices, `is_crowd` [M] bool (optional).
    M may be 0. Boxes with zero area or a negative class are dropped
    (padding). `encode_batch` does the same for [B, M] padded boxes.

    Returns {"cls_targets": int32 [N] (>= 0 class, -1 background,
    -2 ignore), "box_targets": float32 [N, 4] encoded deltas, zero where
    not positive}. Works eagerly, inside `tf.data.Dataset.map` and under
    XLA (`jit_compile=True`, static M).
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
        self._terms = None
        self._compiled_split = None

    def _anchor_boxes(self):
        if isinstance(self.anchors, Anchors):
            return self.anchors.boxes
        return tf.cast(self.anchors, tf.float32)

    def _anchor_terms(self, anchors):
        """(area, (cy, cx, h, w)) of the anchors, as `box_ops.area` and
        `box_ops.centre_size` compute them. For an `Anchors` grid they are
        constants, computed once eagerly (also when first asked while
        tracing): a constant area also keeps it computed as eagerly, see
        `_pairwise_iou` on FMA contraction in compiled programs."""
        if not isinstance(self.anchors, Anchors):
            return box_ops.area(anchors), box_ops.centre_size(anchors)
        if self._terms is None:
            with tf.init_scope():
                boxes = self.anchors.numpy()
                self._terms = (
                    box_ops.area(boxes).numpy(),
                    tuple(t.numpy() for t in box_ops.centre_size(boxes)),
                )
        return self._terms

    def __call__(self, boxes, classes, is_crowd=None):
        boxes = tf.reshape(tf.cast(boxes, tf.float32), [-1, 4])
        classes = tf.reshape(tf.cast(classes, tf.int32), [-1])
        if is_crowd is None:
            is_crowd = tf.zeros_like(classes, tf.bool)
        is_crowd = tf.reshape(tf.cast(is_crowd, tf.bool), [-1])
        out = self.encode_batch(boxes[None], classes[None], is_crowd[None])
        return {key: value[0] for key, value in out.items()}

    def encode_batch(self, boxes, classes, is_crowd=None):
        """Targets of a padded batch: boxes [B, M, 4], classes [B, M]
        (-1 = padding), is_crowd [B, M] -> {"cls_targets": [B, N],
        "box_targets": [B, N, 4]}, equal to `__call__` per image."""
        boxes = tf.cast(boxes, tf.float32)
        classes = tf.cast(classes, tf.int32)
        if is_crowd is None:
            is_crowd = tf.zeros_like(classes, tf.bool)
        is_crowd = tf.cast(is_crowd, tf.bool)
        has_area = box_ops.area(boxes) > 0.0
        # Crowd rows become padding of the object list (class -1) and the
        # only rows of the crowd list (zero boxes elsewhere: no cover).
        classes = tf.where(is_crowd, -1, classes)
        crowd_boxes = tf.where((is_crowd & has_area)[..., None], boxes, 0.0)
        return self._encode(boxes, classes, crowd_boxes)

    def encode_split(self, boxes, classes, crowd_boxes):
        """Like `__call__` with the crowd regions as a list of their own:
        boxes [M, 4] / classes [M] of objects (none of them crowd; class -1
        = padding), crowd_boxes [K, 4] (zero-area rows = padding). K = 0
        skips the crowd pass. Leading batch dims [B, ...] are also fine."""
        boxes = tf.cast(boxes, tf.float32)
        if boxes.shape.rank == 2:
            out = self._encode(
                boxes[None], tf.cast(classes, tf.int32)[None],
                tf.cast(crowd_boxes, tf.float32)[None],
            )
            return {key: value[0] for key, value in out.items()}
        return self._encode(
            boxes, tf.cast(classes, tf.int32), tf.cast(crowd_boxes, tf.float32)
        )

    def compiled_split(self):
        """`encode_split` XLA-compiled (`jit_compile=True`), built once per
        encoder: pipelines sharing an encoder (train_lib gives all datasets
        the same one) share its programs, compiled once per input shape
        (~0.45 s CPU each at 512 px)."""
        if self._compiled_split is None:
            self._compiled_split = tf.function(
                self.encode_split, jit_compile=True)
        return self._compiled_split

    def _encode(self, boxes, classes, crowd_boxes):
        """boxes [B, M, 4], classes [B, M], crowd_boxes [B, K, 4]."""
        anchors = self._anchor_boxes()
        num_anchors = anchors.shape[0] or tf.shape(anchors)[0]
        batch = tf.shape(boxes)[0]
        num_gt = tf.shape(boxes)[1]

        valid = (box_ops.area(boxes) > 0.0) & (classes >= 0)
        anchor_area, anchor_centre_size = self._anchor_terms(anchors)
        max_iou, matched_gt, best_iou, best_anchor = _match_dense(
            anchors, anchor_area, boxes, valid)

        # Force-match every valid box onto its best anchor (the first one
        # on ties). When two boxes share a best anchor, the lower index
        # wins (deterministic, unlike a scatter with duplicate indices).
        forcing = valid & (best_iou > 0.0)
        # Scatter-min of box indices onto their best anchors: M updates
        # instead of an [M, N] pass; min keeps it order-independent.
        batch_index = tf.broadcast_to(tf.range(batch)[:, None], [batch, num_gt])
        forced_gt = tf.tensor_scatter_nd_min(
            tf.fill([batch, num_anchors], num_gt),
            tf.stack(
                [batch_index, tf.minimum(best_anchor, num_anchors - 1)], -1
            ),
            tf.where(forcing, tf.range(num_gt)[None, :], num_gt),
        )
        forced = forced_gt < num_gt
        matched_gt = tf.where(forced, forced_gt, matched_gt)

        positive = forced | (max_iou >= self.match_threshold)
        negative = tf.logical_not(positive) & (
            max_iou < self.unmatched_threshold
        )
        if crowd_boxes.shape[1] != 0:
            # Zero-area (padding) crowd boxes cover nothing: ioa is 0.
            crowd_cover = tf.reduce_max(
                box_ops.ioa(anchors, crowd_boxes), axis=2
            )
            negative &= tf.logical_not(crowd_cover > self.crowd_ioa_threshold)

        # A dummy box (index M) for anchors matched to nothing. One gather
        # of (class, centre, size) rows per anchor instead of a gather of
        # classes, one of corners and the corner -> centre maths per anchor:
        # the per-anchor tail costs as much as the matching at a few boxes.
        rows = tf.stack(
            [tf.cast(classes, tf.float32), *box_ops.centre_size(boxes)], -1)
        rows = tf.concat([rows, tf.zeros([batch, 1, 5])
                          + [float(BACKGROUND), 0.0, 0.0, 1.0, 1.0]], axis=1)
        cls, cy, cx, h, w = tf.unstack(
            tf.gather(rows, matched_gt, batch_dims=1), 5, axis=-1)
        cls_targets = tf.where(
            positive, tf.cast(cls, tf.int32),
            tf.where(negative, BACKGROUND, IGNORE),
        )
        deltas = box_ops.encode_centre_size((cy, cx, h, w), anchor_centre_size)
        box_targets = tf.where(positive[..., None], deltas, 0.0)
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


def _match_dense(anchors, anchor_area, boxes, valid):
    """The [M, N] IoU matching of anchors [N, 4] with boxes [B, M, 4]
    (valid [B, M]) ->

    max_iou [B, N]: each anchor's best IoU (-1 without a valid box);
    matched [B, N] int32: the first box reaching it (M: none);
    best_iou [B, M], best_anchor [B, M]: each box's best IoU over all
      anchors and the first anchor reaching it (-1 / any for invalid boxes).
    """
    # Layout of the [M, N] IoU matrix: with many boxes anchor-major
    # ([B, N, M]) is faster (the per-anchor reductions over the boxes
    # run along the contiguous axis, fused with the IoU); with few the
    # box-major one is (measured, XLA CPU).
    anchor_major = (boxes.shape[1] is not None
                    and boxes.shape[1] >= _ANCHOR_MAJOR_MIN_BOXES)
    box_axis, anchor_axis = (2, 1) if anchor_major else (1, 2)
    # Entries of padding boxes can never win a maximum.
    similarity = tf.where(
        tf.expand_dims(valid, anchor_axis),
        _pairwise_iou(anchors, anchor_area, boxes, anchor_major), -1.0,
    )
    # The -1 floor is the value of "no box" (also at M = 0).
    max_iou = tf.maximum(tf.reduce_max(similarity, axis=box_axis), -1.0)
    # num_gt (the dummy) when there is no box.
    matched_gt = _first_index_of_max(similarity, max_iou, box_axis)
    best_iou = tf.reduce_max(similarity, axis=anchor_axis)  # [B, M]
    best_anchor = _first_index_of_max(similarity, best_iou, anchor_axis)
    return max_iou, matched_gt, best_iou, best_anchor


def _first_index_of_max(similarity, maximum, axis):
    """Index along `axis` (1 or 2) of [B, ., .] `similarity` of the first
    entry equal to `maximum` (its max along that axis), as `tf.argmax`
    picks it; the axis length where none is (an empty axis: max -inf).

    A float max of (count - index) over the entries reaching the maximum:
    XLA's CPU backend runs float max-reductions much faster than the int
    min-reductions (lowered to reduce-windows) or a variadic arg-reduce.
    Counts < 2^24, so the ranks are exact.
    """
    count = tf.shape(similarity)[axis]
    shape = [1, 1, 1]
    shape[axis] = -1
    rank = tf.reshape(tf.cast(count - tf.range(count), tf.float32), shape)
    best = tf.reduce_max(
        tf.where(similarity == tf.expand_dims(maximum, axis), rank, 0.0),
        axis=axis,
    )
    return count - tf.cast(tf.maximum(best, 0.0), tf.int32)


def _pairwise_iou(anchors, anchor_area, boxes, anchor_major):
    """IoU of anchors [N, 4] with boxes [B, M, 4] -> [B, N, M] if
    `anchor_major` else [B, M, N], the same values as `box_ops.iou` (float
    for float, also under XLA).

    The box areas are a 2-element `reduce_prod`, not a multiply that XLA
    would fuse into the union's sum: LLVM then contracts the pair into one
    FMA (a single rounding), which moved an IoU of exactly 0.5 across the
    threshold in the compiled program but not in the eager one.
    """
    anchor_axis, box_axis = (1, 2) if anchor_major else (2, 1)
    box = [tf.expand_dims(c, anchor_axis) for c in tf.unstack(boxes, 4, -1)]
    anchor = [tf.expand_dims(c[None], box_axis)
              for c in tf.unstack(anchors, 4, axis=-1)]
    height = tf.maximum(
        tf.minimum(anchor[2], box[2]) - tf.maximum(anchor[0], box[0]), 0.0)
    width = tf.maximum(
        tf.minimum(anchor[3], box[3]) - tf.maximum(anchor[1], box[1]), 0.0)
    inter = height * width
    sides = tf.stack(
        [boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]], -1)
    box_area = tf.reduce_prod(tf.maximum(sides, 0.0), axis=-1)
    union = (tf.expand_dims(anchor_area[None], box_axis)
             + tf.expand_dims(box_area, anchor_axis) - inter)
    return tf.math.divide_no_nan(inter, union)
