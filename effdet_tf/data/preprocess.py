"""The one model-input pre-processing: evaluation, predict and export share it.

An image becomes the network's S x S input in two steps, both TensorFlow ops
so they run inside `tf.data` (evaluation) and inside the SavedModel (every
serving signature, hence `predict` too):

1. `decode`: JPEG/PNG bytes -> uint8 RGB at the stored size. No DCT scaling:
   training may decode JPEGs at 1/2..1/8 (decoder.decode_image(min_size=...)),
   which is faster and changes the pixels; the SavedModel cannot know that a
   client's array came from a JPEG, so evaluation decodes what serving sees.
2. `letterbox`: aspect-preserving bilinear resize so the longer side is S,
   placed top-left on a zero S x S canvas; model-pixel = input-pixel * scale.

Training's `augment.random_resize` fuses this letterbox with its random
zoom/shift/flip in one resample; with no augmentation it gives the same
pixels (tests/augment_test.py).
"""

import tensorflow as tf


def decode(encoded):
    """JPEG or PNG bytes (scalar string) -> uint8 [h, w, 3] RGB, full size.

    channels=3 expands greyscale and drops alpha; only the first frame of an
    animation is read, so the result always has rank 3.
    """
    image = tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def resize_bilinear(image, new_h, new_w):
    """tf.image.resize (bilinear) of an image -> float32 [new_h, new_w]
    (the one resample of the train and eval pipelines and of serving).

    TF's CPU ResizeBilinear reads uint8 pixels ~2x slower per output pixel
    than float32 ones (measured: 1.0 vs 0.5 ms for 640x480 -> 512x384),
    while casting the input costs ~0.15 ms per 640x480: the cast comes
    first unless the output is much smaller than the input (strong zoom
    out). The kernel converts uint8 to float itself, so both paths give
    the same pixels.
    """
    shape = tf.shape(image)
    size = tf.stack([new_h, new_w])
    cast_first = new_h * new_w * 4 > shape[0] * shape[1]
    return tf.cond(
        cast_first,
        lambda: tf.image.resize(tf.cast(image, tf.float32), size),
        lambda: tf.image.resize(image, size),
    )


def pad_to_canvas(image, top, left, size):
    """[h, w, C] image -> [size, size, C], placed at (top, left), zeros
    elsewhere (tf.image.pad_to_bounding_box's result).

    Pads the [h, w * C] view instead: TF's CPU Pad op is ~4x slower on the
    3-D tensor with its 3-wide inner axis (measured 0.4-0.7 vs 0.07-0.25 ms
    for 384 x 500 x 3 uint8 into 512 x 512).
    """
    shape = tf.shape(image)
    channels = image.shape[-1] if image.shape[-1] is not None else shape[2]
    padded = tf.pad(
        tf.reshape(image, [shape[0], shape[1] * channels]),
        [[top, size - shape[0] - top],
         [left * channels, (size - shape[1] - left) * channels]],
    )
    return tf.reshape(padded, [size, size, channels])


def letterbox(image, image_size, original_size=None):
    """Aspect-preserving resize (longer side = S) to the top-left of an S x S
    zero canvas: the model input of training, evaluation and serving.

    Args:
      image: [h, w, 3] (any real dtype, RGB 0..255).
      image_size: S.
      original_size: optional int [2] (height, width) the image stands for
        (when it was decoded smaller); `scale` refers to it.

    Returns:
      (float32 [S, S, 3] in 0..255, scale float32 scalar): model-pixel =
      original-pixel * scale.
    """
    if original_size is None:
        original_size = tf.shape(image)[:2]
    original = tf.cast(original_size, tf.float32)
    scale = float(image_size) / tf.reduce_max(original)
    new_size = tf.minimum(tf.cast(tf.round(original * scale), tf.int32), image_size)
    new_size = tf.maximum(new_size, 1)
    resized = resize_bilinear(image, new_size[0], new_size[1])
    return pad_to_canvas(resized, 0, 0, image_size), scale


def letterbox_batch(images, image_size):
    """`letterbox` of every image of a [B, H, W, 3] batch (one size, as the
    `images` serving signature receives them).

    Returns (float32 [B, S, S, 3], scale float32 [B], int32 [B, 2] sizes).
    """
    canvas, scale = tf.map_fn(
        lambda image: letterbox(image, image_size),
        images,
        fn_output_signature=(
            tf.TensorSpec([image_size, image_size, 3], tf.float32),
            tf.TensorSpec([], tf.float32),
        ),
    )
    shape = tf.shape(images)
    return canvas, scale, tf.tile(shape[1:3][None], [shape[0], 1])


def preprocess_encoded(encoded, image_size):
    """Encoded image (scalar string) -> (float32 [S, S, 3], scale, int32 [2]
    original (height, width)): what evaluation and the `*_bytes` serving
    signatures do to one image."""
    image = decode(encoded)
    canvas, scale = letterbox(image, image_size)
    return canvas, scale, tf.shape(image)[:2]
