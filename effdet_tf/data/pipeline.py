"""TFRecord files -> training / evaluation batches; multi-dataset steps.

Train, per dataset (every stage a parallel `map` unless noted):

  this worker's shards, or its records of each (interleaved) -> [cache]
  -> repeat -> shuffle (serialized records)
  -> decode (JPEG DCT-scaled when the image is >= 2x what is needed)
  -> random_resize: letterbox + scale/translate/flip in one resample,
     uint8 S x S                           (per image, augment.py)
  -> padded group of G -> Mosaic, MixUp    (per group, augment.py, keras-cv)
  -> unbatch -> shuffle(4 G) -> anchor targets (model's label encoder)
  -> batch B -> HSV colour jitter fused with the float32 cast -> prefetch

Everything after decode works on S x S images, so Mosaic/MixUp run on small
dense tensors (no ragged images) and the letterbox resize is the only
resample. Per-element stateless seeds (from `tf.data.Dataset.random`) drive
every random draw: with `seed` set, two runs give the same batches.

Eval: full-size decode -> letterbox -> batch, keeping image_id, `scale` =
S / max(h, w) and the original size, so that original-pixel = model-pixel
/ scale. No DCT-scaled decode and no augmentation: evaluation sees the
pixels the SavedModel computes for the same file (data/preprocess.py), so
the mAP it reports is the served model's.
"""

import math
import random

import tensorflow as tf

from effdet_tf.data import augment as augment_lib
from effdet_tf.data import decoder
# The one letterbox (evaluation, predict, export; training's random_resize
# with no augmentation); also the input pipeline benchmark's floor.
from effdet_tf.data.preprocess import letterbox
from effdet_tf.ops.label_encoder import LabelEncoder

AUTOTUNE = tf.data.AUTOTUNE

# Images per group shared by Mosaic/MixUp (partners are drawn within it).
DEFAULT_GROUP_SIZE = 8

# cache="auto" keeps decoded images in memory when the shards total at most
# this many bytes. JPEG stores COCO-like photos at roughly 1/10 of their
# uint8 size, so 32 MiB of records is ~300 MiB of decoded images; decoding
# is ~1/4 of the train pipeline's CPU cost on 640 px photos, and a small
# dataset is read many times over.
AUTO_CACHE_MAX_BYTES = 32 << 20


def _file_list(file_pattern):
    patterns = [file_pattern] if isinstance(file_pattern, str) else list(file_pattern)
    files = sorted({f for p in patterns for f in tf.io.gfile.glob(p)})
    if not files:
        raise ValueError(f"No TFRecord files match {file_pattern!r}")
    return files


def _total_bytes(file_pattern):
    return sum(tf.io.gfile.stat(f).length for f in _file_list(file_pattern))


def _records(file_pattern, shuffle, seed, shard=None):
    """Serialized records; with `shard` = (count, index), only this input
    pipeline's share: whole files when there are at least `count` of them
    (each worker reads only its files), else every count-th record of each
    file, dropped right after reading so that no other worker's record is
    decoded. Either way the shares are disjoint and cover every record,
    whatever order each worker's seed shuffles its files in."""
    count, index = shard or (1, 0)
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} is not in [0, {count})")
    files = _file_list(file_pattern)
    if len(files) >= count:
        files, read = files[index::count], tf.data.TFRecordDataset
    else:
        read = lambda f: tf.data.TFRecordDataset(f).shard(count, index)
    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    if len(files) == 1:
        return ds.flat_map(read)
    return ds.interleave(
        read,
        cycle_length=min(len(files), 16),
        num_parallel_calls=AUTOTUNE,
        deterministic=True,
    )


# Box counts the XLA-compiled label encoder is padded to: 0, powers of 2
# and 1.5x powers of 2, so padding wastes < 50% and few programs are
# compiled. Crowd regions get their own list and coarser buckets: 0 for
# almost every image, which skips the crowd pass; one program is compiled
# per (objects, crowd) pair, so fine crowd buckets would multiply them
# (the real samples gave 21 pairs in 1,000 batches, the last at batch 797).
_BOX_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192,
                256, 384, 512, 768, 1024)
_CROWD_BUCKETS = (0, 4, 16, 64, 256, 1024)


def _bucket_table(buckets):
    """The bucket of every count up to the largest (one gather per call)."""
    return tf.constant(
        [min(b for b in buckets if b >= n) for n in range(buckets[-1] + 1)],
        tf.int32,
    )


_BUCKET_OF = _bucket_table(_BOX_BUCKETS)
_CROWD_BUCKET_OF = _bucket_table(_CROWD_BUCKETS)


def _pad_to_bucket(tensor, constant_values=0, table=_BUCKET_OF):
    """Pads axis 0 of `tensor` to its count's bucket in `table` (counts
    beyond the table are kept)."""
    count = tf.shape(tensor)[0]
    largest = table.shape[0] - 1
    bucket = tf.maximum(tf.gather(table, tf.minimum(count, largest)), count)
    paddings = [[0, bucket - count]] + [[0, 0]] * (len(tensor.shape) - 1)
    return tf.pad(tensor, paddings, constant_values=constant_values)


