"""keras_synann.models: the three reference architectures on every backend."""

import keras
import numpy as np
import pytest

import keras_synann
from keras_synann import Synapse, models
from keras_synann.testing import value_and_grad


def _images(n=4, seed=0):
    return np.random.default_rng(seed).random((n, 28, 28, 1)).astype("float32")


def _synapse_layers(model):
    return [layer for layer in model.layers if isinstance(layer, Synapse)]


@pytest.mark.parametrize("name, units", [("synacnn", 784), ("lenet", 64), ("mlp", 280)])
def test_builders_output_logits_with_one_synapse(name, units):
    model = models.get_model(name)
    assert model.name == name
    (synapse,) = _synapse_layers(model)
    assert synapse.units == units
    logits = keras.ops.convert_to_numpy(model(_images(2), training=False))
    assert logits.shape == (2, 10) and np.isfinite(logits).all()


@pytest.mark.parametrize("name", ["synacnn", "lenet", "mlp"])
def test_synapse_is_fed_probabilities(name):
    """What feeds the Synapse layer lies in [0, 1] (the layer clips outside)."""
    model = models.get_model(name)
    (synapse,) = _synapse_layers(model)
    probe = keras.Model(model.inputs, synapse.input)
    x = keras.ops.convert_to_numpy(probe([_images(3) * 4.0 - 1.0], training=False))
    assert x.min() >= 0.0 and x.max() <= 1.0


@pytest.mark.parametrize("name", ["lenet", "mlp"])
def test_dense_baseline_replaces_the_synapse(name):
    model = models.get_model(name, synapse=False)
    assert not _synapse_layers(model)
    synapse_model = models.get_model(name)
    (synapse,) = _synapse_layers(synapse_model)
    dense = model.get_layer("synapse_dense")
    assert dense.units == synapse.units
    assert model.output.shape == synapse_model.output.shape


def test_unknown_model():
    with pytest.raises(ValueError, match="Unknown model 'resnet'; expected one of"):
        models.get_model("resnet")


def test_public_api_exports_the_builders():
    for name in ("synacnn", "lenet", "mlp", "get_model", "MODELS"):
        assert name in keras_synann.__all__
    assert keras_synann.get_model is models.get_model


@pytest.mark.parametrize("name", ["lenet", "mlp"])
def test_trains_a_step_and_round_trips_through_keras_file(name, tmp_path):
    model = models.get_model(name)
    model.compile(
        "adam",
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    x, y = _images(16), np.arange(16) % 10
    before = keras.ops.convert_to_numpy(_synapse_layers(model)[0].beta)
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    beta = keras.ops.convert_to_numpy(_synapse_layers(model)[0].beta)
    assert not np.array_equal(before, beta)
    assert beta.min() >= 0.0 and beta.max() < 1.0
    path = tmp_path / f"{name}.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(restored.predict(x, verbose=0)),
        keras.ops.convert_to_numpy(model.predict(x, verbose=0)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_mixed_precision_keeps_float32_logits():
    keras.config.set_dtype_policy("mixed_bfloat16")
    model = models.mlp()
    assert model.get_layer("logits").compute_dtype == "float32"
    logits = model(_images(2), training=False)
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"


def test_lenet_reference_widths():
    model = models.lenet(filters=(10, 20))
    assert model.get_layer("conv1").filters == 10
    assert model.get_layer("conv2").filters == 20


def _numpy_max_pool_2x2(x, upstream):
    """Values and gradient of sum(upstream * pool(x)), 2x2 windows, stride 2,
    "valid", one window at a time (float64)."""
    n, height, width, c = x.shape
    h, w = height // 2, width // 2
    out = np.zeros((n, h, w, c))
    grad = np.zeros_like(x, dtype=np.float64)
    for b, i, j, k in np.ndindex(n, h, w, c):
        window = x[b, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2, k]
        di, dj = np.unravel_index(np.argmax(window), (2, 2))
        out[b, i, j, k] = window[di, dj]
        grad[b, 2 * i + di, 2 * j + dj, k] += upstream[b, i, j, k]
    return out, grad


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 7, 9, 2)])
def test_max_pool_2x2_matches_numpy_values_and_gradient(shape):
    """MaxPool2x2 (a reshape-and-max under jax on CPU, ops.max_pool elsewhere)
    against windows taken one by one; x has no ties."""
    rng = np.random.default_rng(0)
    x = rng.permutation(np.prod(shape)).reshape(shape).astype("float32") / 10
    out_shape = (shape[0], shape[1] // 2, shape[2] // 2, shape[3])
    upstream = rng.normal(size=out_shape).astype("float32")
    pool = models.MaxPool2x2()
    assert pool.compute_output_shape(shape) == out_shape

    def loss(x):
        return keras.ops.sum(pool(x) * keras.ops.convert_to_tensor(upstream))

    value, (grad,) = value_and_grad(loss)(x)
    expected, expected_grad = _numpy_max_pool_2x2(x, upstream)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(pool(x)), expected, rtol=0, atol=0
    )
    np.testing.assert_allclose(
        float(value), float((expected * upstream).sum()), rtol=1e-5
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(grad), expected_grad, atol=1e-6
    )
    reference = keras.layers.MaxPooling2D(2)(x)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(reference), expected)


