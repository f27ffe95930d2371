"""YOLOv4-style training augmentation (the package's only keras_cv import).

Three stages, all pure functions of their inputs and a stateless seed, so
they give the same result eagerly and inside `tf.data.Dataset.map`, and a
seeded pipeline is reproducible:

1. `random_resize` (per image): random scale, translation and horizontal
   flip, fused with the letterbox resize to the S x S input (the one
   resample of the pipeline; the geometry costs only a crop/pad copy).
   With `AugmentConfig.none()` it is exactly the letterbox of
   preprocess.letterbox (longer side = S, top-left, zero pad).
2. `GroupAugment` (per group of G letterboxed S x S images): keras-cv's
   `Mosaic` (Bochkovskiy et al. 2020, YOLOv4), CutMix (Yun et al. 2019,
   our own: keras-cv's CutMix moves no boxes) and keras-cv's `MixUp`
   (Zhang et al. 2018; boxes kept at full weight for detection, as in
   Zhang et al. 2019 "Bag of Freebies" and YOLOv5).
3. `colour_jitter` (per final batch; in colour.py): colour jitter in the HSV
   sense as one 3x3 colour matrix per image, fused by XLA with the uint8 ->
   float32 cast; then `gaussian_blur` (off by default), per image.

Images stay uint8 from the resize to the batch: every copy in between
(shuffle, grouping, Mosaic's tiling, batching) moves 4x fewer bytes than
float32.

Why keras-cv's layers are driven through their hooks instead of `__call__`:
their own random draws are stateful (`tf.random.Generator`, unseeded
`tf.random.gamma`), so they can be neither reproduced nor made per-element
with a probability. We draw the transformation statelessly and hand it to
`Mosaic.augment_images` / `augment_bounding_boxes` (the documented override
points of keras-cv's vectorized layers) and to MixUp's box rule. keras-cv is
pinned at 0.9.0, its final release. The layers are built with
dtype="float32": under a mixed_float16 global policy they would otherwise
compute images and boxes in float16 without a word.

keras-cv carries only "boxes" and "classes" through its layers, so crowd
flags ride inside the class: class + CROWD_OFFSET for a crowd box, decoded
back on the way out (`to_keras_cv` / `from_keras_cv`).
"""

import keras_cv
import tensorflow as tf

from effdet_tf import compat
from effdet_tf.config import AugmentConfig  # noqa: F401 - the settings these stages read, declared once there
from effdet_tf.data.colour import colour_jitter, gaussian_blur  # noqa: F401 - one import point for the stages
from effdet_tf.data.preprocess import pad_to_canvas, resize_bilinear  # the letterbox's own resample and pad
from effdet_tf.ops import boxes as box_ops

# Crowd boxes travel through keras-cv as class + CROWD_OFFSET. keras-cv
# keeps classes in float32, exact for integers below 2**24.
CROWD_OFFSET = 1 << 20


def to_keras_cv(classes, is_crowd):
    """int classes [..., M] (-1 padding) + bool is_crowd -> keras-cv float."""
    classes = tf.cast(classes, tf.int32)
    encoded = classes + tf.cast(is_crowd, tf.int32) * CROWD_OFFSET
    return tf.cast(tf.where(classes >= 0, encoded, -1), tf.float32)


def from_keras_cv(classes):
    """keras-cv float classes -> (int32 classes with -1 padding, is_crowd)."""
    classes = tf.cast(tf.round(classes), tf.int32)
    valid = classes >= 0
    return (
        tf.where(valid, classes % CROWD_OFFSET, -1),
        valid & (classes >= CROWD_OFFSET),
    )


def _keep_boxes(clipped, area_before, config):
    """YOLOv5 `box_candidates` after a crop: both sides >= min_box_size and
    >= min_box_area_ratio of the area the box had before the crop."""
    height = clipped[..., 2] - clipped[..., 0]
    width = clipped[..., 3] - clipped[..., 1]
    return (
        (height >= config.min_box_size)
        & (width >= config.min_box_size)
        & (box_ops.area(clipped) >= config.min_box_area_ratio * area_before)
    )