class _TargetEncoder:
    """Calls the label encoder on one image's real boxes (padding removed).

    With `jit`, the call is XLA-compiled (`jit_compile=True`): the encoder
    is a few dozen elementwise ops over ~49k anchors x M boxes, which XLA
    fuses (2-3x less CPU). XLA compiles per shape, so the boxes are padded
    (class -1 rows, which the encoder drops) to the next of
    `_BOX_BUCKETS`: the cost grows with M, so the buckets are fine-grained.
    A `LabelEncoder` gets the crowd boxes as a separate list
    (`encode_split`), usually empty; any other callable gets
    (boxes, classes, is_crowd).

    The TF ops around the compiled call run once per image, each with a
    fixed overhead, so they are few: the objects' boxes and classes are
    gathered and padded as one [M, 5] tensor.
    """

    def __init__(self, label_encoder, jit):
        self.label_encoder = label_encoder
        self.jit = jit
        self.split = isinstance(label_encoder, LabelEncoder)
        if jit and self.split:
            # Shared by every pipeline using this encoder.
            self._call = label_encoder.compiled_split()
        elif jit:
            self._call = tf.function(
                lambda b, c, k: label_encoder(b, c, k), jit_compile=True
            )

    def __call__(self, boxes, classes, is_crowd):
        keep = classes >= 0
        if self.jit and self.split:
            # Rows of objects: [ymin, xmin, ymax, xmax, class]; padding
            # rows are all -1 (no area, no class).
            objects = tf.where(keep & tf.logical_not(is_crowd))[:, 0]
            rows = tf.concat([boxes, tf.cast(classes, tf.float32)[:, None]], 1)
            rows = _pad_to_bucket(tf.gather(rows, objects), -1.0)
            # Split here: slicing inside the compiled program made XLA's
            # fusions 2x slower at 16 boxes (measured).
            return self._call(
                rows[:, :4],
                tf.cast(rows[:, 4], tf.int32),
                _pad_to_bucket(
                    tf.boolean_mask(boxes, keep & is_crowd),
                    table=_CROWD_BUCKET_OF,
                ),
            )
        boxes = tf.boolean_mask(boxes, keep)
        classes = tf.boolean_mask(classes, keep)
        is_crowd = tf.boolean_mask(is_crowd, keep)
        if not self.jit:
            return self.label_encoder(boxes, classes, is_crowd)
        return self._call(
            _pad_to_bucket(boxes),
            _pad_to_bucket(classes, -1),
            _pad_to_bucket(is_crowd),
        )


def train_dataset(
    file_pattern,
    batch_size,
    image_size,
    label_encoder,
    augment=None,
    *,
    group_size=DEFAULT_GROUP_SIZE,
    shuffle_buffer=1024,
    cache="auto",
    seed=None,
    jit_label_encoder=True,
    shard=None,
):
    """Infinite training batches of one dataset.

    Args:
      file_pattern: glob (or list of globs) of TFRecord shards.
      batch_size: images per batch (of this dataset).
      image_size: S, square model input.
      label_encoder: callable (boxes [M, 4] yxyx px, classes int32 [M],
        is_crowd bool [M]) -> dict of per-anchor targets, e.g.
        `ops.label_encoder.LabelEncoder(model.anchors)`.
      augment: `config.AugmentConfig` (the --mosaic_prob ... flags); None = defaults,
        `AugmentConfig.none()` = letterbox only.
      group_size: images per Mosaic/MixUp group (>= 2).
      shuffle_buffer: records in the shuffle buffer.
      cache: keep decoded images in memory after the first pass (only for
        datasets that fit: uint8 images as decoded); "auto" = when the
        shards total at most `AUTO_CACHE_MAX_BYTES`.
      seed: int for a reproducible pipeline, None for a random one.
      jit_label_encoder: XLA-compile the label encoder call.
      shard: (count, index): read only this input pipeline's share of the
        records (one of `count` workers); None = all of them.

    Returns:
      tf.data.Dataset of (images float32 [B, S, S, 3] in 0..255, targets
      dict from the label encoder, batched: {"cls_targets": [B, N],
      "box_targets": [B, N, 4]}), repeating forever.
    """
    config = augment if augment is not None else augment_lib.AugmentConfig()
    if config.uses_groups and group_size < 2:
        raise ValueError(f"group_size must be >= 2 for Mosaic/MixUp, got {group_size}")
    deterministic = seed is not None
    if seed is None:
        seed = random.randrange(2**31)
    parallel = {"num_parallel_calls": AUTOTUNE, "deterministic": deterministic}
    # Every stage below maps a dict to a dict; "seed" (int64 [2], stateless)
    # is drawn once per image and rides along until the batch is made.
    ds = _decoded_records(file_pattern, image_size, config, shuffle_buffer, cache, seed, shard, parallel)
    ds = tf.data.Dataset.zip((ds, tf.data.Dataset.random(seed=seed).batch(2))).map(
        lambda example, s: {**augment_lib.random_resize(example, image_size, s, config), "seed": s}, **parallel)
    if config.uses_groups:
        ds = _group_stage(ds, augment_lib.GroupAugment(image_size, config), group_size, seed, parallel)
    encoder = _TargetEncoder(label_encoder, jit_label_encoder)
    ds = ds.map(lambda ex: {"image": ex["image"], "targets": encoder(ex["boxes"], ex["classes"], ex["is_crowd"]),
                            "seed": ex["seed"]}, **parallel)
    ds = ds.batch(batch_size, drop_remainder=True)
    # Colour jitter + float32 cast of the whole batch in one pass, seeded
    # by the batch's first element (folded: it also seeded that element).
    # Keras's fit takes (inputs, targets).
    # Then the blur (off by default), seeded by another fold of that seed.
    fold = tf.random.experimental.stateless_fold_in
    ds = ds.map(lambda batch: (
        augment_lib.gaussian_blur(
            augment_lib.colour_jitter(batch["image"], fold(batch["seed"][0], 2), config),
            fold(batch["seed"][0], 3), config),
        batch["targets"]), **parallel)
    return ds.prefetch(AUTOTUNE)


