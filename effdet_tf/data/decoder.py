"""tf.Example (TF Object Detection API keys) -> dict of tensors.

The first stage of the input pipeline, in the TF Model Garden split
(decoder -> parser/augmentation -> label encoder): it knows the record
layout and nothing about training. Boxes leave it in the package's one
format, `yxyx` pixels of the returned image (`ops.boxes`).

JPEG images can be decoded at 1/2, 1/4 or 1/8 of their size (libjpeg's DCT
scaling, `decode_jpeg(ratio=...)`) when the caller only needs `min_size`
pixels on the longer side: a 4000 px phone photo resized to a 512 model input
costs a fraction of a full decode, and the DCT scaling doubles as the
anti-aliasing a plain bilinear downscale lacks.
"""

import tensorflow as tf

from effdet_tf.data import preprocess
from effdet_tf.ops import boxes as box_ops

# Only the keys the pipeline uses are parsed (class/text, area and the stored
# height/width are not: the image itself is the authority on its size).
_FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/source_id": tf.io.FixedLenFeature([], tf.string, default_value="-1"),
    "image/object/bbox/ymin": tf.io.VarLenFeature(tf.float32),
    "image/object/bbox/xmin": tf.io.VarLenFeature(tf.float32),
    "image/object/bbox/ymax": tf.io.VarLenFeature(tf.float32),
    "image/object/bbox/xmax": tf.io.VarLenFeature(tf.float32),
    "image/object/class/label": tf.io.VarLenFeature(tf.int64),
    "image/object/is_crowd": tf.io.VarLenFeature(tf.int64),
}

# libjpeg supports exactly these IDCT scalings.
_JPEG_RATIOS = (1, 2, 4, 8)


def _dense(sparse, dtype=None):
    values = tf.sparse.to_dense(sparse)
    return values if dtype is None else tf.cast(values, dtype)


def decode_image(encoded, min_size=None):
    """JPEG or PNG bytes -> (uint8 [h, w, 3] RGB, int32 [2] original size).

    Args:
      encoded: scalar string tensor.
      min_size: optional int. When set and the image is a JPEG whose longer
        side is at least 2x `min_size`, it is decoded at the largest 1/r
        (r in 2, 4, 8) that keeps the longer side >= `min_size`.

    Returns:
      The decoded image and the stored image's (height, width), read from
      the JPEG header, so a reduced decode still knows the original size.
    """
    if not min_size:
        image = _decode_full(encoded)
        return image, tf.shape(image)[:2]

    def jpeg():
        original = tf.image.extract_jpeg_shape(encoded)[:2]
        longer = tf.reduce_max(original)
        # Index of the largest ratio r with longer / r >= min_size.
        index = tf.reduce_sum(
            tf.cast(
                [longer // r >= min_size for r in _JPEG_RATIOS[1:]], tf.int32
            )
        )
        branches = [
            (lambda r=r: tf.io.decode_jpeg(encoded, channels=3, ratio=r))
            for r in _JPEG_RATIOS
        ]
        return tf.switch_case(index, branches), original

    def other():
        image = _decode_full(encoded)
        return image, tf.shape(image)[:2]

    image, original = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
    image.set_shape([None, None, 3])
    return image, original


def _decode_full(encoded):
    # The serving signatures' decode: evaluation (min_size=None) reads the
    # same pixels the exported model does.
    return preprocess.decode(encoded)


def decode_example(serialized, min_size=None):
    """Parses one serialized tf.Example.

    Args:
      serialized: scalar string tensor, a record written by
        `effdet_tf.data.coco_tfrecord` (TF Object Detection API keys).
      min_size: optional int, see `decode_image`: the image may come back
        smaller than stored (boxes follow it).

    Returns:
      {"image": uint8 [h, w, 3], "boxes": float32 [M, 4] yxyx pixels of
      `image`, "classes": int32 [M] contiguous index, "is_crowd": bool [M],
      "image_id": int64 scalar (the COCO id from image/source_id),
      "height", "width": int32 scalars, the ORIGINAL (stored) image size,
      what evaluation maps boxes back to; equal to the image's shape unless
      `min_size` made the decode smaller}.
    """
    parsed = tf.io.parse_single_example(serialized, _FEATURES)
    image, original = decode_image(parsed["image/encoded"], min_size)
    shape = tf.shape(image)
    decoded_h, decoded_w = shape[0], shape[1]

    normalized = tf.stack(
        [
            _dense(parsed["image/object/bbox/ymin"]),
            _dense(parsed["image/object/bbox/xmin"]),
            _dense(parsed["image/object/bbox/ymax"]),
            _dense(parsed["image/object/bbox/xmax"]),
        ],
        axis=-1,
    )
    boxes = box_ops.denormalize(normalized, decoded_h, decoded_w)
    classes = _dense(parsed["image/object/class/label"], tf.int32)
    is_crowd = _dense(parsed["image/object/is_crowd"], tf.int64)
    # Records written without is_crowd (other converters) mean "no crowds".
    is_crowd = tf.cond(
        tf.equal(tf.size(is_crowd), tf.size(classes)),
        lambda: is_crowd > 0,
        lambda: tf.zeros_like(classes, tf.bool),
    )

    return {
        "image": image,
        "boxes": tf.reshape(boxes, [-1, 4]),
        "classes": classes,
        "is_crowd": is_crowd,
        "image_id": tf.strings.to_number(parsed["image/source_id"], tf.int64),
        "height": original[0],
        "width": original[1],
    }