@tf.function(jit_compile=True)
def _paste(images, partner, patch):
    """uint8 images with the yxyx integer rectangle patch[g] replaced by the
    same rectangle of images[partner[g]] (CutMix's pixels), one XLA pass."""
    size = images.shape[1]
    steps = tf.range(size, dtype=tf.float32)
    y0, x0, y1, x1 = [patch[:, i, None] for i in range(4)]
    rows = (steps >= y0) & (steps < y1)  # [G, S]
    columns = (steps >= x0) & (steps < x1)
    inside = rows[:, :, None, None] & columns[:, None, :, None]
    return tf.where(inside, tf.gather(images, partner), images)


def _uncovered_box(boxes, patch):
    """The part of each yxyx box [G, M, 4] a rectangle patch [G, 4] leaves
    visible, as a box: a side is trimmed where the patch spans the box's
    whole extent along the other axis and covers that side's edge; a patch
    inside the box (or covering a corner) leaves its bounding box as it
    was. Also returns the uncovered area [G, M]."""
    py0, px0, py1, px1 = [patch[:, None, i] for i in range(4)]
    y0, x0, y1, x1 = tf.unstack(boxes, axis=-1)
    spans_x = (px0 <= x0) & (px1 >= x1)
    spans_y = (py0 <= y0) & (py1 >= y1)
    y0_new = tf.where(spans_x & (py0 <= y0), tf.maximum(y0, py1), y0)
    y1_new = tf.where(spans_x & (py1 >= y1), tf.minimum(y1, py0), y1)
    x0_new = tf.where(spans_y & (px0 <= x0), tf.maximum(x0, px1), x0)
    x1_new = tf.where(spans_y & (px1 >= x1), tf.minimum(x1, px0), x1)
    covered = (
        tf.maximum(tf.minimum(y1, py1) - tf.maximum(y0, py0), 0.0)
        * tf.maximum(tf.minimum(x1, px1) - tf.maximum(x0, px0), 0.0)
    )
    trimmed = tf.stack([y0_new, x0_new, tf.maximum(y1_new, y0_new), tf.maximum(x1_new, x0_new)], axis=-1)
    return trimmed, box_ops.area(boxes) - covered


@tf.function(jit_compile=True)
def _blend(images, partner, weight):
    """uint8 weight * image + (1 - weight) * images[partner], one fused XLA
    pass (as separate TF ops ~8 passes over the group, ~5x the cost)."""
    pixels = tf.cast(images, tf.float32)
    weight = weight[:, None, None, None]
    pixels = weight * pixels + (1.0 - weight) * tf.gather(pixels, partner)
    return tf.cast(tf.clip_by_value(tf.round(pixels), 0.0, 255.0), tf.uint8)


def _mosaic_sources(centers, size):
    """[G, 2] (x, y) mosaic centres -> int32 [G, 2, S] source (y, x) of each
    output row/column in keras-cv's 2S x 2S grid: its crop box (the same
    float32 expressions) sampled as CropAndResize's "nearest" does,
    roundf(lo * (2S - 1) + i * scale). The window spans S + 1 source pixels
    (keras-cv's box is S / (2S - 1) wide): one row/column is skipped."""
    span = float(2 * size - 1)
    centers = tf.reverse(centers, [1]) * float(size)  # (y, x)
    lo = (float(size) - centers) / span
    hi = lo + float(size) / span
    scale = (hi - lo) * span / float(size - 1)
    steps = tf.range(size, dtype=tf.float32)
    pos = lo[..., None] * span + steps * scale[..., None]
    whole = tf.floor(pos)
    # roundf (half away from zero; pos >= 0), not tf.round (half to even).
    return tf.cast(whole, tf.int32) + tf.cast(pos - whole >= 0.5, tf.int32)


