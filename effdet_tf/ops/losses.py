"""Detection losses: focal classification + box regression, per head.

Defaults are EfficientDet's (google/automl `efficientdet/hparams_config.py`
and `keras/train_lib.py`): focal loss alpha 0.25, gamma 1.5; Huber loss on
the encoded deltas with delta 0.1, weighted 50; both normalised by the
number of positive anchors in the global batch + 1 (the +1 keeps an image
without boxes finite; `normaliser` counts over every replica), and the
Huber sum also by the 4 coordinates. Ignored anchors
(class target -2) add nothing.

The GIoU/CIoU option (YOLOv4 trains with CIoU, Bochkovskiy et al. 2020)
decodes predicted and target deltas with the anchors and sums 1 - GIoU (or
1 - CIoU) over positives, normalised by positives + 1; its default weight
is automl's `iou_loss_weight` of 1.0, since the value per box is O(1) rather
than O(delta^2).
"""

import keras
import tensorflow as tf

from effdet_tf.ops import boxes as box_ops
from effdet_tf.ops.anchors import Anchors

_BOX_LOSSES = ("huber", "giou", "ciou")
_DEFAULT_BOX_WEIGHT = {"huber": 50.0, "giou": 1.0, "ciou": 1.0}


def normaliser(positives):
    """What a replica divides its loss sums by: (positives + 1) of the whole
    global batch, over the number of replicas.

    Keras sums the replicas' gradients and Detector.compute_loss returns
    each replica's loss over the replica count, so with this every replica
    weighs each positive as one replica holding the whole batch would: the
    gradient equals a single device's on the same global batch, and a
    replica whose slice holds no object (or one big crowd) cannot spike the
    step. A per-replica count (automl's keras train_lib by default; its
    `positives_momentum < 0` takes the replicas' mean of count + 1 instead)
    would divide a nearly empty slice's background loss by ~1. The sum is
    an all-reduce of one scalar per head and step; under no strategy, or
    one replica, this is positives + 1."""
    context = tf.distribute.get_replica_context()
    positives = tf.stop_gradient(positives)
    if context is None or context.num_replicas_in_sync == 1:
        return positives + 1.0
    total = context.all_reduce(tf.distribute.ReduceOp.SUM, positives)
    return (total + 1.0) / context.num_replicas_in_sync


def focal_loss(labels, logits, alpha=0.25, gamma=1.5, label_smoothing=0.0):
    """Elementwise sigmoid focal loss (Lin et al. 2017), float32.

    Written with `tf.nn.sigmoid_cross_entropy_with_logits` rather than
    `keras.losses.binary_focal_crossentropy`: the Keras one takes sigmoid
    first and clips probabilities at 1e-7, which zeroes the gradient of
    confidently wrong logits (|x| > ~16) and averages over the class axis.

    `label_smoothing` eps moves the cross-entropy's targets to 1 - eps/2
    and eps/2; the focal weights keep the hard labels. That is automl's
    FocalLoss (efficientdet/keras/train_lib.py) and the targets of YOLOv5's
    smooth_BCE.
    """
    labels = tf.cast(labels, tf.float32)
    logits = tf.cast(logits, tf.float32)
    prob = tf.sigmoid(logits)
    p_t = labels * prob + (1.0 - labels) * (1.0 - prob)
    alpha_t = labels * alpha + (1.0 - labels) * (1.0 - alpha)
    targets = labels * (1.0 - label_smoothing) + 0.5 * label_smoothing if label_smoothing else labels
    ce = tf.nn.sigmoid_cross_entropy_with_logits(labels=targets, logits=logits)
    return alpha_t * tf.pow(1.0 - p_t, gamma) * ce


