"""Small building blocks shared by the backbone, the BiFPN and the heads.

- `mish`: Mish (Misra 2019) with a hand-written gradient on TensorFlow.
- `FusedBatchNormalization`: keras BatchNormalization running TensorFlow's
  fused kernel.
- `ConvBNMish`: Darknet's `[convolutional] batch_normalize=1 activation=mish`
  (conv without bias, BatchNorm, Mish), with Darknet's stride-2 padding.
- `SeparableConvBN`: EfficientDet's separable conv followed by BatchNorm.
- `WeightedFusion`: EfficientDet's "fast normalized fusion" of feature maps.

The first two exist for speed (benchmarks/train_step.py): on a 2-core CPU
the CSPDarknet53 training step spends about a quarter of its time in the
element-wise work around the convs. Keras 3's BatchNormalization is a chain
of separate ops (moments, then normalise) forward and backward;
TensorFlow's FusedBatchNormV3 does each direction in one kernel, and at
inference grappler can fold it into the preceding conv. Autodiff of
x * tanh(softplus(x)) walks back through softplus and tanh; the closed-form
gradient needs one sigmoid and a few products. Together they cut the
backbone step's CPU time by ~12% (interleaved runs, 256 px, batch 2),
which is what puts it ahead of keras-hub's CSPNetBackbone. Both are exact,
not approximations, and fall back to the stock Keras code on other backends.
"""

import keras

_TF = keras.backend.backend() == "tensorflow"
if _TF:
    import tensorflow as tf


def _keras_mish(x):
    # keras.activations.mish exists from Keras 3.0 on; keep a fallback.
    if hasattr(keras.activations, "mish"):
        return keras.activations.mish(x)
    return x * keras.ops.tanh(keras.ops.softplus(x))


if _TF:

    @tf.custom_gradient
    def _tf_mish(x):
        t = tf.math.tanh(tf.math.softplus(x))

        def grad(dy):
            # d/dx x*tanh(sp(x)) = t + x * sigmoid(x) * (1 - t^2),
            # since sp'(x) = sigmoid(x) and tanh' = 1 - tanh^2.
            return dy * (t + x * tf.math.sigmoid(x) * (1.0 - t * t))

        return x * t, grad


def mish(x):
    """Mish: x * tanh(softplus(x)) (Misra 2019; YOLOv4's backbone activation)."""
    if _TF:
        return _tf_mish(x)
    return _keras_mish(x)