@tf.function(jit_compile=True)
def _mosaic_pixels(images, order, centers):
    """keras-cv `Mosaic.augment_images(..., resize_method="nearest")` on a
    uint8 group, as one gather: output pixel (y, x) of image g is pixel
    (y', x') of tile 2 * (y' >= S) + (x' >= S) (keras-cv's layout: top
    row tiles 0, 1; bottom 2, 3), i.e. of image order[g, tile].

    Args:
      images: uint8 [G, S, S, 3].
      order: int32 [G, 4] keras-cv "permutation_order".
      centers: float32 [G, 2] keras-cv "mosaic_centers" (x, y fractions).
    """
    size = images.shape[1]
    source = _mosaic_sources(centers, size)
    bottom = tf.cast(source[:, 0] >= size, tf.int32)  # [G, S] rows
    right = tf.cast(source[:, 1] >= size, tf.int32)  # [G, S] columns
    row = source[:, 0] - size * bottom
    column = source[:, 1] - size * right
    tile = tf.gather(
        order, 2 * bottom[:, :, None] + right[:, None, :], batch_dims=1
    )
    index = (tile * size + row[:, :, None]) * size + column[:, None, :]
    return tf.gather(tf.reshape(images, [-1, 3]), index)


def random_resize(example, image_size, seed, config):
    """Per-image random scale, translation and flip, fused with the letterbox.

    The image is resized once, to its letterbox size times a random zoom,
    then placed on the S x S zero canvas at a random offset (cropped where
    it does not fit) and optionally mirrored. With `AugmentConfig.none()`
    this is exactly the letterbox (longer side S, top-left).

    Args:
      example: dict with "image" uint8 [H, W, 3], "boxes" float32 [M, 4]
        yxyx pixels of that image, "classes" int32 [M], "is_crowd" bool [M]
        (the decoder's output; other keys are dropped).
      image_size: S, the square output size.
      seed: int [2] stateless seed.
      config: AugmentConfig.

    Returns:
      {"image": uint8 [S, S, 3], "boxes": float32 [K, 4] yxyx pixels of the
      output, "classes": int32 [K], "is_crowd": bool [K]}, K <= M (boxes
      cropped away are dropped).
    """
    size = image_size
    shape = tf.shape(example["image"])
    height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    place = _draw_placement(height, width, size, seed, config)
    canvas = _place_image(example["image"], place, size, config)
    # Boxes: the per-axis scale the integer resize really applied.
    scale_y = tf.cast(place["new_h"], tf.float32) / height
    scale_x = tf.cast(place["new_w"], tf.float32) / width
    ymin, xmin, ymax, xmax = tf.unstack(tf.reshape(example["boxes"], [-1, 4]), axis=-1)
    xmin, xmax = tf.cond(place["flip"], lambda: (width - xmax, width - xmin), lambda: (xmin, xmax))
    dy, dx = tf.cast(place["offset_y"], tf.float32), tf.cast(place["offset_x"], tf.float32)
    moved = tf.stack([ymin * scale_y + dy, xmin * scale_x + dx, ymax * scale_y + dy, xmax * scale_x + dx], axis=-1)
    clipped = box_ops.clip(moved, size, size)
    keep = _keep_boxes(clipped, box_ops.area(moved), config)
    return {
        "image": tf.ensure_shape(canvas, [size, size, 3]),
        "boxes": tf.boolean_mask(clipped, keep),
        "classes": tf.boolean_mask(example["classes"], keep),
        "is_crowd": tf.boolean_mask(example["is_crowd"], keep),
    }


