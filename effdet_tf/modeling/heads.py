"""EfficientDet class and box nets, shared across pyramid levels.

As in EfficientDet (Tan et al. 2020, sec. 3.3; google/automl
efficientdet/keras/efficientdet_keras.py `ClassNet`/`BoxNet`): `depth`
repeats of 3x3 separable conv (weights shared by all levels) + BatchNorm
(one per level, statistics differ per scale) + swish, then a separable conv
predicting `num_anchors * K` values per location. The class prediction bias
starts at -log((1 - 0.01) / 0.01) (RetinaNet's prior, Lin et al. 2017,
sec. 4.1), so every anchor starts at probability 0.01.

Each level's [B, H, W, A*K] map becomes [B, H*W*A, K] and the levels are
concatenated: order level, row, column, anchor, the order of
`ops.anchors.Anchors`. The prediction conv runs in float32 so the outputs
are float32 under a mixed_float16 policy too.
"""

import math

import keras

from effdet_tf.modeling.layers import (
    EFFDET_BN_EPSILON,
    EFFDET_BN_MOMENTUM,
    FusedBatchNormalization,
)

CLASS_PRIOR = 0.01


class _LevelSharedNet(keras.layers.Layer):
    """Shared conv tower + per-level BN + prediction conv, `outputs` per anchor."""

    def __init__(
        self,
        outputs_per_anchor,
        num_anchors=9,
        width=64,
        depth=3,
        num_levels=5,
        bias_init=0.0,
        bn_momentum=EFFDET_BN_MOMENTUM,
        bn_epsilon=EFFDET_BN_EPSILON,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.outputs_per_anchor = outputs_per_anchor
        self.num_anchors = num_anchors
        self.width = width
        self.depth = depth
        self.num_levels = num_levels
        self.bn_momentum = bn_momentum
        self.bn_epsilon = bn_epsilon

        # === Layers ===
        # automl initialises head convs with variance scaling (fan-in).
        def sep_conv(filters, name, **kw):
            return keras.layers.SeparableConv2D(
                filters,
                3,
                padding="same",
                depthwise_initializer=keras.initializers.VarianceScaling(),
                pointwise_initializer=keras.initializers.VarianceScaling(),
                name=name,
                **kw,
            )

        # No bias: each conv is followed by BatchNorm.
        self.convs = [
            sep_conv(width, f"conv{i}", use_bias=False, dtype=self.dtype_policy)
            for i in range(depth)
        ]
        self.bns = [
            [
                FusedBatchNormalization(
                    momentum=bn_momentum,
                    epsilon=bn_epsilon,
                    dtype=self.dtype_policy,
                    name=f"conv{i}_bn_level{l}",
                )
                for l in range(num_levels)
            ]
            for i in range(depth)
        ]
        self.predict = sep_conv(
            num_anchors * outputs_per_anchor,
            "predict",
            bias_initializer=keras.initializers.Constant(bias_init),
            dtype="float32",
        )

    def build(self, input_shape):
        if len(input_shape) != self.num_levels:
            raise ValueError(
                f"{self.name} expects {self.num_levels} levels, got {len(input_shape)}"
            )
        channels = input_shape[0][-1]
        for conv in self.convs:
            conv.build((None, None, None, channels))
            channels = self.width
        for per_level in self.bns:
            for bn in per_level:
                bn.build((None, None, None, self.width))
        self.predict.build((None, None, None, channels))
        self.built = True

    def call(self, inputs, training=None):
        k = self.outputs_per_anchor
        outputs = []
        for level, x in enumerate(inputs):
            for conv, bns in zip(self.convs, self.bns):
                x = keras.activations.swish(bns[level](conv(x), training=training))
            x = self.predict(x)
            # [B, H, W, A*K] -> [B, H*W*A, K]: row, column, anchor order.
            outputs.append(keras.ops.reshape(x, (keras.ops.shape(x)[0], -1, k)))
        return keras.ops.concatenate(outputs, axis=1)

    def compute_output_shape(self, input_shape):
        total = 0
        for shape in input_shape:
            if shape[1] is None or shape[2] is None:
                total = None
                break
            total += shape[1] * shape[2] * self.num_anchors
        return (input_shape[0][0], total, self.outputs_per_anchor)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_anchors": self.num_anchors,
                "width": self.width,
                "depth": self.depth,
                "num_levels": self.num_levels,
                "bn_momentum": self.bn_momentum,
                "bn_epsilon": self.bn_epsilon,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="effdet_tf")
class ClassNet(_LevelSharedNet):
    """Class logits: list of level features [P3..P7] -> [B, N, num_classes]."""

    def __init__(self, num_classes, num_anchors=9, width=64, depth=3, num_levels=5, **kwargs):
        super().__init__(
            num_classes,
            num_anchors=num_anchors,
            width=width,
            depth=depth,
            num_levels=num_levels,
            bias_init=-math.log((1 - CLASS_PRIOR) / CLASS_PRIOR),
            **kwargs,
        )
        self.num_classes = num_classes

    def get_config(self):
        config = super().get_config()
        config["num_classes"] = self.num_classes
        return config


@keras.saving.register_keras_serializable(package="effdet_tf")
class BoxNet(_LevelSharedNet):
    """Box deltas (ty, tx, th, tw): list [P3..P7] -> [B, N, 4]."""

    def __init__(self, num_anchors=9, width=64, depth=3, num_levels=5, **kwargs):
        super().__init__(
            4,
            num_anchors=num_anchors,
            width=width,
            depth=depth,
            num_levels=num_levels,
            bias_init=0.0,
            **kwargs,
        )
