"""Box math: the one place for box formats, IoU and anchor deltas.

Inside the package every box is `yxyx` = [ymin, xmin, ymax, xmax] in absolute
pixels of the image the tensor belongs to, float32, shape [..., 4]. Every
conversion to another layout (COCO xywh, centre form, normalised) lives here.

All functions are plain TensorFlow ops: they run eagerly, inside
`tf.function` and inside `tf.data.Dataset.map`, and broadcast over leading
dimensions.
"""

import math

import tensorflow as tf

# Width/height deltas are clamped before `exp` so an untrained head cannot
# produce inf boxes (which poison NMS and IoU losses). The bound is the one
# Detectron uses (`bbox_xform_clip = log(1000 / 16)`): a box at most 62.5x the
# size of its anchor.
DELTA_CLIP = math.log(1000.0 / 16.0)

# Guards divisions by zero-size boxes; tiny relative to pixel coordinates.
_EPSILON = 1e-8


def _f32(x):
    return tf.cast(x, tf.float32)


def _unstack(boxes):
    """[..., 4] -> four [...] tensors."""
    return tf.unstack(_f32(boxes), num=4, axis=-1)


def area(boxes):
    """Area of `yxyx` boxes [..., 4] -> [...]; degenerate boxes give 0."""
    ymin, xmin, ymax, xmax = _unstack(boxes)
    return tf.maximum(ymax - ymin, 0.0) * tf.maximum(xmax - xmin, 0.0)


def _pairwise_intersection(boxes1, boxes2):
    """Intersection areas of [..., N, 4] x [..., M, 4] -> [..., N, M]."""
    y1a, x1a, y2a, x2a = [c[..., :, None] for c in _unstack(boxes1)]
    y1b, x1b, y2b, x2b = [c[..., None, :] for c in _unstack(boxes2)]
    height = tf.maximum(tf.minimum(y2a, y2b) - tf.maximum(y1a, y1b), 0.0)
    width = tf.maximum(tf.minimum(x2a, x2b) - tf.maximum(x1a, x1b), 0.0)
    return height * width


def iou(boxes1, boxes2):
    """Pairwise IoU of `yxyx` boxes.

    Args:
      boxes1: [..., N, 4] yxyx.
      boxes2: [..., M, 4] yxyx (same leading dims, or broadcastable).

    Returns:
      [..., N, M] float32 in [0, 1]; pairs with a zero union give 0.
      N or M may be 0.
    """
    inter = _pairwise_intersection(boxes1, boxes2)
    union = area(boxes1)[..., :, None] + area(boxes2)[..., None, :] - inter
    return tf.math.divide_no_nan(inter, union)


def ioa(boxes1, boxes2):
    """Pairwise intersection over the area of `boxes1`: [..., N, M].

    Used to find anchors that lie mostly inside a crowd region, where IoU is
    small because the crowd box is much larger than the anchor.
    """
    inter = _pairwise_intersection(boxes1, boxes2)
    return tf.math.divide_no_nan(inter, area(boxes1)[..., :, None])


# ---------------------------------------------------------------------------
# Format conversions.


def yxyx_to_xywh(boxes):
    """yxyx -> COCO [x, y, width, height] (same units)."""
    ymin, xmin, ymax, xmax = _unstack(boxes)
    return tf.stack([xmin, ymin, xmax - xmin, ymax - ymin], axis=-1)


def xywh_to_yxyx(boxes):
    """COCO [x, y, width, height] -> yxyx (same units)."""
    x, y, w, h = _unstack(boxes)
    return tf.stack([y, x, y + h, x + w], axis=-1)


def yxyx_to_cxcywh(boxes):
    """yxyx -> [center_y, center_x, height, width]."""
    ymin, xmin, ymax, xmax = _unstack(boxes)
    return tf.stack(
        [(ymin + ymax) * 0.5, (xmin + xmax) * 0.5, ymax - ymin, xmax - xmin],
        axis=-1,
    )


