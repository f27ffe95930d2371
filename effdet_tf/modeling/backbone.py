"""CSPDarknet53, the YOLOv4 backbone, with width/depth multipliers.

Layout (Bochkovskiy et al. 2020, "YOLOv4", and AlexeyAB/darknet
cfg/yolov4.cfg, layers 0-104; Wang et al. 2019, "CSPNet"):

    stem      3x3 conv, 32 channels, stride 1
    stage k   (k = 1..5; out = 64, 128, 256, 512, 1024; blocks = 1, 2, 8, 8, 4)
      down        3x3 conv, `out` channels, stride 2 (Darknet padding)
      part2       1x1 conv on `down` (the cross-stage shortcut)
      part1       1x1 conv on `down` (the path through the blocks)
      blocks      n x [1x1 conv (inner), 3x3 conv, + residual]
      post        1x1 conv
      concat      [post, part2]   (Darknet `[route] layers=-1,-k`)
      transition  1x1 conv, `out` channels

Stage 1 is special: part1/part2/blocks/post keep 64 channels and the block's
inner 1x1 conv has 32; in stages 2-5 they all have out / 2 channels. Every
conv is conv (no bias) + BatchNorm + Mish; the residual add is linear.

That is 1 + sum(5 + 2 * blocks) = 72 convs, listed in Darknet's file order by
`darknet_layers()` (the order `darknet_weights.py` reads them in). With Keras
counting BatchNorm moving statistics, the model has 26,652,512 parameters,
the same as keras-hub's `CSPNetBackbone` configured as timm's `cspdarknet53`
(timm merges part1/part2 into one conv and splits it; same parameters).
"""

import keras

from effdet_tf.modeling.layers import ConvBNMish

STAGE_FILTERS = (64, 128, 256, 512, 1024)
STAGE_DEPTHS = (1, 2, 8, 8, 4)
STEM_FILTERS = 32
# Output names of stages 3, 4, 5 (strides 8, 16, 32).
PYRAMID_LEVELS = {3: "P3", 4: "P4", 5: "P5"}


def scale_width(channels, multiplier, divisor=8):
    """Channels after the width multiplier, a multiple of `divisor`, >= divisor."""
    return max(divisor, int(round(channels * multiplier / divisor)) * divisor)


def scale_depth(blocks, multiplier):
    """Block count after the depth multiplier, at least 1 (as YOLOv5 does)."""
    return max(1, int(round(blocks * multiplier)))


@keras.saving.register_keras_serializable(package="effdet_tf")
class CSPDarknet53(keras.Model):
    """CSPDarknet53 feature extractor returning {"P3", "P4", "P5"}.

    Args:
        width_multiplier: float, scales every conv's channels (1.0 = YOLOv4).
        depth_multiplier: float, scales the residual block count per stage
            (minimum 1 block per stage).
        image_shape: input shape without batch, default (None, None, 3).
            Inputs are float RGB in [0, 1].

    Outputs: dict with "P3" (stride 8, 256 * w channels), "P4" (stride 16,
    512 * w) and "P5" (stride 32, 1024 * w).
    """

    def __init__(
        self,
        width_multiplier=1.0,
        depth_multiplier=1.0,
        image_shape=(None, None, 3),
        **kwargs,
    ):
        dtype = kwargs.get("dtype")

        def w(c):
            return scale_width(c, width_multiplier)

        # === Layers ===
        # Built in Darknet's cfg order; `names` records that order.
        names = []

        def conv(name, filters, kernel_size, strides=1):
            names.append(name)
            return ConvBNMish(
                filters, kernel_size, strides=strides, dtype=dtype, name=name
            )

        stem = conv("stem", w(STEM_FILTERS), 3)
        stages = []
        for s, (out, depth) in enumerate(zip(STAGE_FILTERS, STAGE_DEPTHS), 1):
            # YOLOv4's first stage does not halve its partial channels.
            part = w(out) if s == 1 else w(out // 2)
            inner = w(out // 2) if s == 1 else part
            stage = {
                "down": conv(f"stage{s}_down", w(out), 3, strides=2),
                "part2": conv(f"stage{s}_part2", part, 1),
                "part1": conv(f"stage{s}_part1", part, 1),
                "blocks": [],
            }
            for b in range(scale_depth(depth, depth_multiplier)):
                stage["blocks"].append(
                    (
                        conv(f"stage{s}_block{b}_conv1", inner, 1),
                        conv(f"stage{s}_block{b}_conv2", part, 3),
                    )
                )
            stage["post"] = conv(f"stage{s}_post", part, 1)
            stage["transition"] = conv(f"stage{s}_transition", w(out), 1)
            stages.append(stage)

        # === Functional Model ===
        inputs = keras.Input(shape=image_shape, name="images")
        x = stem(inputs)
        outputs = {}
        for s, stage in enumerate(stages, 1):
            x = stage["down"](x)
            shortcut = stage["part2"](x)
            x = stage["part1"](x)
            for b, (conv1, conv2) in enumerate(stage["blocks"]):
                x = keras.layers.Add(
                    dtype=dtype, name=f"stage{s}_block{b}_add"
                )([x, conv2(conv1(x))])
            x = stage["post"](x)
            x = keras.layers.Concatenate(dtype=dtype, name=f"stage{s}_concat")(
                [x, shortcut]
            )
            x = stage["transition"](x)
            if s in PYRAMID_LEVELS:
                outputs[PYRAMID_LEVELS[s]] = x
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

        # === Config ===
        self.width_multiplier = width_multiplier
        self.depth_multiplier = depth_multiplier
        self.image_shape = tuple(image_shape)
        self.darknet_layer_names = tuple(names)

    def darknet_layers(self):
        """The 72 (at depth 1.0) ConvBNMish layers in Darknet's file order."""
        return [self.get_layer(n) for n in self.darknet_layer_names]

    @property
    def pyramid_channels(self):
        return {k: v.shape[-1] for k, v in self.output.items()}

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "dtype": keras.saving.serialize_keras_object(self.dtype_policy),
            "width_multiplier": self.width_multiplier,
            "depth_multiplier": self.depth_multiplier,
            "image_shape": self.image_shape,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config.get("dtype"), dict):
            config["dtype"] = keras.saving.deserialize_keras_object(
                config["dtype"]
            )
        return cls(**config)


def num_darknet_convs(depth_multiplier=1.0):
    """How many convs the backbone has (72 at depth 1.0)."""
    return 1 + sum(5 + 2 * scale_depth(d, depth_multiplier) for d in STAGE_DEPTHS)
