"""The fused `log_inhibition` kernels against the keras.ops path and float64 NumPy.

"triton" runs under the torch backend and "pallas" under jax; without a GPU
they run in their interpreters (Triton's: TRITON_INTERPRET=1, set in
conftest.py; Pallas's: chosen by the kernel on CPU), which are slow, so the
shapes are small. They are odd on purpose: every tile, chunk and batch slice
of the kernels has a tail, which exercises their padding and masks.
"""

import importlib.util
import os

import keras
import numpy as np
import pytest
from keras import ops

from keras_synann import Synapse
from keras_synann import ops as synann_ops
from keras_synann.kernels.tiles import TileConfig
from keras_synann.testing import (
    numpy_synapse_graph,
    numpy_synapse_graph_grads,
    value_and_grad,
)

BACKEND = keras.backend.backend()
#: The backend each fused kernel needs.
HOME = {"triton": "torch", "pallas": "jax"}
FUSED = ["triton", "pallas"]

# The interpreters divide by floored (zero) factors before the kernels' `where`
# discards the quotient; NumPy warns about it where a GPU would not.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")


def _needs(implementation):
    """Skips the test unless `implementation` can run here."""
    home = HOME[implementation]
    if BACKEND != home:
        pytest.skip(f"implementation={implementation!r} needs {home}, not {BACKEND}")
    if implementation == "triton":
        pytest.importorskip("triton", reason="triton is not importable")
        import torch

        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("no CUDA and TRITON_INTERPRET is not 1")


