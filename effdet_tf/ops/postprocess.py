"""Head outputs -> fixed-size detections: decode + per-class NMS, in-graph.

Steps, all TensorFlow ops so the function exports inside a SavedModel with
an unknown batch size (and runs under TF Serving's C++ session loader):
1. pre-select the `pre_nms_topk` highest (anchor, class) logits per image
   (the EfficientDet reference keeps 5000 candidates, `MAX_DETECTION_POINTS`
   in google/automl `efficientdet/anchors.py`): NMS cost no longer scales
   with the 49k anchors x C classes;
2. decode only those candidates' deltas against their anchors;
3. per-class NMS, then the best `max_detections` over all classes, padded
   to exactly that many:
   - "hard": `tf.image.combined_non_max_suppression` (greedy NMS at
     `iou_threshold`, score threshold, top K and padding in one op);
   - "gaussian": Soft-NMS (Bodla et al. 2017; google/automl's default
     `nms_configs.method`) with `tf.image.non_max_suppression_with_scores`:
     a box overlapping a kept box of its class keeps its place with its
     score multiplied by exp(-IoU^2 / (2 sigma)) (TF's formula), and is
     dropped only once that falls to the score threshold.

Which method and settings: config.PostprocessConfig, one setting for
evaluation, Detector.detect and every export signature.
"""

import tensorflow as tf

from effdet_tf.ops import boxes as box_ops
from effdet_tf.ops.anchors import Anchors


def postprocess(
    cls_logits,
    box_deltas,
    anchors,
    score_threshold=0.05,
    iou_threshold=0.5,
    max_detections=100,
    pre_nms_topk=1000,
    nms_method="hard",
    soft_nms_sigma=0.5,
):
    """Turns one head's raw outputs into padded detections.

    Args:
      cls_logits: [B, N, C] class logits (any float dtype; C must be static).
      box_deltas: [B, N, 4] encoded deltas (ty, tx, th, tw).
      anchors: `Anchors` or [N, 4] yxyx pixel tensor of the model input.
      score_threshold: detections need sigmoid score > this.
      iou_threshold: hard NMS: same-class boxes overlapping more than this
        are suppressed; boxes of different classes never suppress each
        other. Not used by Soft-NMS (it decays instead of cutting).
      max_detections: K, the fixed output length.
      pre_nms_topk: candidates (anchor, class pairs) kept before NMS.
      nms_method: "hard" or "gaussian" (Soft-NMS).
      soft_nms_sigma: Soft-NMS decay parameter (TF's `soft_nms_sigma`).

    Returns:
      {"boxes": float32 [B, K, 4] yxyx model-input pixels (not clipped),
       "scores": float32 [B, K], "classes": int32 [B, K] contiguous index,
       "num_detections": int32 [B]}. Rows past num_detections are zeros
      (class 0 included: read them through num_detections).
    """
    if isinstance(anchors, Anchors):
        anchors = anchors.boxes
    anchors = tf.cast(anchors, tf.float32)
    cls_logits = tf.cast(cls_logits, tf.float32)
    box_deltas = tf.cast(box_deltas, tf.float32)

    num_classes = cls_logits.shape[-1]
    if num_classes is None:
        raise ValueError("cls_logits needs a static class dimension")
    batch = tf.shape(cls_logits)[0]
    flat = tf.reshape(cls_logits, [batch, -1])  # anchor-major: a * C + c

    num_candidates = cls_logits.shape[1]
    if num_candidates is not None:
        k = min(int(pre_nms_topk), int(num_candidates) * num_classes)
    else:
        k = tf.minimum(pre_nms_topk, tf.shape(flat)[1])
    # Sigmoid is monotonic: rank on logits, take the sigmoid of k values only.
    top_logits, top_index = tf.math.top_k(flat, k=k, sorted=False)
    anchor_index = top_index // num_classes
    class_index = top_index % num_classes

    deltas = tf.gather(box_deltas, anchor_index, batch_dims=1)  # [B, k, 4]
    boxes = box_ops.decode(deltas, tf.gather(anchors, anchor_index))
    scores = tf.sigmoid(top_logits)
    # Each candidate box scores only for its own class: zero elsewhere, and
    # zero never passes the (strict) score threshold.
    per_class_scores = (
        tf.one_hot(class_index, num_classes, dtype=tf.float32)
        * scores[..., None]
    )

    if nms_method == "gaussian":
        return _soft_nms(boxes, per_class_scores, score_threshold, max_detections, soft_nms_sigma)
    if nms_method != "hard":
        raise ValueError(f"nms_method must be 'hard' or 'gaussian', got {nms_method!r}")
    nmsed = tf.image.combined_non_max_suppression(
        boxes[:, :, None, :],
        per_class_scores,
        max_output_size_per_class=max_detections,
        max_total_size=max_detections,
        iou_threshold=iou_threshold,
        score_threshold=score_threshold,
        pad_per_class=False,
        # Boxes are in pixels; the default would clip them to [0, 1].
        clip_boxes=False,
    )
    return {
        "boxes": nmsed.nmsed_boxes,
        "scores": nmsed.nmsed_scores,
        "classes": tf.cast(nmsed.nmsed_classes, tf.int32),
        "num_detections": tf.cast(nmsed.valid_detections, tf.int32),
    }