def cxcywh_to_yxyx(boxes):
    """[center_y, center_x, height, width] -> yxyx."""
    cy, cx, h, w = _unstack(boxes)
    return tf.stack(
        [cy - h * 0.5, cx - w * 0.5, cy + h * 0.5, cx + w * 0.5], axis=-1
    )


def normalize(boxes, height, width):
    """yxyx pixels -> yxyx in [0, 1] of an image of `height` x `width`.

    `height`/`width` may be python numbers or tensors broadcastable to
    boxes[..., 0] (e.g. [B, 1] for a batch of [B, K, 4]).
    """
    ymin, xmin, ymax, xmax = _unstack(boxes)
    h, w = _f32(height), _f32(width)
    return tf.stack([ymin / h, xmin / w, ymax / h, xmax / w], axis=-1)


def denormalize(boxes, height, width):
    """yxyx in [0, 1] -> yxyx pixels of an image of `height` x `width`."""
    ymin, xmin, ymax, xmax = _unstack(boxes)
    h, w = _f32(height), _f32(width)
    return tf.stack([ymin * h, xmin * w, ymax * h, xmax * w], axis=-1)


def clip(boxes, height, width):
    """Clips yxyx pixel boxes to the image [0, height] x [0, width]."""
    ymin, xmin, ymax, xmax = _unstack(boxes)
    h, w = _f32(height), _f32(width)
    ymin = tf.clip_by_value(ymin, 0.0, h)
    ymax = tf.clip_by_value(ymax, 0.0, h)
    xmin = tf.clip_by_value(xmin, 0.0, w)
    xmax = tf.clip_by_value(xmax, 0.0, w)
    return tf.stack([ymin, xmin, ymax, xmax], axis=-1)


# ---------------------------------------------------------------------------
# Anchor deltas (Faster R-CNN parameterisation, no scale factors, as the
# EfficientDet reference uses `FasterRcnnBoxCoder()` with its defaults).


def centre_size(boxes):
    """yxyx [..., 4] -> (cy, cx, h, w), each [...]: the box terms of
    `encode`, with the sides floored at a tiny epsilon so that its logs and
    divisions stay finite for degenerate boxes (they should never be
    matched, but targets are computed for every anchor before masking)."""
    cy, cx, h, w = tf.unstack(yxyx_to_cxcywh(boxes), 4, axis=-1)
    return cy, cx, tf.maximum(h, _EPSILON), tf.maximum(w, _EPSILON)


def encode_centre_size(box, anchor):
    """`encode` from `centre_size` terms: box (cy, cx, h, w) relative to
    anchor (cy_a, cx_a, h_a, w_a) (broadcast) -> [..., 4] deltas. For
    callers that reuse the terms (the label encoder's constant anchors)."""
    cy, cx, h, w = box
    cya, cxa, ha, wa = anchor
    return tf.stack(
        [(cy - cya) / ha, (cx - cxa) / wa, tf.math.log(h / ha),
         tf.math.log(w / wa)],
        axis=-1,
    )


def encode(boxes, anchors):
    """Encodes yxyx boxes relative to yxyx anchors (elementwise, broadcast).

    ty = (cy - cy_a) / h_a, tx = (cx - cx_a) / w_a,
    th = log(h / h_a),      tw = log(w / w_a).

    Args:
      boxes: [..., 4] yxyx pixels.
      anchors: [..., 4] yxyx pixels, broadcastable to `boxes`.

    Returns:
      [..., 4] float32 deltas (ty, tx, th, tw).
    """
    return encode_centre_size(centre_size(boxes), centre_size(anchors))


def decode(deltas, anchors):
    """Inverse of `encode`: deltas [..., 4] + anchors [..., 4] -> yxyx boxes.

    th/tw are clamped at `DELTA_CLIP` so the result is always finite.
    """
    ty, tx, th, tw = _unstack(deltas)
    cya, cxa, ha, wa = tf.unstack(yxyx_to_cxcywh(anchors), 4, axis=-1)
    th = tf.minimum(th, DELTA_CLIP)
    tw = tf.minimum(tw, DELTA_CLIP)
    cy = ty * ha + cya
    cx = tx * wa + cxa
    h = tf.exp(th) * ha
    w = tf.exp(tw) * wa
    return cxcywh_to_yxyx(tf.stack([cy, cx, h, w], axis=-1))


