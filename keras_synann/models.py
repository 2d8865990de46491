"""Builders for the reference SynaNN architectures on MNIST-shaped inputs.

Every builder returns an uncompiled `keras.Model` that takes images scaled to
[0, 1], shape `(28, 28, 1)` by default, and returns 10 **logits** (train with
`SparseCategoricalCrossentropy(from_logits=True)`). The last layer computes in
float32, so the models also train under a mixed-precision policy.

`synapse=False` puts a `keras.layers.Dense` of the same size where the
`Synapse` layer was: the baseline for speed and accuracy comparisons.

What feeds the `Synapse` layer: its inputs are probabilities (it clips them to
[0, 1]), so each builder ends the layer before it with a squashing activation.
"""

from __future__ import annotations

import keras
from keras import layers, ops

from keras_synann.layers import Synapse

#: Mean and standard deviation of MNIST pixels in [0, 1] (the reference's
#: PyTorch normalisation).
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


@keras.saving.register_keras_serializable(package="keras_synann")
class MaxPool2x2(layers.Layer):
    """2x2 max pooling with stride 2 and "valid" padding, channels last: the
    values of `keras.layers.MaxPooling2D(2)`.

    Under jax on a CPU it is a reshape into 2x2 blocks and a max over each:
    the same values, and the same gradient except where a block holds equal
    maxima (then split among them). XLA's CPU code for the gradient of a
    pooling window (select-and-scatter) took about half of a lenet train step;
    see docs/performance.md, "Training speed". Elsewhere it is `keras.ops.max_pool`.
    """

    def call(self, x):
        if not _jax_on_cpu():
            return ops.max_pool(x, 2, 2, "valid")
        _, height, width, channels = x.shape
        h, w = height // 2, width // 2
        x = x[:, : 2 * h, : 2 * w, :]
        return ops.max(ops.reshape(x, (-1, h, 2, w, 2, channels)), axis=(2, 4))

    def compute_output_shape(self, input_shape):
        batch, height, width, channels = input_shape
        return (batch, height // 2, width // 2, channels)


@keras.saving.register_keras_serializable(package="keras_synann")
class ValidConv2D(layers.Conv2D):
    """`keras.layers.Conv2D` for stride 1, "valid" padding, channels last:

        y[b, p, q, o] = sum_{i, j, c} x[b, p + i, q + j, c] kernel[i, j, c, o] + bias[o]

    The same arguments, weights, values and gradients as `Conv2D`. Under jax
    on a CPU the convolution and its gradients are computed in the forms XLA's
    CPU backend runs fastest (one input channel: a fused sum over the kernel's
    taps; input gradient: matmuls and shifted sums); see
    `keras_synann/kernels/jax/conv.py` and docs/performance.md, "Training speed". Elsewhere
    it is `keras.ops.conv`.
    """

    def __init__(self, filters, kernel_size, **kwargs):
        super().__init__(filters, kernel_size, **kwargs)
        expected = {
            "strides": (1, 1),
            "padding": "valid",
            "dilation_rate": (1, 1),
            "groups": 1,
            "data_format": "channels_last",
        }
        for name, value in expected.items():
            if getattr(self, name) != value:
                raise ValueError(
                    "ValidConv2D computes stride-1, unpadded, channels-last "
                    f"convolutions: {name} must be {value!r}. "
                    f"Received: {name}={getattr(self, name)!r}"
                )

    def convolution_op(self, inputs, kernel):
        if not _jax_on_cpu():
            return super().convolution_op(inputs, kernel)
        from keras_synann.kernels.jax.conv import conv2d_valid

        return conv2d_valid(inputs, ops.convert_to_tensor(kernel))


def _jax_on_cpu() -> bool:
    if keras.backend.backend() != "jax":
        return False
    import jax

    return jax.default_backend() == "cpu"


def _synapse_or_dense(
    units: int, synapse: bool, name: str, implementation: str, series_order
):
    if synapse:
        return Synapse(
            units, implementation=implementation, series_order=series_order, name=name
        )
    return layers.Dense(units, name=f"{name}_dense")


def _logits(num_classes: int):
    return layers.Dense(num_classes, dtype="float32", name="logits")


def synacnn(
    input_shape=(28, 28, 1),
    num_classes: int = 10,
    dropout: float = 0.25,
    synapse: bool = True,
    implementation: str = "auto",
    series_order: int | None = None,
    name: str = "synacnn",
) -> keras.Model:
    """The reference TensorFlow CNN with a `Synapse(784)` head.

    Conv(28, 3x3) -> Conv(56, 3x3) -> Conv(112, 5x5) -> Conv(784, 7x7) ->
    global max pooling -> dropout -> Synapse(784) -> dropout -> Dense(logits).

    Deviation from the reference: the last convolution uses a sigmoid instead
    of a ReLU, so the Synapse layer gets probabilities in (0, 1). (ReLU outputs
    above 1 would be clipped by the layer and pass no gradient.)
    """
    inputs = keras.Input(input_shape, name="image")
    x = layers.Conv2D(28, 3, activation="relu", name="conv1")(inputs)
    x = layers.Conv2D(56, 3, activation="relu", name="conv2")(x)
    x = layers.Conv2D(112, 5, activation="relu", name="conv3")(x)
    x = layers.Conv2D(784, 7, activation="sigmoid", name="conv4")(x)
    x = layers.GlobalMaxPooling2D(name="pool")(x)
    x = layers.Dropout(dropout, name="dropout1")(x)
    x = _synapse_or_dense(784, synapse, "synapse", implementation, series_order)(x)
    x = layers.Dropout(dropout, name="dropout2")(x)
    return keras.Model(inputs, _logits(num_classes)(x), name=name)


def lenet(
    input_shape=(28, 28, 1),
    num_classes: int = 10,
    filters: tuple[int, int] = (16, 32),
    hidden: int = 64,
    dropout: float = 0.25,
    squash: str = "softmax",
    synapse: bool = True,
    implementation: str = "auto",
    series_order: int | None = None,
    name: str = "lenet",
) -> keras.Model:
    """The reference PyTorch LeNet-style net with a `Synapse(hidden)` layer.

    normalise -> Conv(5x5) -> max pool -> ReLU -> Conv(5x5) -> spatial dropout
    -> max pool -> ReLU -> flatten -> Dense(hidden, ReLU) -> dropout ->
    softmax -> Synapse(hidden) -> batch norm -> Dense(logits).

    The softmax feeds the Synapse layer probabilities, as in the reference
    (`squash="sigmoid"` is the alternative). Deviations, for a run of ~10
    epochs with Adam instead of 100+ with SGD: `filters` (16, 32) instead of
    (10, 20) (more capacity), `dropout` 0.25 instead of 0.5 (fewer epochs to
    a given validation accuracy). `filters=(10, 20), dropout=0.5` give the
    reference's net. Measured effects: docs/training.md, "The models".
    """
    inputs = keras.Input(input_shape, name="image")
    x = layers.Rescaling(1.0 / MNIST_STD, offset=-MNIST_MEAN / MNIST_STD)(inputs)
    x = ValidConv2D(filters[0], 5, name="conv1")(x)
    x = MaxPool2x2(name="pool1")(x)
    x = layers.ReLU(name="relu1")(x)
    x = ValidConv2D(filters[1], 5, name="conv2")(x)
    x = layers.SpatialDropout2D(dropout, name="dropout2d")(x)
    x = MaxPool2x2(name="pool2")(x)
    x = layers.ReLU(name="relu2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(hidden, activation="relu", name="fc1")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    x = layers.Activation(squash, name=squash)(x)
    x = _synapse_or_dense(hidden, synapse, "synapse", implementation, series_order)(x)
    x = layers.BatchNormalization(name="batch_norm")(x)
    return keras.Model(inputs, _logits(num_classes)(x), name=name)


def mlp(
    input_shape=(28, 28, 1),
    num_classes: int = 10,
    hidden: int = 280,
    dropout: float = 0.25,
    input_dropout: float = 0.2,
    synapse: bool = True,
    implementation: str = "auto",
    series_order: int | None = None,
    name: str = "mlp",
) -> keras.Model:
    """The paper's SynaMLP: Dense(hidden) -> Synapse(hidden) -> dropout -> logits.

    The first Dense layer uses a sigmoid so the Synapse layer gets
    probabilities (the paper does not name that activation). Dropout 0.25 is
    the paper's keep probability of 0.75. Deviation: dropout on the input
    pixels (`input_dropout`, 0.2; 0 gives the paper's net), against the
    overfitting of the paper's net. Measured effects: docs/training.md, "The models".
    """
    inputs = keras.Input(input_shape, name="image")
    x = layers.Flatten(name="flatten")(inputs)
    if input_dropout:
        x = layers.Dropout(input_dropout, name="input_dropout")(x)
    x = layers.Dense(hidden, activation="sigmoid", name="fc1")(x)
    x = _synapse_or_dense(hidden, synapse, "synapse", implementation, series_order)(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    return keras.Model(inputs, _logits(num_classes)(x), name=name)


#: Model builders by name.
MODELS = {"synacnn": synacnn, "lenet": lenet, "mlp": mlp}


def get_model(name: str, **kwargs) -> keras.Model:
    """Builds the model called `name` (one of `MODELS`) with `kwargs`.

    Every builder takes `synapse` (False: a Dense layer in the Synapse layer's
    place, for comparisons), and `implementation` and `series_order` (the
    Synapse layer's).
    """
    if name not in MODELS:
        raise ValueError(
            f"Unknown model {name!r}; expected one of: {', '.join(sorted(MODELS))}."
        )
    return MODELS[name](**kwargs)