def _draw_placement(height, width, size, seed, config):
    """The random zoom, offset and flip of one image: {"new_h", "new_w"
    (its resized size), "offset_y", "offset_x" (where its top-left corner
    lands on the canvas; negative: cropped), "flip"}."""
    u = tf.random.stateless_uniform([4], seed)
    zoom = config.scale_min + (config.scale_max - config.scale_min) * u[0]
    scale = float(size) / tf.maximum(height, width) * zoom
    new_h = tf.maximum(tf.cast(tf.round(height * scale), tf.int32), 1)
    new_w = tf.maximum(tf.cast(tf.round(width * scale), tf.int32), 1)
    # Integer offsets: negative = the resized image is cropped, positive =
    # it sits inside the canvas. translate=0 keeps the top-left letterbox.
    offset_y = tf.cast(tf.round(config.translate * u[1] * tf.cast(size - new_h, tf.float32)), tf.int32)
    offset_x = tf.cast(tf.round(config.translate * u[2] * tf.cast(size - new_w, tf.float32)), tf.int32)
    return {"new_h": new_h, "new_w": new_w, "offset_y": offset_y, "offset_x": offset_x,
            "flip": u[3] < config.flip_prob}


def _place_image(image, place, size, config):
    """The image resized, cropped to what the canvas shows, mirrored and
    padded onto the S x S zero canvas, uint8."""
    # tf.image.resize is ~2x faster than crop_and_resize on CPU; the crop,
    # mirror and pad after it are uint8 copies of the visible part only.
    new_h, new_w, flip = place["new_h"], place["new_w"], place["flip"]
    resized = resize_bilinear(image, new_h, new_w)
    top, left = tf.maximum(-place["offset_y"], 0), tf.maximum(-place["offset_x"], 0)
    paste_y, paste_x = tf.maximum(place["offset_y"], 0), tf.maximum(place["offset_x"], 0)
    visible_h = tf.minimum(new_h - top, size - paste_y)
    visible_w = tf.minimum(new_w - left, size - paste_x)
    # Columns [left, left + w) of the mirrored image are the mirror of
    # columns [new_w - left - w, new_w - left) of the unmirrored one.
    left = tf.where(flip, new_w - left - visible_w, left)
    visible = resized[top : top + visible_h, left : left + visible_w]
    # Bilinear weights are convex: values stay in [0, 255]; +0.5 rounds.
    visible = tf.cast(visible + 0.5, tf.uint8)
    if config.flip_prob > 0.0:
        visible = tf.cond(flip, lambda: tf.reverse(visible, [1]), lambda: visible)
    return pad_to_canvas(visible, paste_y, paste_x, size)


