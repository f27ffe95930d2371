"""The multi-dataset detector: CSPDarknet53 -> BiFPN -> {dataset: head}.

One backbone and neck are shared by every dataset; each dataset keeps its own
class net and box net, so each head predicts only its own label space. A
training step receives one batch per dataset (a dict keyed by dataset name):
the images are concatenated so the shared features are computed in a single
pass, then each head sees only its own dataset's slice of them and is trained
only by its own dataset's targets.
"""

import keras
import tensorflow as tf

from effdet_tf import compat
from effdet_tf.modeling.backbone import CSPDarknet53
from effdet_tf.modeling.bifpn import BiFPN
from effdet_tf.modeling.heads import BoxNet, ClassNet
from effdet_tf.ops.anchors import Anchors
from effdet_tf.ops.losses import DetectionLoss, weight_l2_loss
from effdet_tf.ops.postprocess import postprocess


@keras.saving.register_keras_serializable(package="effdet_tf")
class Detector(keras.Model):
    """CSPDarknet53-Mish backbone, EfficientDet BiFPN neck, one head per dataset.

    Args:
        heads: dict mapping dataset name -> number of classes. Its order is
            the head order everywhere (exported `detection_heads` indices).
        image_size: side of the square input the anchors are laid out for.
        width_multiplier, depth_multiplier: backbone scaling (1.0 is
            CSPDarknet53); narrow copies keep the architecture for tests and
            the demo.
        fpn_channels, fpn_repeats: BiFPN width and depth (D0: 64, 3).
        head_depth: separable convs per class/box net before the predictor
            (D0: 3). Heads use `fpn_channels` as their width, as D0 does.
        min_level, max_level: pyramid levels (P3-P7).
        num_scales, aspect_ratios, anchor_scale: anchor layout.
        head_loss_weights: optional dict dataset name -> weight of that
            head's loss in the total (default 1.0 each).
        box_loss: "huber" (EfficientDet), "giou" or "ciou" (YOLOv4).
        focal_alpha, focal_gamma, huber_delta: loss hyper-parameters
            (EfficientDet's defaults).
        box_loss_weight: weight of the box loss; None picks EfficientDet's
            50 for Huber and 1 for the IoU losses.
        label_smoothing: class label smoothing of the focal loss (0: off).

    Inputs are float RGB images in [0, 255] of shape [B, S, S, 3]; the
    model rescales to [0, 1] itself so every caller (pipeline, export,
    benchmarks) feeds the same thing.

    `call(images)` runs every head on every image; `call({name: images})`
    runs head `name` on its own images only. Both return
    {name: {"cls_logits": [B, N, C] float32, "box_deltas": [B, N, 4] float32}}.
    """

    def __init__(
        self,
        heads,
        image_size=512,
        width_multiplier=1.0,
        depth_multiplier=1.0,
        fpn_channels=64,
        fpn_repeats=3,
        head_depth=3,
        min_level=3,
        max_level=7,
        num_scales=3,
        aspect_ratios=(1.0, 2.0, 0.5),
        anchor_scale=4.0,
        head_loss_weights=None,
        box_loss="huber",
        focal_alpha=0.25,
        focal_gamma=1.5,
        huber_delta=0.1,
        box_loss_weight=None,
        bn_momentum=None,
        label_smoothing=0.0,
        **kwargs,
    ):
        if not heads:
            raise ValueError("Detector needs at least one head: heads={name: num_classes}.")
        unknown = set(head_loss_weights or {}) - set(heads)
        if unknown:
            raise ValueError(f"head_loss_weights names unknown heads {sorted(unknown)}; heads are {list(heads)}.")
        super().__init__(**kwargs)
        self.heads = dict(heads)
        self.head_names = list(heads)
        self.image_size = int(image_size)
        self.width_multiplier = width_multiplier
        self.depth_multiplier = depth_multiplier
        self.fpn_channels = fpn_channels
        self.fpn_repeats = fpn_repeats
        self.head_depth = head_depth
        self.min_level = min_level
        self.max_level = max_level
        self.num_scales = num_scales
        self.aspect_ratios = tuple(float(r) for r in aspect_ratios)
        self.anchor_scale = anchor_scale
        self.head_loss_weights = {name: float((head_loss_weights or {}).get(name, 1.0)) for name in heads}
        self.box_loss = box_loss
        self.bn_momentum = None if bn_momentum is None else float(bn_momentum)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.huber_delta = huber_delta
        self.box_loss_weight = box_loss_weight
        self.label_smoothing = float(label_smoothing)

        self.anchors = Anchors(
            self.image_size,
            min_level=min_level,
            max_level=max_level,
            num_scales=num_scales,
            aspect_ratios=self.aspect_ratios,
            anchor_scale=anchor_scale,
        )
        # Created in this order (trunk, heads, losses, the functional graph)
        # so that layer and weight names stay those of saved checkpoints.
        self.backbone = CSPDarknet53(
            width_multiplier=width_multiplier, depth_multiplier=depth_multiplier, name="backbone"
        )
        self.neck = BiFPN(
            num_channels=fpn_channels,
            num_repeats=fpn_repeats,
            min_level=min_level,
            max_level=max_level,
            name="bifpn",
        )
        self._make_heads()
        self._make_losses()
        # Training recipe, not architecture: set by compile(), not saved.
        self.l2_weight_decay = 0.0
        self._l2_variables = lambda: []
        self._build_graph()
        if self.bn_momentum is not None:
            self._set_bn_momentum(self.bn_momentum)
        self.built = True

    def _make_heads(self):
        """A ClassNet and a BoxNet per dataset, in head order (Keras tracks
        layers held in dicts; insertion order is the head order)."""
        num_anchors = self.anchors.num_anchors_per_location
        num_levels = self.max_level - self.min_level + 1
        common = {"num_anchors": num_anchors, "width": self.fpn_channels, "depth": self.head_depth,
                  "num_levels": num_levels}
        self.class_nets = {
            name: ClassNet(num_classes, name=f"{name}_class_net", **common)
            for name, num_classes in self.heads.items()
        }
        self.box_nets = {name: BoxNet(name=f"{name}_box_net", **common) for name in self.heads}

    def _make_losses(self):
        """Each head's DetectionLoss and the loss trackers fit reports."""
        self.detection_losses = {
            name: DetectionLoss(
                num_classes,
                alpha=self.focal_alpha,
                gamma=self.focal_gamma,
                box_loss=self.box_loss,
                huber_delta=self.huber_delta,
                box_loss_weight=self.box_loss_weight,
                label_smoothing=self.label_smoothing,
                anchors=self.anchors.boxes,
            )
            for name, num_classes in self.heads.items()
        }
        self.loss_trackers = {
            f"{name}_{part}": keras.metrics.Mean(name=f"{name}_{part}")
            for name in self.heads
            for part in ("cls_loss", "box_loss", "loss")
        }
        self.l2_tracker = keras.metrics.Mean(name="l2_loss")

    def _build_graph(self):
        """Backbone and neck form one functional graph; the heads are shared
        layers called on its pyramid, so they are built here, symbolically,
        without running any computation."""
        images = keras.Input(shape=(None, None, 3), name="images")
        scaled = keras.layers.Rescaling(1.0 / 255.0, name="rescale")(images)
        pyramid = self.neck(self.backbone(scaled))
        levels = [pyramid[f"P{level}"] for level in range(self.min_level, self.max_level + 1)]
        self.feature_extractor = keras.Model(images, levels, name="feature_extractor")
        for name in self.head_names:
            self.class_nets[name](levels)
            self.box_nets[name](levels)

    def _set_bn_momentum(self, momentum):
        """One momentum for every BatchNorm (read at call time, so before
        any train step is traced). The layers' own defaults are
        EfficientDet's and Darknet's 0.99: moving statistics that average
        ~100 steps, which lag behind the weights in a run of a few hundred
        steps (BENCHMARKS.md, "Real data")."""
        for layer in compat.sublayers(self):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = momentum

    def features(self, images, training=False):
        """The shared trunk (backbone + BiFPN) on `images` [B, S, S, 3]: the
        P3-P7 list every head reads. Export traces it once for all heads."""
        return self.feature_extractor(images, training=training)

    def run_head(self, name, levels, training=False):
        """Head `name`'s raw outputs on the shared features `levels` (the
        feature extractor's P3-P7 list): {"cls_logits", "box_deltas"}.
        Evaluation and export run only the heads they need with it."""
        return {
            "cls_logits": self.class_nets[name](levels, training=training),
            "box_deltas": self.box_nets[name](levels, training=training),
        }

    def call(self, inputs, training=None):
        if not isinstance(inputs, dict):
            levels = self.features(inputs, training=training)
            return {name: self.run_head(name, levels, training) for name in self.head_names}

        unknown = set(inputs) - set(self.head_names)
        if unknown:
            raise ValueError(f"Images given for unknown datasets {sorted(unknown)}; heads are {self.head_names}.")
        names = [name for name in self.head_names if name in inputs]
        batch_sizes = [tf.shape(inputs[name])[0] for name in names]
        levels = self.features(tf.concat([inputs[name] for name in names], axis=0), training=training)
        # Split every level back into per-dataset slices: head k only ever
        # sees (and its per-level BatchNorm only ever normalises) dataset k.
        per_dataset = zip(*[tf.split(level, batch_sizes, axis=0) for level in levels])
        return {name: self.run_head(name, list(slices), training) for name, slices in zip(names, per_dataset)}

    def compile(self, *args, l2_weight_decay=0.0, l2_variables=(), **kwargs):
        """Keras's compile, plus EfficientDet's weight decay as a loss term:
        `l2_weight_decay * sum(v**2) / 2` over `l2_variables` (the kernels:
        see optimization.decay_variables), whose gradient is
        `l2_weight_decay * v` and goes through the optimizer's momentum."""
        self.l2_weight_decay = float(l2_weight_decay)
        variables = list(l2_variables)
        self._l2_variables = lambda: variables  # a closure: Keras would track a list attribute
        super().compile(*args, **kwargs)

    def l2_loss(self):
        """The L2 weight-decay term (float32 scalar; 0 when off)."""
        if not self.l2_weight_decay:
            return tf.constant(0.0, tf.float32)
        return weight_l2_loss(self._l2_variables(), self.l2_weight_decay)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """Weighted sum over heads of each head's focal + box loss, plus the
        L2 weight-decay term (tracked as `l2_loss`) when compiled with one.

        `y` is {name: {"cls_targets": [B, N], "box_targets": [B, N, 4]}}, the
        same keys as `y_pred`. Per-head losses are tracked as metrics
        `<name>_cls_loss`, `<name>_box_loss` and `<name>_loss` (unweighted).
        """
        del x, sample_weight, training
        total = tf.constant(0.0, tf.float32)
        for name in self.head_names:
            if name not in y:
                continue
            losses = self.detection_losses[name](y[name], y_pred[name])
            for part in ("cls_loss", "box_loss", "loss"):
                self.loss_trackers[f"{name}_{part}"].update_state(losses[part])
            total += self.head_loss_weights[name] * losses["loss"]
        if self.l2_weight_decay:
            l2 = self.l2_loss()
            self.l2_tracker.update_state(l2)
            total += l2
        for extra in self.losses:
            total += tf.cast(tf.reduce_sum(extra), tf.float32)
        # Keras sums gradients across replicas, so each replica contributes
        # its share (what keras.losses.Loss does for compiled losses).
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        return total / replicas if replicas > 1 else total

    def detect(self, images, heads=None, **postprocess_kwargs):
        """Boxes, scores and contiguous class indices per head, in model pixels.

        `postprocess_kwargs` are ops.postprocess.postprocess's (score and IoU
        thresholds, max_detections, pre_nms_topk, nms_method,
        soft_nms_sigma); evaluation passes `PostprocessConfig.eval_kwargs()`,
        the settings every export signature uses too.

        Returns {name: postprocess dict} for `heads` (default: every head).
        """
        names = list(heads or self.head_names)
        unknown = set(names) - set(self.head_names)
        if unknown:
            raise ValueError(f"detect: unknown heads {sorted(unknown)}; heads are {self.head_names}.")
        # One trunk pass; only the heads asked for run (evaluating dataset k
        # costs head k, not every head).
        levels = self.features(images, training=False)
        outputs = {name: self.run_head(name, levels, training=False) for name in names}
        return {
            name: postprocess(out["cls_logits"], out["box_deltas"], self.anchors.boxes, **postprocess_kwargs)
            for name, out in outputs.items()
        }

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "heads": dict(self.heads),
                "image_size": self.image_size,
                "width_multiplier": self.width_multiplier,
                "depth_multiplier": self.depth_multiplier,
                "fpn_channels": self.fpn_channels,
                "fpn_repeats": self.fpn_repeats,
                "head_depth": self.head_depth,
                "min_level": self.min_level,
                "max_level": self.max_level,
                "num_scales": self.num_scales,
                "aspect_ratios": list(self.aspect_ratios),
                "anchor_scale": self.anchor_scale,
                "head_loss_weights": dict(self.head_loss_weights),
                "box_loss": self.box_loss,
                "focal_alpha": self.focal_alpha,
                "focal_gamma": self.focal_gamma,
                "huber_delta": self.huber_delta,
                "box_loss_weight": self.box_loss_weight,
                "bn_momentum": self.bn_momentum,
                "label_smoothing": self.label_smoothing,
            }
        )
        return config
