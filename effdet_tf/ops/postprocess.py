"""Head outputs -> fixed-size detections: decode + per-class NMS, in-graph.

Steps, all TensorFlow ops so the function exports inside a SavedModel with
an unknown batch size:
1. pre-select the `pre_nms_topk` highest (anchor, class) logits per image
   (the EfficientDet reference keeps 5000 candidates, `MAX_DETECTION_POINTS`
   in google/automl `efficientdet/anchors.py`): NMS cost no longer scales
   with the 49k anchors x C classes;
2. decode only those candidates' deltas against their anchors;
3. per-class NMS with `tf.image.combined_non_max_suppression`, which also
   applies the score threshold, keeps the best `max_detections` over all
   classes and pads to exactly that many.
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
    pre_nms_topk=5000,
):
    """Turns one head's raw outputs into padded detections.

    Args:
      cls_logits: [B, N, C] class logits (any float dtype; C must be static).
      box_deltas: [B, N, 4] encoded deltas (ty, tx, th, tw).
      anchors: `Anchors` or [N, 4] yxyx pixel tensor of the model input.
      score_threshold: detections need sigmoid score > this.
      iou_threshold: same-class boxes overlapping more than this are
        suppressed; boxes of different classes never suppress each other.
      max_detections: K, the fixed output length.
      pre_nms_topk: candidates (anchor, class pairs) kept before NMS.

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