@keras.saving.register_keras_serializable(package="effdet_tf")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` computed by TF's fused kernel.

    Same arguments, variables (gamma, beta, moving_mean, moving_variance)
    and checkpoints as the Keras layer; same outputs. One difference: the
    moving variance is updated with the unbiased (n / (n - 1)) batch
    variance, as TF's kernel and tf.keras 2 did, where Keras 3 uses the
    biased one (a relative 1 / n, n = batch * height * width).
    Other backends, ranks or axes, and `synchronized=True`, use the Keras code.
    """

    def _fused_ok(self, inputs):
        return (
            _TF
            and len(inputs.shape) == 4
            and self.axis in (-1, 3)
            and not self.synchronized
            and self.scale
            and self.center
        )

    def call(self, inputs, training=None, mask=None):
        if mask is not None or not self._fused_ok(inputs):
            return super().call(inputs, training=training, mask=mask)
        gamma = tf.cast(self.gamma, "float32")
        beta = tf.cast(self.beta, "float32")
        mean = tf.cast(self.moving_mean, "float32")
        var = tf.cast(self.moving_variance, "float32")
        x = tf.cast(inputs, self.compute_dtype)
        if training and self.trainable:
            y, new_mean, new_var = tf.compat.v1.nn.fused_batch_norm(
                x,
                gamma,
                beta,
                mean=mean,
                variance=var,
                epsilon=self.epsilon,
                is_training=True,
                exponential_avg_factor=1.0 - self.momentum,
            )
            self.moving_mean.assign(tf.cast(new_mean, self.moving_mean.dtype))
            self.moving_variance.assign(
                tf.cast(new_var, self.moving_variance.dtype)
            )
            return y
        # Inference: y = x * scale + offset, NOT FusedBatchNormV3
        # (is_training=False). With oneDNN on (TF's default on x86 CPUs),
        # grappler's remapper rewrites Conv2D + FusedBatchNorm + Mish into one
        # fused op that has no CPU kernel: every inference graph (tf.function,
        # SavedModel, TF Serving, saved_model_cli) then fails with "Fusion is
        # not implemented: [FusedBatchNorm,Mish]" (seen with TF 2.21; eager
        # mode is unaffected). Same values; grappler still folds it into the conv.
        scale = gamma * tf.math.rsqrt(var + self.epsilon)
        offset = beta - mean * scale
        return x * tf.cast(scale, x.dtype) + tf.cast(offset, x.dtype)


# Darknet keeps rolling statistics as 0.99 * old + 0.01 * new; its epsilon is
# tiny. timm / keras-hub use 1e-5 for CSPDarknet53, which we follow so that
# imported Darknet statistics behave the same.
BACKBONE_BN_MOMENTUM = 0.99
BACKBONE_BN_EPSILON = 1e-5

# EfficientDet (google/automl efficientdet, hparams_config.py) uses
# momentum 0.99 and epsilon 1e-3 for the BiFPN and head batch norms.
EFFDET_BN_MOMENTUM = 0.99
EFFDET_BN_EPSILON = 1e-3


@keras.saving.register_keras_serializable(package="effdet_tf")
class ConvBNMish(keras.layers.Layer):
    """Conv2D (no bias) -> BatchNormalization -> activation (Mish).

    Stride 1 uses "same" padding (Darknet pads size // 2 on every side).
    Stride 2 pads one row on top and one column on the left and then runs a
    "valid" conv. This is what Darknet computes for even input sizes (its
    symmetric padding leaves the last bottom/right pad unused), while
    TensorFlow's "same" would pad bottom/right instead and shift every
    feature by half a pixel relative to Darknet weights.

    Args:
        filters: int, output channels.
        kernel_size: int, square kernel size.
        strides: 1 or 2.
        activation: str or callable; "mish" (default), "linear" for none.
        bn_momentum, bn_epsilon: BatchNormalization settings.
    """

    def __init__(
        self,
        filters,
        kernel_size=3,
        strides=1,
        activation="mish",
        bn_momentum=BACKBONE_BN_MOMENTUM,
        bn_epsilon=BACKBONE_BN_EPSILON,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if strides not in (1, 2):
            raise ValueError(f"strides must be 1 or 2, got {strides}")
        self.filters = filters
        self.kernel_size = kernel_size
        self.strides = strides
        self.activation = activation
        self.bn_momentum = bn_momentum
        self.bn_epsilon = bn_epsilon

        # === Layers ===
        self.pad = None
        if strides == 2:
            p = (kernel_size - 1) // 2
            self.pad = keras.layers.ZeroPadding2D(
                ((p, 0), (p, 0)), dtype=self.dtype_policy, name="pad"
            )
        self.conv = keras.layers.Conv2D(
            filters,
            kernel_size,
            strides=strides,
            padding="valid" if strides == 2 else "same",
            use_bias=False,
            dtype=self.dtype_policy,
            name="conv",
        )
        self.bn = FusedBatchNormalization(
            momentum=bn_momentum,
            epsilon=bn_epsilon,
            dtype=self.dtype_policy,
            name="bn",
        )
        self.act = (
            mish
            if activation == "mish"
            else keras.activations.get(activation)
        )

    def build(self, input_shape):
        shape = input_shape
        if self.pad is not None:
            self.pad.build(shape)
            shape = self.pad.compute_output_shape(shape)
        self.conv.build(shape)
        shape = self.conv.compute_output_shape(shape)
        self.bn.build(shape)
        self.built = True

    def call(self, inputs, training=None):
        x = inputs
        if self.pad is not None:
            x = self.pad(x)
        x = self.conv(x)
        x = self.bn(x, training=training)
        return self.act(x)

    def compute_output_shape(self, input_shape):
        shape = input_shape
        if self.pad is not None:
            shape = self.pad.compute_output_shape(shape)
        return self.conv.compute_output_shape(shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "kernel_size": self.kernel_size,
                "strides": self.strides,
                "activation": self.activation,
                "bn_momentum": self.bn_momentum,
                "bn_epsilon": self.bn_epsilon,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="effdet_tf")
class SeparableConvBN(keras.layers.Layer):
    """Optional activation -> 3x3 separable conv -> BatchNormalization.

    EfficientDet's BiFPN node applies swish *before* the separable conv
    (automl efficientdet_arch.py, `FNode`: act -> SeparableConv2D -> BN), so
    the activation here is a pre-activation. The conv has no bias: the
    BatchNorm that follows makes one redundant.

    Args:
        filters: int, output channels.
        kernel_size: int.
        pre_activation: str or None, applied to the input.
        bn_momentum, bn_epsilon: BatchNormalization settings.
    """

    def __init__(
        self,
        filters,
        kernel_size=3,
        pre_activation="swish",
        bn_momentum=EFFDET_BN_MOMENTUM,
        bn_epsilon=EFFDET_BN_EPSILON,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.filters = filters
        self.kernel_size = kernel_size
        self.pre_activation = pre_activation
        self.bn_momentum = bn_momentum
        self.bn_epsilon = bn_epsilon

        # === Layers ===
        self.act = (
            keras.activations.get(pre_activation) if pre_activation else None
        )
        self.conv = keras.layers.SeparableConv2D(
            filters,
            kernel_size,
            padding="same",
            use_bias=False,
            dtype=self.dtype_policy,
            name="conv",
        )
        self.bn = FusedBatchNormalization(
            momentum=bn_momentum,
            epsilon=bn_epsilon,
            dtype=self.dtype_policy,
            name="bn",
        )

    def build(self, input_shape):
        self.conv.build(input_shape)
        self.bn.build(self.conv.compute_output_shape(input_shape))
        self.built = True

    def call(self, inputs, training=None):
        x = inputs
        if self.act is not None:
            x = self.act(x)
        x = self.conv(x)
        return self.bn(x, training=training)

    def compute_output_shape(self, input_shape):
        return self.conv.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "kernel_size": self.kernel_size,
                "pre_activation": self.pre_activation,
                "bn_momentum": self.bn_momentum,
                "bn_epsilon": self.bn_epsilon,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="effdet_tf")
class WeightedFusion(keras.layers.Layer):
    """Fast normalized fusion: sum_i relu(w_i) * x_i / (sum_j relu(w_j) + eps).

    EfficientDet, Tan et al. 2020, section 3.3 ("fast normalized fusion"),
    epsilon 1e-4 as in the paper. One learnable scalar per input, starting
    at 1 so that training begins from a plain average.

    Called on a list of tensors of identical shape.
    """

    def __init__(self, epsilon=1e-4, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        self.num_inputs = len(input_shape)
        self.fusion_weights = self.add_weight(
            name="fusion_weights",
            shape=(self.num_inputs,),
            initializer="ones",
            trainable=True,
        )
        self.built = True

    def call(self, inputs):
        w = keras.ops.relu(self.fusion_weights)
        w = w / (keras.ops.sum(w) + self.epsilon)
        w = keras.ops.cast(w, inputs[0].dtype)
        out = inputs[0] * w[0]
        for i in range(1, len(inputs)):
            out = out + inputs[i] * w[i]
        return out

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        config = super().get_config()
        config.update({"epsilon": self.epsilon})
        return config