class GroupAugment:
    """Mosaic, CutMix and MixUp, in that order, on a dense group of
    letterboxed images.

    Call with a group dict {"image": uint8 [G, S, S, 3], "boxes": float32
    [G, M, 4] yxyx pixels, "classes": int32 [G, M] (-1 = padding),
    "is_crowd": bool [G, M]} (G static, >= 2) and an int [2] seed; returns
    the same keys, images still uint8, with M' >= M box slots (-1 padding).

    Mosaic: each image of a selected group becomes an S x S window, centred
    at a random point of `mosaic_offset`, of the 2x2 grid of itself and 3
    other images of the group (keras-cv draws the 3 from the whole group,
    itself included; we exclude itself). CutMix: `_cutmix_group`. MixUp:
    with `mixup_prob` per image, lam * image + (1 - lam) * partner,
    lam ~ Beta(alpha, alpha), keeping both box sets (keras-cv's rule).
    """

    def __init__(self, image_size, config):
        self.image_size = int(image_size)
        self.config = config
        self._mosaic = keras_cv.layers.Mosaic(
            offset=tuple(config.mosaic_offset),
            bounding_box_format="yxyx",
            dtype="float32",
        )
        self._mixup = keras_cv.layers.MixUp(
            alpha=config.mixup_alpha, dtype="float32"
        )

    def __call__(self, group, seed):
        seeds = tf.random.experimental.stateless_split(seed, 4)
        size = self.image_size
        images = tf.ensure_shape(group["image"], [None, size, size, 3])
        count = tf.shape(images)[0]
        boxes = tf.reshape(group["boxes"], [count, -1, 4])
        classes = to_keras_cv(group["classes"], group["is_crowd"])

        if self.config.mosaic_prob > 0.0:
            apply = (
                tf.random.stateless_uniform([], seeds[0])
                < self.config.mosaic_prob
            )
            images, boxes, classes = tf.cond(
                apply,
                lambda: self._mosaic_group(images, boxes, classes, seeds[1]),
                lambda: (images, boxes, classes),
            )

        if self.config.cutmix_prob > 0.0:
            # Its own stream, folded in: Mosaic's and MixUp's draws stay
            # those of a run without CutMix.
            cutmix_seed = tf.random.experimental.stateless_fold_in(seed, 4)
            images, boxes, classes = self._cutmix_group(
                images, boxes, classes, cutmix_seed
            )

        if self.config.mixup_prob > 0.0:
            partner = self._partners(count, seeds[2], 1)[:, 0]
            weight, boxes, classes = self._mixup_boxes(
                boxes, classes, partner, seeds[3]
            )
            images = tf.cond(
                tf.reduce_any(weight < 1.0),
                lambda: _blend(images, partner, weight),
                lambda: images,
            )

        classes, is_crowd = from_keras_cv(classes)
        return {
            "image": images,
            "boxes": boxes,
            "classes": classes,
            "is_crowd": is_crowd,
        }

    @staticmethod
    def _partners(count, seed, num):
        """[G, num] indices of other group members (never the image itself)."""
        shift = tf.random.stateless_uniform(
            [count, num], seed, minval=1, maxval=count, dtype=tf.int32
        )
        return (tf.range(count)[:, None] + shift) % count

    def _mosaic_group(self, images, boxes, classes, seed):
        count = tf.shape(images)[0]
        seeds = tf.random.experimental.stateless_split(seed, 2)
        low, high = self.config.mosaic_offset
        transformations = {
            "permutation_order": tf.concat(
                [tf.range(count)[:, None], self._partners(count, seeds[0], 3)],
                axis=1,
            ),
            "mosaic_centers": tf.random.stateless_uniform(
                [count, 2], seeds[1], minval=low, maxval=high
            ),
        }
        # keras-cv's augment_images gathers the 4 images, tiles a 2S x 2S
        # grid and crop_and_resizes an S x S window of it (~3 ms/image on
        # CPU; CropAndResize has no XLA kernel). `_mosaic_pixels` gives the
        # identical pixels (tests compare it with keras-cv's "nearest"
        # output) as one XLA gather straight from the uint8 group.
        out_images = _mosaic_pixels(
            images,
            transformations["permutation_order"],
            transformations["mosaic_centers"],
        )
        out = self._mosaic.augment_bounding_boxes(
            {"boxes": boxes, "classes": classes},
            transformations=transformations,
            images=images,
        )
        # keras-cv lays out the output boxes as gather(boxes, permutation)
        # reshaped to [G, 4M]; the same gather of the areas gives each box's
        # area before the crop, for the YOLOv5 area test (keras-cv itself
        # only drops boxes clipped to zero area).
        before = tf.reshape(
            tf.gather(box_ops.area(boxes), transformations["permutation_order"]),
            [count, -1],
        )
        out_boxes = tf.reshape(out["boxes"], [count, -1, 4])
        keep = _keep_boxes(out_boxes, before, self.config)
        out_classes = tf.where(keep, tf.reshape(out["classes"], [count, -1]), -1.0)
        return out_images, out_boxes, out_classes

    def _cutmix_group(self, images, boxes, classes, seed):
        """CutMix for detection: with `cutmix_prob` per image, a rectangle
        of another group member is pasted at the same place (Yun et al.
        2019: area fraction 1 - lam, lam ~ U(0, 1) = Beta(1, 1), the
        image's aspect, centre uniform, clipped to the image). The
        partner's boxes are clipped to the rectangle and kept by the crop
        rule of the other stages; the image's own boxes are trimmed where
        the rectangle covers a whole side and dropped when less than
        `cutmix_min_visible` of their area stays visible. -> images,
        boxes [G, 2M, 4], classes [G, 2M] (the partner's M slots are
        padding where no CutMix happens)."""
        count = tf.shape(images)[0]
        size = float(self.image_size)
        seeds = tf.random.experimental.stateless_split(seed, 3)
        apply = tf.random.stateless_uniform([count], seeds[0]) < self.config.cutmix_prob
        partner = self._partners(count, seeds[1], 1)[:, 0]
        u = tf.random.stateless_uniform([count, 3], seeds[2])
        half = 0.5 * size * tf.sqrt(u[:, 0])  # side sqrt(1 - lam) * S
        centre = u[:, 1:] * size
        # Whole pixels, so the boxes meet the pasted pixels exactly; an
        # image without CutMix gets an empty rectangle.
        low = tf.clip_by_value(tf.round(centre - half[:, None]), 0.0, size)
        high = tf.clip_by_value(tf.round(centre + half[:, None]), 0.0, size)
        patch = tf.where(apply[:, None], tf.concat([low, high], axis=1), 0.0)

        own, visible = _uncovered_box(boxes, patch)
        sides = tf.minimum(own[..., 2] - own[..., 0], own[..., 3] - own[..., 1])
        keep_own = (
            (classes >= 0)
            & (sides >= self.config.min_box_size)
            & (visible >= self.config.cutmix_min_visible * box_ops.area(boxes))
        )
        theirs = tf.gather(boxes, partner)
        clipped = tf.concat(
            [tf.maximum(theirs[..., :2], patch[:, None, :2]), tf.minimum(theirs[..., 2:], patch[:, None, 2:])],
            axis=-1,
        )
        clipped = tf.concat([clipped[..., :2], tf.maximum(clipped[..., 2:], clipped[..., :2])], axis=-1)
        their_classes = tf.gather(classes, partner)
        keep_theirs = (their_classes >= 0) & apply[:, None] & _keep_boxes(clipped, box_ops.area(theirs), self.config)
        images = tf.cond(tf.reduce_any(apply), lambda: _paste(images, partner, patch), lambda: images)
        return (
            images,
            tf.concat([own, clipped], axis=1),
            tf.concat([tf.where(keep_own, classes, -1.0), tf.where(keep_theirs, their_classes, -1.0)], axis=1),
        )

    def _mixup_boxes(self, boxes, classes, partner, seed):
        """-> (blend weight [G], 1 where not mixed; boxes; classes)."""
        count = tf.shape(classes)[0]
        seeds = tf.random.experimental.stateless_split(seed, 3)
        apply = (
            tf.random.stateless_uniform([count], seeds[0])
            < self.config.mixup_prob
        )
        # Beta(a, a) as a ratio of gammas (what keras-cv MixUp samples,
        # drawn statelessly here).
        alpha = self.config.mixup_alpha
        g1 = tf.random.stateless_gamma([count], seeds[1], alpha=alpha)
        g2 = tf.random.stateless_gamma([count], seeds[2], alpha=alpha)
        weight = tf.where(apply, g1 / (g1 + g2), 1.0)

        def mix():
            # keras-cv MixUp's box rule: [own boxes, partner's boxes], at
            # full weight; the partner's are dropped where no MixUp happens.
            out = compat.mixup_boxes(
                self._mixup, {"boxes": boxes, "classes": classes}, partner
            )
            num = tf.shape(classes)[1]
            theirs = tf.where(apply[:, None], out["classes"][:, num:], -1.0)
            return out["boxes"], tf.concat([classes, theirs], axis=1)

        boxes, classes = tf.cond(
            tf.reduce_any(apply), mix, lambda: (boxes, classes)
        )
        return weight, boxes, classes