@keras.saving.register_keras_serializable(package="effdet_tf")
class DetectionLoss:
    """Loss of one detection head.

    Args:
      num_classes: C, the head's class count.
      alpha, gamma: focal loss parameters.
      box_loss: "huber" (on deltas), "giou" or "ciou" (on decoded boxes).
      huber_delta: Huber transition point.
      box_loss_weight: multiplier of the box loss in "loss"; None picks 50.0
        for "huber" and 1.0 for "giou"/"ciou".
      label_smoothing: class label smoothing of the focal loss (0: off).
      anchors: `Anchors` or [N, 4] yxyx tensor; required for giou/ciou.

    Call with targets {"cls_targets": int [B, N], "box_targets": [B, N, 4]}
    (batched `LabelEncoder` output) and outputs {"cls_logits": [B, N, C],
    "box_deltas": [B, N, 4]} (any float dtype). Returns float32 scalars
    {"cls_loss", "box_loss" (unweighted), "loss" = cls + weight * box}.
    """

    def __init__(
        self,
        num_classes,
        alpha=0.25,
        gamma=1.5,
        box_loss="huber",
        huber_delta=0.1,
        box_loss_weight=None,
        anchors=None,
        label_smoothing=0.0,
    ):
        if box_loss not in _BOX_LOSSES:
            raise ValueError(
                f"box_loss must be one of {_BOX_LOSSES}, got {box_loss!r}"
            )
        if box_loss != "huber" and anchors is None:
            raise ValueError(f"box_loss={box_loss!r} needs anchors")
        self.num_classes = int(num_classes)
        self.alpha = float(alpha)
        self.gamma = float(gamma)
        self.box_loss = box_loss
        self.huber_delta = float(huber_delta)
        self.box_loss_weight = box_loss_weight
        self.anchors = anchors
        self.label_smoothing = float(label_smoothing)

    @property
    def resolved_box_loss_weight(self):
        if self.box_loss_weight is None:
            return _DEFAULT_BOX_WEIGHT[self.box_loss]
        return float(self.box_loss_weight)

    def _anchor_boxes(self):
        if isinstance(self.anchors, Anchors):
            return self.anchors.boxes
        return tf.cast(self.anchors, tf.float32)

    def __call__(self, targets, outputs):
        cls_targets = tf.cast(targets["cls_targets"], tf.int32)
        box_targets = tf.cast(targets["box_targets"], tf.float32)
        logits = tf.cast(outputs["cls_logits"], tf.float32)
        deltas = tf.cast(outputs["box_deltas"], tf.float32)

        positive = cls_targets >= 0
        positive_f = tf.cast(positive, tf.float32)
        num_positives = normaliser(tf.reduce_sum(positive_f))

        # one_hot of -1 (background) / -2 (ignore) is all zeros.
        labels = tf.one_hot(cls_targets, self.num_classes, dtype=tf.float32)
        not_ignored = tf.cast(cls_targets != -2, tf.float32)[..., None]
        per_class = focal_loss(labels, logits, self.alpha, self.gamma, self.label_smoothing)
        cls_loss = tf.reduce_sum(per_class * not_ignored) / num_positives

        if self.box_loss == "huber":
            # Trailing axis of 1 so Keras' Huber (a mean over the last axis)
            # stays elementwise.
            per_coord = keras.losses.huber(
                box_targets[..., None], deltas[..., None], self.huber_delta
            )
            box_loss = tf.reduce_sum(per_coord * positive_f[..., None]) / (
                4.0 * num_positives
            )
        else:
            anchors = self._anchor_boxes()
            pred = box_ops.decode(deltas, anchors)
            true = box_ops.decode(box_targets, anchors)
            # Non-positives are swapped for the anchor itself (not masked
            # after the fact) so their garbage can't leak NaN gradients.
            mask = positive[..., None]
            pred = tf.where(mask, pred, anchors)
            true = tf.where(mask, true, anchors)
            fn = box_ops.giou if self.box_loss == "giou" else box_ops.ciou
            per_box = (1.0 - fn(true, pred)) * positive_f
            box_loss = tf.reduce_sum(per_box) / num_positives

        loss = cls_loss + self.resolved_box_loss_weight * box_loss
        return {"cls_loss": cls_loss, "box_loss": box_loss, "loss": loss}

    def get_config(self):
        anchors = self.anchors
        if isinstance(anchors, Anchors):
            anchors = anchors.get_config()
        elif anchors is not None:
            anchors = tf.convert_to_tensor(anchors).numpy().tolist()
        return {
            "num_classes": self.num_classes,
            "alpha": self.alpha,
            "gamma": self.gamma,
            "box_loss": self.box_loss,
            "huber_delta": self.huber_delta,
            "box_loss_weight": self.box_loss_weight,
            "anchors": anchors,
            "label_smoothing": self.label_smoothing,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config.get("anchors"), dict):
            config["anchors"] = Anchors(**config["anchors"])
        return cls(**config)


def weight_l2_loss(variables, weight):
    """EfficientDet's weight decay as a loss term (google/automl
    efficientdet/det_model_fn.py, reg_l2_loss): weight * sum(v**2) / 2 over
    `variables`, in float32, so its gradient is weight * v."""
    if not variables:
        return tf.constant(0.0, tf.float32)
    return weight * tf.add_n([tf.nn.l2_loss(tf.cast(v, tf.float32)) for v in variables])