# ---------------------------------------------------------------------------
# Elementwise IoU variants for box losses. Keras core has no IoU loss and
# keras-cv may only be imported by data/augment.py, so the math lives here.


def _elementwise_terms(boxes1, boxes2):
    """Shared pieces of IoU/GIoU/CIoU for elementwise pairs [..., 4]."""
    y1a, x1a, y2a, x2a = _unstack(boxes1)
    y1b, x1b, y2b, x2b = _unstack(boxes2)
    inter_h = tf.maximum(tf.minimum(y2a, y2b) - tf.maximum(y1a, y1b), 0.0)
    inter_w = tf.maximum(tf.minimum(x2a, x2b) - tf.maximum(x1a, x1b), 0.0)
    inter = inter_h * inter_w
    union = area(boxes1) + area(boxes2) - inter
    iou_value = inter / (union + _EPSILON)
    # Smallest box enclosing both.
    enc_h = tf.maximum(y2a, y2b) - tf.minimum(y1a, y1b)
    enc_w = tf.maximum(x2a, x2b) - tf.minimum(x1a, x1b)
    return iou_value, union, enc_h, enc_w


def giou(boxes1, boxes2):
    """Generalized IoU of matching pairs [..., 4] x [..., 4] -> [...].

    GIoU = IoU - (|C| - |A u B|) / |C|, C the smallest enclosing box
    (Rezatofighi et al. 2019, https://arxiv.org/abs/1902.09630). In [-1, 1].
    """
    iou_value, union, enc_h, enc_w = _elementwise_terms(boxes1, boxes2)
    enclosure = tf.maximum(enc_h, 0.0) * tf.maximum(enc_w, 0.0)
    return iou_value - (enclosure - union) / (enclosure + _EPSILON)


def ciou(boxes1, boxes2):
    """Complete IoU of matching pairs [..., 4] x [..., 4] -> [...].

    CIoU = IoU - rho^2 / c^2 - alpha * v, with rho the centre distance, c the
    enclosing box diagonal, v = 4 / pi^2 * (atan(w1/h1) - atan(w2/h2))^2 and
    alpha = v / (1 - IoU + v) (Zheng et al. 2020, eq. 8-11,
    https://arxiv.org/abs/2005.03572). As in the paper, alpha is a trade-off
    weight and gets no gradient. Note keras-cv 0.9's `compute_ciou` squares
    the 4/pi^2 factor too (keras-team/keras#20780, fixed in Keras core's
    `keras.utils.bounding_boxes.compute_ciou`); this follows the paper.
    """
    iou_value, _, enc_h, enc_w = _elementwise_terms(boxes1, boxes2)
    cy1, cx1, h1, w1 = tf.unstack(yxyx_to_cxcywh(boxes1), 4, axis=-1)
    cy2, cx2, h2, w2 = tf.unstack(yxyx_to_cxcywh(boxes2), 4, axis=-1)
    diagonal = tf.square(enc_h) + tf.square(enc_w) + _EPSILON
    centre_distance = tf.square(cy1 - cy2) + tf.square(cx1 - cx2)
    v = (4.0 / math.pi**2) * tf.square(
        tf.atan(w1 / (h1 + _EPSILON)) - tf.atan(w2 / (h2 + _EPSILON))
    )
    # divide_no_nan, not "+ eps": grappler may fold (1 + eps) - iou into
    # 1 - iou, giving 0 / 0 for identical boxes inside a tf.function.
    alpha = tf.stop_gradient(tf.math.divide_no_nan(v, 1.0 - iou_value + v))
    return iou_value - centre_distance / diagonal - alpha * v
