"""EfficientDet's BiFPN neck (Tan, Pang, Le 2020, "EfficientDet", sec. 3).

The node graph follows google/automl efficientdet/keras/fpn_configs.py
(`bifpn_config`) and the resampling/fusion rules of
efficientdet/keras/efficientdet_keras.py (`FNode`, `ResampleFeatureMap`,
`OpAfterCombine`). For levels P3..P7, one repeat is:

    top-down   P6' = node(P6, up(P7))      P5' = node(P5, up(P6'))
               P4' = node(P4, up(P5'))     P3" = node(P3, up(P4'))
    bottom-up  P4" = node(P4, P4', down(P3"))
               P5" = node(P5, P5', down(P4"))
               P6" = node(P6, P6', down(P5"))
               P7" = node(P7, down(P6"))

node(...) = BN(SeparableConv3x3(swish(fast_normalised_fusion(...)))).
up = nearest x2, down = 3x3 stride-2 max pool ("same"). An input edge whose
channels differ from the neck's (the backbone's P3..P5 in the first repeat)
gets its own 1x1 conv + BN, per edge, as automl does. Levels above the
backbone's (P6, P7) come from the highest backbone level: 1x1 conv + BN
when its channels differ, then a stride-2 max pool; P7 is a max pool of P6.

Any input size works: after an up/down-sample the map is cropped or
edge-padded to the size of the level it joins (a no-op when the input size
divides by 2**max_level, e.g. 512).
"""

import keras

from effdet_tf.modeling.layers import (
    EFFDET_BN_EPSILON,
    EFFDET_BN_MOMENTUM,
    FusedBatchNormalization,
    SeparableConvBN,
    WeightedFusion,
)


def bifpn_nodes(min_level, max_level):
    """The BiFPN node list: [(level, [(source_level, source_index), ...])].

    A feature is identified by (level, index): index 0 is the neck's input at
    that level, 1 the first node built at that level, and so on. Same graph
    as automl's `bifpn_config`, expressed per level instead of by global id.
    """
    count = {lvl: 1 for lvl in range(min_level, max_level + 1)}
    nodes = []
    for lvl in range(max_level - 1, min_level - 1, -1):  # top-down
        nodes.append((lvl, [(lvl, count[lvl] - 1), (lvl + 1, count[lvl + 1] - 1)]))
        count[lvl] += 1
    for lvl in range(min_level + 1, max_level + 1):  # bottom-up
        inputs = [(lvl, i) for i in range(count[lvl])]
        nodes.append((lvl, inputs + [(lvl - 1, count[lvl - 1] - 1)]))
        count[lvl] += 1
    return nodes


def _match_size(x, target):
    """Crop or edge-pad `x` to `target`'s height and width.

    Only odd sizes need it: the backbone halves by floor, the max pool by
    ceil, so an upsampled map can be one row short and a pooled one a row
    long. With static, equal sizes (e.g. 512 inputs) it is a no-op.
    """
    xs, ts = tuple(x.shape[1:3]), tuple(target.shape[1:3])
    if None not in xs and None not in ts and xs == ts:
        return x
    t, s = keras.ops.shape(target), keras.ops.shape(x)
    pad_h = keras.ops.maximum(t[1] - s[1], 0)
    pad_w = keras.ops.maximum(t[2] - s[2], 0)
    # "symmetric" repeats the edge row/column: what a nearest resize does.
    x = keras.ops.pad(
        x, [[0, 0], [0, pad_h], [0, pad_w], [0, 0]], mode="symmetric"
    )
    return x[:, : t[1], : t[2], :]