def _soft_nms(boxes, per_class_scores, score_threshold, max_detections, sigma):
    """Per-class Soft-NMS of every image, then the top K over classes.

    One `non_max_suppression_with_scores` per (image, class) pair, in a
    single `tf.map_fn` over the B x C pairs (a graph loop: exports with an
    unknown batch). Each keeps at most K boxes of its class, as combined
    NMS does; the other classes' candidates score 0 there and never pass the
    threshold. Soft-NMS keeps a class's boxes in descending decayed score,
    so merging the per-class lists by score is the joint result.

    Args:
      boxes: float32 [B, k, 4] candidate boxes (yxyx px).
      per_class_scores: float32 [B, k, C], non-zero only at a candidate's
        own class.
    Returns: the postprocess dict.
    """
    k = max_detections
    num_classes = per_class_scores.shape[-1]
    batch = tf.shape(boxes)[0]
    num_candidates = tf.shape(boxes)[1]
    # [B * C, k]: row b * C + c holds class c's scores of image b.
    scores = tf.reshape(tf.transpose(per_class_scores, [0, 2, 1]), [-1, num_candidates])
    image_of_row = tf.repeat(tf.range(batch), num_classes)

    def one(args):
        row_scores, image = args
        selected, selected_scores = tf.image.non_max_suppression_with_scores(
            boxes[image], row_scores, max_output_size=k,
            # 1.0: no hard cut on top of the decay (TF would zero boxes
            # overlapping more than iou_threshold), as google/automl does.
            iou_threshold=1.0, score_threshold=score_threshold, soft_nms_sigma=sigma)
        n = tf.shape(selected)[0]
        return (tf.pad(selected, [[0, k - n]]), tf.pad(selected_scores, [[0, k - n]]), n)

    selected, selected_scores, counts = tf.map_fn(
        one,
        (scores, image_of_row),
        fn_output_signature=(
            tf.TensorSpec([k], tf.int32), tf.TensorSpec([k], tf.float32), tf.TensorSpec([], tf.int32)),
    )
    # Per image: C lists of K, class-major; padding sorts after everything.
    valid = tf.reshape(tf.sequence_mask(counts, k), [batch, num_classes * k])
    flat_scores = tf.where(valid, tf.reshape(selected_scores, [batch, num_classes * k]), -1.0)
    top_scores, order = tf.math.top_k(flat_scores, k=k)
    num = tf.minimum(tf.reduce_sum(tf.cast(valid, tf.int32), axis=1), k)
    keep = tf.sequence_mask(num, k)
    candidate = tf.gather(tf.reshape(selected, [batch, num_classes * k]), order, batch_dims=1)
    out_boxes = tf.gather(boxes, candidate, batch_dims=1)
    return {
        "boxes": tf.where(keep[..., None], out_boxes, 0.0),
        "scores": tf.where(keep, top_scores, 0.0),
        "classes": tf.where(keep, order // k, 0),
        "num_detections": num,
    }


def suppress_across_heads(boxes, scores, groups, heads, iou_threshold):
    """Greedy NMS between heads, within equivalence groups: which of the
    merged detections of several heads to keep.

    Two detections conflict when they come from different heads, their
    classes are in the same equivalence group (e.g. "banana" of a food head
    and of a fruit head) and their IoU exceeds `iou_threshold`. In score
    order, a detection that conflicts with one already kept is dropped;
    detections of one head never suppress each other (its own per-class
    NMS has run, and under Soft-NMS it keeps lowered duplicates on purpose).

    Args:
      boxes: [B, N, 4] yxyx (any common scale).
      scores: [B, N]; entries < 0 are padding (never kept, never suppress).
      groups: [B, N] int equivalence group of each detection's class.
      heads: [B, N] int head of each detection.
      iou_threshold: float.

    Returns:
      keep: [B, N] bool.
    """
    scores = tf.convert_to_tensor(scores, tf.float32)
    n = tf.shape(scores)[1]
    order = tf.argsort(scores, axis=1, direction="DESCENDING", stable=True)
    take = lambda x: tf.gather(x, order, batch_dims=1)  # noqa: E731
    sorted_scores, sorted_groups, sorted_heads = take(scores), take(groups), take(heads)
    overlap = box_ops.iou(take(boxes), take(boxes)) > iou_threshold
    same_group = sorted_groups[:, :, None] == sorted_groups[:, None, :]
    other_head = sorted_heads[:, :, None] != sorted_heads[:, None, :]
    later = tf.range(n)[:, None] < tf.range(n)[None, :]  # [i, j]: j ranks below i
    conflict = overlap & same_group & other_head & later[None]
    valid = sorted_scores >= 0.0

    def body(i, keep):
        # Detection i, if kept, removes every later detection it conflicts with.
        kept_i = keep[:, i] & valid[:, i]
        return i + 1, keep & ~(conflict[:, i, :] & kept_i[:, None])

    _, keep = tf.while_loop(lambda i, _: i < n, body, (tf.constant(0), valid))
    # Back to the input order.
    inverse = tf.argsort(order, axis=1, stable=True)
    return tf.gather(keep, inverse, batch_dims=1)