def _numpy_conv_valid(x, kernel, upstream):
    """Values of conv(x, kernel) (stride 1, "valid", NHWC x HWIO), and the
    gradients of sum(upstream * conv(x, kernel)), in float64, from windows:
    dx as the full correlation of the zero-padded upstream with the flipped
    kernel, dkernel as windows of x against upstream."""
    from numpy.lib.stride_tricks import sliding_window_view

    x, kernel, upstream = (np.asarray(a, np.float64) for a in (x, kernel, upstream))
    kh, kw = kernel.shape[:2]
    windows = sliding_window_view(x, (kh, kw), axis=(1, 2))  # b, p, q, c, i, j
    y = np.einsum("bpqcij,ijco->bpqo", windows, kernel)
    padded = np.pad(upstream, ((0, 0), (kh - 1, kh - 1), (kw - 1, kw - 1), (0, 0)))
    up_windows = sliding_window_view(padded, (kh, kw), axis=(1, 2))
    dx = np.einsum("brsoij,ijco->brsc", up_windows, kernel[::-1, ::-1])
    dkernel = np.einsum("bpqcij,bpqo->ijco", windows, upstream)
    return y, dx, dkernel


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize(
    "x_shape, kernel_shape",
    [((3, 10, 9, 1), (5, 5, 1, 4)), ((2, 8, 7, 3), (3, 2, 3, 5))],
)
def test_valid_conv2d_matches_numpy_values_and_gradients(x_shape, kernel_shape, jit):
    """ValidConv2D's convolution (under jax on a CPU its own forms, elsewhere
    keras.ops.conv) against float64 NumPy, one and several input channels."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=x_shape).astype("float32")
    kernel = rng.normal(size=kernel_shape).astype("float32")
    out_shape = (
        x_shape[0], x_shape[1] - kernel_shape[0] + 1,
        x_shape[2] - kernel_shape[1] + 1, kernel_shape[3],
    )  # fmt: skip
    upstream = rng.normal(size=out_shape).astype("float32")
    layer = models.ValidConv2D(kernel_shape[3], kernel_shape[:2])

    def loss(x, kernel):
        y = layer.convolution_op(x, kernel)
        return keras.ops.sum(y * keras.ops.convert_to_tensor(upstream))

    value, (dx, dkernel) = value_and_grad(loss, jit=jit)(x, kernel)
    y, expected_dx, expected_dkernel = _numpy_conv_valid(x, kernel, upstream)
    actual_y = keras.ops.convert_to_numpy(layer.convolution_op(x, kernel))
    np.testing.assert_allclose(actual_y, y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(value), (y * upstream).sum(), rtol=1e-5)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(dx), expected_dx, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(dkernel), expected_dkernel, rtol=1e-5, atol=1e-4
    )


def test_valid_conv2d_is_conv2d_with_the_same_weights():
    """Same config and weights as keras.layers.Conv2D give the same outputs
    (bias and activation included), and the config round-trips."""
    x = _images(2)
    layer = models.ValidConv2D(6, 5, activation="relu", name="conv")
    y = keras.ops.convert_to_numpy(layer(x))
    reference = keras.layers.Conv2D.from_config(layer.get_config())
    reference.build(x.shape)
    reference.set_weights(layer.get_weights())
    np.testing.assert_allclose(
        y, keras.ops.convert_to_numpy(reference(x)), rtol=1e-5, atol=1e-6
    )
    clone = models.ValidConv2D.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"strides": 2}, "strides"),
        ({"padding": "same"}, "padding"),
        ({"dilation_rate": 2}, "dilation_rate"),
        ({"data_format": "channels_first"}, "data_format"),
    ],
)
def test_valid_conv2d_rejects_other_convolutions(kwargs, name):
    with pytest.raises(ValueError, match=f"Received: {name}="):
        models.ValidConv2D(4, 3, **kwargs)