@keras.saving.register_keras_serializable(package="effdet_tf")
class BiFPN(keras.layers.Layer):
    """BiFPN neck: {"P3", "P4", "P5"} -> {"P3", ..., "P7"}, all `num_channels`.

    Args:
        num_channels: neck width (64 for D0).
        num_repeats: number of stacked BiFPN cells (3 for D0).
        min_level, max_level: output levels (3 and 7).
        fusion_epsilon: epsilon of the fast normalised fusion (1e-4).
        bn_momentum, bn_epsilon: BatchNorm settings.

    Called on a dict of backbone features keyed "P<level>"; levels in
    [min_level, max_level] missing above the highest given one are created.
    """

    def __init__(
        self,
        num_channels=64,
        num_repeats=3,
        min_level=3,
        max_level=7,
        fusion_epsilon=1e-4,
        bn_momentum=EFFDET_BN_MOMENTUM,
        bn_epsilon=EFFDET_BN_EPSILON,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_channels = num_channels
        self.num_repeats = num_repeats
        self.min_level = min_level
        self.max_level = max_level
        self.fusion_epsilon = fusion_epsilon
        self.bn_momentum = bn_momentum
        self.bn_epsilon = bn_epsilon
        self.nodes = bifpn_nodes(min_level, max_level)
        self.levels = list(range(min_level, max_level + 1))
        self.pool = keras.layers.MaxPooling2D(
            3, strides=2, padding="same", dtype=self.dtype_policy, name="pool"
        )
        self.upsample = keras.layers.UpSampling2D(
            2, interpolation="nearest", dtype=self.dtype_policy, name="upsample"
        )

    def _conv_bn(self, name):
        conv = keras.layers.Conv2D(
            self.num_channels, 1, use_bias=False, dtype=self.dtype_policy,
            name=f"{name}_conv",
        )
        bn = FusedBatchNormalization(
            momentum=self.bn_momentum, epsilon=self.bn_epsilon,
            dtype=self.dtype_policy, name=f"{name}_bn",
        )
        return conv, bn

    def build(self, input_shape):
        given = sorted(int(k[1:]) for k in input_shape)
        self.input_levels = [l for l in self.levels if l in given]
        if not self.input_levels or self.input_levels[0] != self.min_level:
            raise ValueError(
                f"BiFPN needs P{self.min_level} among its inputs, got {sorted(input_shape)}"
            )
        top = self.input_levels[-1]
        channels = {l: input_shape[f"P{l}"][-1] for l in self.input_levels}
        c = self.num_channels

        # === Layers ===
        # Extra levels above the backbone: 1x1 conv + BN only if needed.
        self.extra_resample = {}
        for lvl in range(top + 1, self.max_level + 1):
            src = channels[lvl - 1]
            if src != c:
                conv, bn = self._conv_bn(f"P{lvl}_resample")
                conv.build((None, None, None, src))
                bn.build((None, None, None, c))
                self.extra_resample[lvl] = (conv, bn)
            channels[lvl] = c

        # Per cell and node: per-edge 1x1 resamples (only where channels
        # differ), the fusion weights, and the post-fusion separable conv.
        self.cells = []
        for r in range(self.num_repeats):
            cell = []
            for n, (lvl, inputs) in enumerate(self.nodes):
                kind = "td" if n < len(self.levels) - 1 else "bu"
                name = f"cell{r}_{kind}_P{lvl}"
                resample = {}
                for e, (src_lvl, idx) in enumerate(inputs):
                    src_c = channels[src_lvl] if idx == 0 else c
                    if src_c != c:
                        conv, bn = self._conv_bn(f"{name}_in{e}_resample")
                        conv.build((None, None, None, src_c))
                        bn.build((None, None, None, c))
                        resample[e] = (conv, bn)
                fusion = WeightedFusion(
                    self.fusion_epsilon, dtype=self.dtype_policy,
                    name=f"{name}_fusion",
                )
                fusion.build([(None, None, None, c)] * len(inputs))
                post = SeparableConvBN(
                    c, 3, pre_activation="swish", bn_momentum=self.bn_momentum,
                    bn_epsilon=self.bn_epsilon, dtype=self.dtype_policy,
                    name=f"{name}_conv",
                )
                post.build((None, None, None, c))
                cell.append((resample, fusion, post))
            # From the second cell on, every input is already `c` wide.
            channels = {l: c for l in self.levels}
            self.cells.append(cell)
        self.built = True

    def call(self, inputs, training=None):
        top = self.input_levels[-1]
        feats = {l: inputs[f"P{l}"] for l in self.input_levels}
        for lvl in range(top + 1, self.max_level + 1):
            x = feats[lvl - 1]
            if lvl in self.extra_resample:
                conv, bn = self.extra_resample[lvl]
                x = bn(conv(x), training=training)
            feats[lvl] = self.pool(x)

        for cell in self.cells:
            # feats per level: [cell input, node 1, node 2, ...]
            level_feats = {l: [feats[l]] for l in self.levels}
            for (lvl, edges), (resample, fusion, post) in zip(self.nodes, cell):
                target = level_feats[lvl][0]
                parts = []
                for e, (src_lvl, idx) in enumerate(edges):
                    x = level_feats[src_lvl][idx]
                    if e in resample:
                        conv, bn = resample[e]
                        x = bn(conv(x), training=training)
                    if src_lvl > lvl:
                        x = _match_size(self.upsample(x), target)
                    elif src_lvl < lvl:
                        x = _match_size(self.pool(x), target)
                    parts.append(x)
                level_feats[lvl].append(post(fusion(parts), training=training))
            feats = {l: level_feats[l][-1] for l in self.levels}
        return {f"P{l}": feats[l] for l in self.levels}

    def compute_output_shape(self, input_shape):
        out, hw = {}, None
        batch = input_shape[f"P{self.min_level}"][0]
        for lvl in self.levels:
            given = input_shape.get(f"P{lvl}")
            if given is not None:
                hw = list(given[1:3])
            else:  # made by a "same" stride-2 max pool: ceil(size / 2)
                hw = [None if d is None else -(-d // 2) for d in hw]
            out[f"P{lvl}"] = (batch, hw[0], hw[1], self.num_channels)
        return out

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_channels": self.num_channels,
                "num_repeats": self.num_repeats,
                "min_level": self.min_level,
                "max_level": self.max_level,
                "fusion_epsilon": self.fusion_epsilon,
                "bn_momentum": self.bn_momentum,
                "bn_epsilon": self.bn_epsilon,
            }
        )
        return config
