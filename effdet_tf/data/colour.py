"""HSV-style colour jitter of the final batch, fused with its float32 cast,
and an optional Gaussian blur after it.

The third augmentation stage of effdet_tf.data.augment (which re-exports
`colour_jitter`): one 3x3 colour matrix per image instead of an RGB -> HSV
-> RGB round trip, applied in the same XLA pass as the uint8 -> float32
cast the model input needs anyway. Ranges follow YOLOv5's `hyp.scratch-low`
(hsv_h 0.015, hsv_s 0.7, hsv_v 0.4), set in `config.AugmentConfig` (--hsv_gains).
"""

import math

import tensorflow as tf

# ITU-R BT.601 luma: the grey a saturation change moves towards.
_LUMA = (0.299, 0.587, 0.114)


def _colour_matrices(u, config):
    """[G, 3, 3] matrices M (pixel' = M @ pixel) for HSV-style colour jitter.

    Value gain scales RGB (V = max(R, G, B) scales with it); saturation
    moves pixels towards their luma; hue rotates them about the grey axis
    (Rodrigues' formula). A 3x3 matrix per image costs one fused pass,
    ~5x less than an RGB -> HSV -> RGB round trip on CPU.

    Args:
      u: [G, 4] uniforms in [0, 1): apply?, hue, saturation, value.
    """
    hue, sat, val = config.hsv_gains
    apply = tf.cast(u[:, 0] < config.hsv_prob, tf.float32)[:, None, None]
    theta = apply * (2.0 * u[:, 1, None, None] - 1.0) * hue * 2.0 * math.pi
    sat_gain = 1.0 + apply * (2.0 * u[:, 2, None, None] - 1.0) * sat
    val_gain = 1.0 + apply * (2.0 * u[:, 3, None, None] - 1.0) * val

    k = 1.0 / math.sqrt(3.0)
    cross = tf.constant([[0.0, -k, k], [k, 0.0, -k], [-k, k, 0.0]])
    outer = tf.fill([3, 3], k * k)
    eye = tf.eye(3)
    rotation = (
        tf.cos(theta) * eye + tf.sin(theta) * cross
        + (1.0 - tf.cos(theta)) * outer
    )
    to_grey = tf.ones([3, 1]) * tf.constant([_LUMA])
    saturation = sat_gain * eye + (1.0 - sat_gain) * to_grey
    # The [G, 3, 3] product as a broadcast sum: tf.matmul runs it as a
    # oneDNN batched matmul costing ~0.7 ms per batch on CPU (profiled).
    product = tf.reduce_sum(
        rotation[:, :, :, None] * saturation[:, None, :, :], axis=2)
    return val_gain * product


@tf.function(jit_compile=True)
def _colour_to_float(images, matrices):
    """uint8 [B, S, S, 3] -> float32 M @ pixel, clipped to [0, 255]: the
    pipeline's uint8 -> float32 cast and the colour jitter in one pass."""
    pixels = tf.cast(images, tf.float32)
    # pixel' = M @ pixel written elementwise, so it fuses (a batched dot
    # with a contraction of 3 would not).
    m = matrices[:, None, None, :, :]  # [B, 1, 1, 3 (out), 3 (in)]
    pixels = (
        pixels[..., 0:1] * m[..., 0]
        + pixels[..., 1:2] * m[..., 1]
        + pixels[..., 2:3] * m[..., 2]
    )
    return tf.clip_by_value(pixels, 0.0, 255.0)


def colour_jitter(images, seed, config):
    """HSV-style colour jitter of a batch, and its cast to float32.

    The last augmentation (YOLOv5 also jitters colour after Mosaic/MixUp),
    run on the final batch so that it shares its one pass over the pixels
    with the uint8 -> float32 cast the model input needs anyway.

    Args:
      images: uint8 [B, S, S, 3].
      seed: int [2] stateless seed.
      config: AugmentConfig (hsv_prob, hsv_gains).

    Returns:
      float32 [B, S, S, 3] in [0, 255].
    """
    if config.hsv_prob <= 0.0:
        return tf.cast(images, tf.float32)
    u = tf.random.stateless_uniform([tf.shape(images)[0], 4], seed)
    return _colour_to_float(images, _colour_matrices(u, config))


def _blur_taps(sigma, apply, radius):
    """[B, 2 radius + 1] normalised 1-D Gaussian kernels of std `sigma`, or
    the unit impulse (an exact identity) where `apply` is False."""
    x = tf.range(-radius, radius + 1, dtype=tf.float32)[None, :]
    taps = tf.exp(-0.5 * tf.square(x / sigma[:, None]))
    taps = taps / tf.reduce_sum(taps, axis=1, keepdims=True)
    impulse = tf.one_hot(tf.fill(tf.shape(sigma), radius), 2 * radius + 1)
    return tf.where(apply[:, None], taps, impulse)


def gaussian_blur(images, seed, config):
    """Blurs each image of a float batch with probability `blur_prob`, with
    a Gaussian of std drawn uniformly in `blur_sigma` pixels (YOLOv4's
    blur freebie; the range is torchvision's GaussianBlur default).

    Separable: one depthwise pass down the columns, one along the rows,
    every image's own kernel in the channels of a single [1, S, S, 3B]
    tensor. Edges are reflected (OpenCV's BORDER_REFLECT_101), so a blurred
    image keeps its brightness up to the border. Boxes do not move.

    Args:
      images: float32 [B, S, S, 3].
      seed: int [2] stateless seed.
      config: AugmentConfig (blur_prob, blur_sigma).
    """
    if config.blur_prob <= 0.0:
        return images
    lo, hi = config.blur_sigma
    radius = max(1, math.ceil(3.0 * hi))
    shape = tf.shape(images)
    batch, height, width = shape[0], shape[1], shape[2]
    u = tf.random.stateless_uniform([batch, 2], seed)
    taps = _blur_taps(lo + (hi - lo) * u[:, 1], u[:, 0] < config.blur_prob, radius)
    # Channel b * 3 + c of the stacked tensor is channel c of image b.
    stacked = tf.reshape(tf.transpose(images, [1, 2, 0, 3]), [1, height, width, batch * 3])
    per_channel = tf.repeat(taps, 3, axis=0)  # [3B, taps]
    column = tf.transpose(per_channel)[:, None, :, None]  # [taps, 1, 3B, 1]
    row = tf.transpose(per_channel)[None, :, :, None]  # [1, taps, 3B, 1]
    padded = tf.pad(stacked, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
    blurred = tf.nn.depthwise_conv2d(padded, column, [1, 1, 1, 1], "VALID")
    blurred = tf.nn.depthwise_conv2d(blurred, row, [1, 1, 1, 1], "VALID")
    return tf.transpose(tf.reshape(blurred, [height, width, batch, 3]), [2, 0, 1, 3])
