"""Multi-level anchors in EfficientDet's layout.

The layout follows google/automl `efficientdet/anchors.py`
(`_generate_anchor_configs` / `Anchors._generate_boxes`): on level l the
stride is image_size / feature_size (2^l when the size divides evenly), the
anchor centres sit at (i + 0.5) * stride, the base size is
anchor_scale * stride * 2^(octave / num_scales), and an aspect ratio r
(width / height) gives w = base * sqrt(r), h = base / sqrt(r).

Order of `Anchors.boxes` (the heads reshape [B, H, W, A*K] -> [B, H*W*A, K]
and concatenate levels, so this must match): level min..max, then row (y),
then column (x), then the A = num_scales * len(aspect_ratios) anchors of a
location, scale-major then ratio.
"""

import math

import keras
import numpy as np
import tensorflow as tf


def _feature_size(size, level):
    """Feature-map side on `level`: ceil-halving `level` times.

    Matches stride-2 convs with 'same'-like padding and the max-pool used for
    P6/P7, so small test images (e.g. 64 px, where P7 is 1x1) still line up.
    """
    for _ in range(level):
        size = (size + 1) // 2
    return size


@keras.saving.register_keras_serializable(package="effdet_tf")
class Anchors:
    """Anchor boxes for all pyramid levels of one (square or not) input size.

    Args:
      image_size: int (square) or (height, width) of the model input, pixels.
      min_level, max_level: pyramid levels (stride 2^level).
      num_scales: octave scales per level: 2^(i / num_scales), i < num_scales.
      aspect_ratios: width / height ratios.
      anchor_scale: base anchor size in units of the level's stride.

    Attributes:
      boxes: tf.float32 [N, 4] yxyx pixels (N = 49104 at 512 with defaults).
      num_anchors_per_location: A (9 with defaults).
      level_sizes: list of (height, width) feature sizes, min..max level.
    """

    def __init__(
        self,
        image_size,
        min_level=3,
        max_level=7,
        num_scales=3,
        aspect_ratios=(1.0, 2.0, 0.5),
        anchor_scale=4.0,
    ):
        if isinstance(image_size, (int, np.integer)):
            image_size = (int(image_size), int(image_size))
        image_size = tuple(int(s) for s in image_size)
        if len(image_size) != 2 or min(image_size) <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if min_level > max_level:
            raise ValueError(
                f"min_level {min_level} > max_level {max_level}"
            )
        self.image_size = image_size
        self.min_level = int(min_level)
        self.max_level = int(max_level)
        self.num_scales = int(num_scales)
        self.aspect_ratios = tuple(float(r) for r in aspect_ratios)
        self.anchor_scale = float(anchor_scale)
        self.num_anchors_per_location = self.num_scales * len(
            self.aspect_ratios
        )
        self.level_sizes = [
            (_feature_size(image_size[0], level),
             _feature_size(image_size[1], level))
            for level in range(self.min_level, self.max_level + 1)
        ]
        self._boxes = self._generate()

    def _generate(self):
        """numpy [N, 4] yxyx; computed once at construction (static)."""
        # [A, 2] (half height, half width) per unit stride; scale-major.
        half_sizes = []
        for octave in range(self.num_scales):
            base = self.anchor_scale * 2.0 ** (octave / self.num_scales)
            for ratio in self.aspect_ratios:
                half_sizes.append(
                    (base / math.sqrt(ratio) / 2.0,
                     base * math.sqrt(ratio) / 2.0)
                )
        half_sizes = np.array(half_sizes, np.float64)
        levels = []
        for feat_h, feat_w in self.level_sizes:
            stride_y = self.image_size[0] / feat_h
            stride_x = self.image_size[1] / feat_w
            cy = (np.arange(feat_h) + 0.5) * stride_y
            cx = (np.arange(feat_w) + 0.5) * stride_x
            cy, cx = np.meshgrid(cy, cx, indexing="ij")  # [H, W]
            cy = cy[:, :, None]
            cx = cx[:, :, None]
            hh = half_sizes[None, None, :, 0] * stride_y  # [1, 1, A]
            hw = half_sizes[None, None, :, 1] * stride_x
            boxes = np.stack([cy - hh, cx - hw, cy + hh, cx + hw], axis=-1)
            levels.append(boxes.reshape(-1, 4))
        return np.concatenate(levels, axis=0).astype(np.float32)

    @property
    def boxes(self):
        """tf.float32 [N, 4] yxyx pixels (a constant in any graph)."""
        return tf.constant(self._boxes)

    def numpy(self):
        """The same boxes as a numpy array (no TF op)."""
        return self._boxes.copy()

    @property
    def num_anchors(self):
        return int(self._boxes.shape[0])

    @property
    def level_num_anchors(self):
        """Anchors per level, min..max: H * W * A."""
        a = self.num_anchors_per_location
        return [h * w * a for h, w in self.level_sizes]

    def get_config(self):
        return {
            "image_size": list(self.image_size),
            "min_level": self.min_level,
            "max_level": self.max_level,
            "num_scales": self.num_scales,
            "aspect_ratios": list(self.aspect_ratios),
            "anchor_scale": self.anchor_scale,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)