def _decoded_records(file_pattern, image_size, config, shuffle_buffer, cache, seed, shard, parallel):
    """This pipeline's share of the records, shuffled, repeated and
    decoded (cached after decoding when `cache`; "auto": when the share of
    the shards is at most AUTO_CACHE_MAX_BYTES)."""
    # Zooming in by scale_max needs that many source pixels per output pixel.
    min_size = int(math.ceil(image_size * max(1.0, config.scale_max)))
    decode = lambda record: decoder.decode_example(record, min_size=min_size)
    ds = _records(file_pattern, shuffle=True, seed=seed, shard=shard)
    if cache == "auto":
        share = shard[0] if shard else 1
        cache = _total_bytes(file_pattern) / share <= AUTO_CACHE_MAX_BYTES
    if cache:
        ds = ds.map(decode, num_parallel_calls=AUTOTUNE).cache()
    ds = ds.repeat().shuffle(shuffle_buffer, seed=seed)
    if not cache:
        ds = ds.map(decode, **parallel)
    return ds


def _group_stage(ds, group_augment, group_size, seed, parallel):
    """Mosaic and MixUp over groups of `group_size` consecutive images,
    each group seeded by its first image's seed (folded, so it differs from
    what that image's random_resize drew); groups are mixed again after."""
    padding = {"image": tf.constant(0, tf.uint8), "boxes": 0.0, "classes": -1, "is_crowd": False,
               "seed": tf.constant(0, tf.int64)}
    ds = ds.padded_batch(group_size, padding_values=padding, drop_remainder=True)

    def augment_group(group):
        images = {k: v for k, v in group.items() if k != "seed"}
        augmented = group_augment(images, tf.random.experimental.stateless_fold_in(group["seed"][0], 1))
        return {**augmented, "seed": group["seed"]}

    ds = ds.map(augment_group, **parallel).unbatch()
    # Mosaic is drawn per group: mix groups before batching.
    return ds.shuffle(4 * group_size, seed=seed)


def eval_dataset(file_pattern, batch_size, image_size):
    """Evaluation batches, in file order, one pass, no augmentation.

    Returns:
      tf.data.Dataset of {"images": float32 [B, S, S, 3] 0..255 letterboxed,
      "image_id": int64 [B] COCO image id, "scale": float32 [B] (model px =
      original px * scale), "original_size": int32 [B, 2] (height, width)}.
      The last batch may be smaller.
    """

    def prepare(record):
        # Full-size decode (min_size=None), as the `*_bytes` signatures do.
        example = decoder.decode_example(record)
        original = tf.stack([example["height"], example["width"]])
        images, scale = letterbox(example["image"], image_size)
        return {
            "images": images,
            "image_id": example["image_id"],
            "scale": scale,
            "original_size": original,
        }

    ds = tf.data.TFRecordDataset(_file_list(file_pattern))
    ds = ds.map(prepare, num_parallel_calls=AUTOTUNE)
    return ds.batch(batch_size).prefetch(AUTOTUNE)


def multi_dataset(datasets):
    """One step = one batch of every dataset.

    Args:
      datasets: {name: train_dataset(...)}; each repeats forever on its own
        (different sizes and batch sizes are fine), so an epoch is whatever
        number of steps the trainer asks for (`steps_per_epoch`).

    Returns:
      tf.data.Dataset of ({name: images [B_name, S, S, 3]},
      {name: targets dict}), in the dict's order.
    """
    names = list(datasets)
    if not names:
        raise ValueError("multi_dataset needs at least one dataset")
    zipped = tf.data.Dataset.zip({name: datasets[name] for name in names})
    return zipped.map(
        lambda batch: (
            {name: batch[name][0] for name in names},
            {name: batch[name][1] for name in names},
        )
    ).prefetch(AUTOTUNE)