def _inputs(batch, n_in, n_out, case, seed=0):
    """float32 x (batch, n_in), kernel (n_in, n_out) and an upstream gradient."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.02, 0.98, (batch, n_in))
    kernel = rng.uniform(0.0, 0.9, (n_in, n_out))
    if case == "floored":
        # 1 - 1 * 1 = 0: floored factors, which pass no gradient, in sample 0
        # and (through the rows of ones) weaker factors in every sample.
        x[0, : min(4, n_in)] = 1.0
        kernel[: min(2, n_in)] = 1.0
    elif case == "negative":
        kernel = rng.uniform(-0.6, 0.6, (n_in, n_out))  # factors above and below 1
    elif case == "near_one":
        # Factors of about 1e-3: a chunk's product falls below float32's
        # smallest normal number and is floored there before its log.
        x = rng.uniform(0.998, 1.0, (batch, n_in))
        kernel = rng.uniform(0.998, 0.9995, (n_in, n_out))
    upstream = rng.normal(size=(batch, n_out))
    return x.astype("float32"), kernel.astype("float32"), upstream.astype("float32")


def _float64_log_inhibition(x, kernel, upstream, chunk=synann_ops.DEFAULT_CHUNK_SIZE):
    """s = sum_j log(max(1 - W[j, i] x[b, j], floor)) in float64, taken as one
    log per `chunk` factors with the product floored at float32's smallest
    normal number (the documented semantics of every implementation), and the
    closed-form gradients of sum(upstream * s): nothing through floored factors.
    """
    x = np.asarray(x, np.float64)
    kernel = np.asarray(kernel, np.float64)
    upstream = np.asarray(upstream, np.float64)
    factors = 1.0 - x[:, :, None] * kernel[None, :, :]  # (batch, n_in, n_out)
    floored = np.maximum(factors, synann_ops.FACTOR_FLOOR)
    s = np.zeros((x.shape[0], kernel.shape[1]))
    for start in range(0, x.shape[1], chunk):
        product = np.prod(floored[:, start : start + chunk], axis=1)
        s += np.log(np.maximum(product, synann_ops.PRODUCT_FLOOR))
    kept = factors > synann_ops.FACTOR_FLOOR
    ratio = np.zeros_like(factors)
    np.divide(upstream[:, None, :], factors, out=ratio, where=kept)
    d_x = -np.einsum("bji,ji->bj", ratio, kernel)
    d_kernel = -np.einsum("bji,bj->ji", ratio, x)
    return s, d_x, d_kernel


def _log_inhibition_and_grads(implementation, x, kernel, upstream, jit=False):
    """(s, d sum(upstream * s) / dx, ... / dkernel) as NumPy arrays."""

    def loss(x, kernel):
        s = synann_ops.log_inhibition(x, kernel, implementation=implementation)
        return ops.sum(s * ops.convert_to_tensor(upstream))

    _, (d_x, d_kernel) = value_and_grad(loss, jit=jit)(x, kernel)
    s = synann_ops.log_inhibition(x, kernel, implementation=implementation)
    return tuple(ops.convert_to_numpy(a) for a in (s, d_x, d_kernel))


def _synapse_graph_and_grads(implementation, x, kernel, upstream):
    """(y, d sum(upstream * y) / dx, ... / dkernel) of `synapse_graph`."""

    def loss(x, kernel):
        y = synann_ops.synapse_graph(x, kernel, implementation=implementation)
        return ops.sum(y * ops.convert_to_tensor(upstream))

    _, (d_x, d_kernel) = value_and_grad(loss)(x, kernel)
    y = synann_ops.synapse_graph(x, kernel, implementation=implementation)
    return tuple(ops.convert_to_numpy(a) for a in (y, d_x, d_kernel))


def _close(actual, expected, rtol, name):
    """Elementwise rtol, plus an absolute tolerance of rtol times the largest
    |expected| (sums of signed terms cancel to values near 0)."""
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    assert np.all(np.isfinite(actual)), f"{name}: non-finite values"
    atol = rtol * max(float(np.max(np.abs(expected))), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.parametrize("implementation", FUSED)
@pytest.mark.parametrize(
    "batch, n, case",
    [
        (5, 37, "plain"),  # tails in every tile and in the last chunk
        (70, 20, "plain"),  # several row tiles
        (300, 12, "plain"),  # > 256 rows: the weight gradient sums two slices
        (5, 37, "negative"),
        (300, 12, "negative"),
    ],
)
def test_synapse_graph_matches_float64_numpy_and_ops(implementation, batch, n, case):
    _needs(implementation)
    x, kernel, upstream = _inputs(batch, n, n, case, seed=batch + n)
    fused = _synapse_graph_and_grads(implementation, x, kernel, upstream)
    expected_y = numpy_synapse_graph(x, kernel)
    expected_dx, expected_dkernel = numpy_synapse_graph_grads(x, kernel, upstream)
    for name, ours, theirs in zip(
        ("y", "d_x", "d_kernel"),
        fused,
        (expected_y, expected_dx, expected_dkernel),
        strict=True,
    ):
        _close(ours, theirs, 2e-5, f"{name} vs float64 NumPy")
    reference = _synapse_graph_and_grads("ops", x, kernel, upstream)
    for name, ours, theirs in zip(
        ("y", "d_x", "d_kernel"), fused, reference, strict=True
    ):
        _close(ours, theirs, 1e-5, f"{name} vs implementation='ops'")


@pytest.mark.parametrize("implementation", FUSED)
@pytest.mark.parametrize(
    "batch, n_in, n_out, case",
    [
        (1, 1, 1, "plain"),
        (5, 37, 21, "plain"),  # n_out below one column tile, n_in with a chunk tail
        (9, 70, 5, "plain"),  # n_in over one tile of the input gradient
        (70, 19, 130, "plain"),  # n_out over two column tiles
        (300, 23, 11, "plain"),  # two batch slices in the weight gradient
        (5, 37, 21, "floored"),
        (300, 23, 11, "floored"),
        (6, 17, 40, "negative"),
        (6, 64, 40, "near_one"),  # every chunk product floored
        (7, 40, 9, "near_one"),  # and a last chunk of 8 that is not
    ],
)
def test_log_inhibition_matches_float64_numpy_and_ops(
    implementation, batch, n_in, n_out, case
):
    _needs(implementation)
    x, kernel, upstream = _inputs(batch, n_in, n_out, case, seed=n_in)
    fused = _log_inhibition_and_grads(implementation, x, kernel, upstream)
    expected = _float64_log_inhibition(x, kernel, upstream)
    # A factor near 1e-3 computed in float32 as 1 - x * W keeps only about
    # 6e-8 / 1e-3 of relative accuracy, and the gradients divide by it.
    rtol = 2e-4 if case == "near_one" else 2e-5
    for name, ours, theirs in zip(
        ("s", "d_x", "d_kernel"), fused, expected, strict=True
    ):
        _close(ours, theirs, rtol, f"{name} vs float64 NumPy")
    reference = _log_inhibition_and_grads("ops", x, kernel, upstream)
    for name, ours, theirs in zip(
        ("s", "d_x", "d_kernel"), fused, reference, strict=True
    ):
        _close(ours, theirs, 1e-5, f"{name} vs implementation='ops'")
    if case == "floored":
        # Sample 0's floored factors: log(1e-6) each, and no gradient through
        # them (their row of W only gets the other samples' contributions).
        assert fused[0][0].max() < 2 * np.log(synann_ops.FACTOR_FLOOR) + 1e-3
    if case == "near_one":
        # Each full chunk of 16 factors below 4e-3 is floored: log(1.18e-38)
        # exactly; a last chunk of 8 such factors (n_in = 40) is not.
        floored = (n_in // 16) * np.log(np.float64(synann_ops.PRODUCT_FLOOR))
        tail = fused[0] - floored
        if n_in % 16 == 0:
            np.testing.assert_allclose(tail, 0.0, atol=1e-3)
        else:
            assert np.all(tail < 8 * np.log(4.1e-3)), tail.max()
            assert np.all(tail > 8 * np.log(4e-4)), tail.min()


@pytest.mark.parametrize("implementation", FUSED)
@pytest.mark.parametrize("case", ["plain", "near_one"])
def test_kernel_config_is_honoured(implementation, case):
    """Another TileConfig gives the float64 values of its own chunk: with 8
    factors per log, near-one products are no longer floored (the `chunk`
    argument, the keras.ops path's, does not apply)."""
    _needs(implementation)
    module = importlib.import_module(
        f"keras_synann.kernels.{HOME[implementation]}.{implementation}"
    )
    config = TileConfig(block_rows=16, block_cols=32, chunk=8, num_warps=2)
    assert config != module.CONFIG
    x, kernel, upstream = _inputs(37, 40, 45, case, seed=3)

    def loss(x, kernel):
        s = module.log_inhibition(x, kernel, 16, config=config)
        return ops.sum(s * ops.convert_to_tensor(upstream))

    _, (d_x, d_kernel) = value_and_grad(loss)(x, kernel)
    tensors = ops.convert_to_tensor(x), ops.convert_to_tensor(kernel)
    s = module.log_inhibition(*tensors, 16, config=config)
    expected = _float64_log_inhibition(x, kernel, upstream, chunk=8)
    if case == "near_one":
        # The default chunk of 16 would floor every full chunk's product.
        default_chunk = _float64_log_inhibition(x, kernel, upstream)[0]
        assert np.all(np.abs(expected[0] - default_chunk) > 1.0)
    rtol = 2e-4 if case == "near_one" else 2e-5
    for name, ours, theirs in zip(
        ("s", "d_x", "d_kernel"), (s, d_x, d_kernel), expected, strict=True
    ):
        _close(ops.convert_to_numpy(ours), theirs, rtol, f"{name} vs float64 NumPy")


def test_near_one_output_underflows_to_zero_with_finite_gradients():
    """synapse_graph with products of 1e-3 factors: y is 0 in float32 and the
    gradients are finite and equal to the ops path's."""
    implementation = {"torch": "triton", "jax": "pallas"}.get(BACKEND)
    if implementation is None:
        pytest.skip(f"no fused kernel under {BACKEND}")
    _needs(implementation)
    x, kernel, upstream = _inputs(4, 48, 48, "near_one", seed=5)
    fused = _synapse_graph_and_grads(implementation, x, kernel, upstream)
    reference = _synapse_graph_and_grads("ops", x, kernel, upstream)
    np.testing.assert_array_equal(fused[0], 0.0)
    for name, ours, theirs in zip(
        ("y", "d_x", "d_kernel"), fused, reference, strict=True
    ):
        assert np.all(np.isfinite(ours)), name
        _close(ours, theirs, 1e-5, f"{name} vs implementation='ops'")


@pytest.mark.parametrize("implementation", FUSED)
def test_each_sample_is_computed_on_its_own(implementation):
    """The first rows alone give the same s and d_x as inside a batch of 70
    (padding and the other rows of a tile never leak into a sample)."""
    _needs(implementation)
    x, kernel, upstream = _inputs(70, 21, 33, "plain", seed=7)
    whole = _log_inhibition_and_grads(implementation, x, kernel, upstream)
    alone = _log_inhibition_and_grads(implementation, x[:3], kernel, upstream[:3])
    np.testing.assert_allclose(alone[0], whole[0][:3], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(alone[1], whole[1][:3], rtol=1e-6, atol=1e-6)


def test_pallas_under_jit_matches_ops():
    _needs("pallas")
    x, kernel, upstream = _inputs(33, 18, 70, "floored", seed=11)
    fused = _log_inhibition_and_grads("pallas", x, kernel, upstream, jit=True)
    reference = _log_inhibition_and_grads("ops", x, kernel, upstream, jit=True)
    for name, ours, theirs in zip(
        ("s", "d_x", "d_kernel"), fused, reference, strict=True
    ):
        _close(ours, theirs, 1e-5, name)


@pytest.mark.parametrize("implementation", FUSED)
def test_float64_raises_naming_float32(implementation):
    _needs(implementation)
    x = np.full((3, 4), 0.5)
    kernel = np.full((4, 2), 0.25)
    if implementation == "pallas":
        import jax
        import jax.experimental

        # jax >= 0.8 spells it jax.enable_x64; older ones, jax.experimental.
        if hasattr(jax, "enable_x64"):
            enable_x64 = jax.enable_x64
        else:
            enable_x64 = jax.experimental.enable_x64
        with enable_x64(True):
            x64, kernel64 = jax.numpy.asarray(x), jax.numpy.asarray(kernel)
            assert x64.dtype == "float64"
            with pytest.raises(ValueError, match="float32"):
                synann_ops.log_inhibition(x64, kernel64, implementation="pallas")
            square64 = jax.numpy.full((4, 4), 0.25)
            with pytest.raises(ValueError, match="float32"):
                synann_ops.synapse_graph(x64, square64, implementation="pallas")
        return
    import torch

    x64 = torch.tensor(x, dtype=torch.float64)
    kernel64 = torch.tensor(kernel, dtype=torch.float64)
    with pytest.raises(ValueError, match="float32"):
        synann_ops.log_inhibition(x64, kernel64, implementation="triton")
    # One float64 operand is enough to refuse.
    with pytest.raises(ValueError, match="float32"):
        synann_ops.log_inhibition(x64.float(), kernel64, implementation="triton")
    # synapse_graph keeps float64 inputs in float64, so the kernel refuses them.
    with pytest.raises(ValueError, match="float32"):
        synann_ops.synapse_graph(
            x64, torch.full((4, 4), 0.25, dtype=torch.float64), implementation="triton"
        )
    # The same inputs in float32 go through, with the float64 reference's values.
    s = synann_ops.log_inhibition(
        x64.float(), kernel64.float(), implementation="triton"
    )
    np.testing.assert_allclose(
        ops.convert_to_numpy(s), 4 * np.log(1 - 0.125), rtol=1e-6
    )


@pytest.mark.parametrize("implementation", FUSED)
def test_wrong_backend_raises(implementation):
    home = HOME[implementation]
    if BACKEND == home:
        pytest.skip(f"implementation={implementation!r} runs under {BACKEND}")
    x, kernel, _ = _inputs(2, 3, 3, "plain")
    with pytest.raises(ValueError, match=f"needs the {home} backend"):
        synann_ops.log_inhibition(x, kernel, implementation=implementation)
    with pytest.raises(ValueError, match=f"needs the {home} backend"):
        synann_ops.synapse_graph(x, kernel, implementation=implementation)
    # The layer accepts the name; its call fails the same way.
    layer = Synapse(implementation=implementation)
    with pytest.raises(ValueError, match=f"needs the {home} backend"):
        layer(x)
    # "auto" never picks a kernel of another backend.
    auto = synann_ops.resolve_implementation(
        "auto", ops.convert_to_tensor(x), ops.convert_to_tensor(kernel)
    )
    assert auto != implementation


def test_triton_on_cpu_without_the_interpreter_raises(monkeypatch):
    _needs("triton")
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA tensors run the compiled kernels")
    monkeypatch.delenv("TRITON_INTERPRET")
    x, kernel, _ = _inputs(2, 3, 3, "plain")
    with pytest.raises(ValueError, match="need CUDA tensors"):
        synann_ops.log_inhibition(x, kernel, implementation="triton")
    # "auto" stays on a CPU kernel for CPU tensors, and that one runs.
    assert synann_ops.resolve_implementation(
        "auto", ops.convert_to_tensor(x), ops.convert_to_tensor(kernel)
    ) in ("torch", "cpu")
    s = synann_ops.log_inhibition(x, kernel)
    expected = _float64_log_inhibition(x, kernel, np.zeros((2, 3)))[0]
    np.testing.assert_allclose(ops.convert_to_numpy(s), expected, rtol=1e-5)


@pytest.mark.parametrize("implementation", FUSED)
def test_synapse_layer_fit_step_matches_ops(implementation):
    """One `fit` step through a Synapse layer (3-D input, alpha, zero diagonal)
    leaves the same weights as with implementation='ops'."""
    _needs(implementation)
    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 1.0, (6, 3, 10)).astype("float32")
    y = rng.normal(size=(6, 3, 1)).astype("float32")
    weights, losses = {}, {}
    for impl in ("ops", implementation):
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((3, 10)),
                Synapse(
                    use_alpha=True,
                    zero_diagonal=True,
                    kernel_initializer=keras.initializers.RandomUniform(0.0, 0.5),
                    implementation=impl,
                ),
                keras.layers.Dense(1),
            ]
        )
        model.compile(keras.optimizers.SGD(0.1), "mse")
        initial = [np.array(w) for w in model.get_weights()]
        history = model.fit(x, y, batch_size=6, epochs=1, verbose=0)
        weights[impl] = [np.array(w) for w in model.get_weights()]
        losses[impl] = history.history["loss"][0]
        for before, after in zip(initial, weights[impl], strict=True):
            assert not np.array_equal(before, after), f"{impl}: a weight did not move"
    np.testing.assert_allclose(losses[implementation], losses["ops"], rtol=1e-5)
    for ours, theirs in zip(weights[implementation], weights["ops"], strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
