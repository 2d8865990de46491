"""The fused kernels (Triton under torch, Pallas under jax) against float64 NumPy
and the keras.ops path. On CPU they run in their interpreters: Triton's
(TRITON_INTERPRET=1, set in conftest.py) and Pallas's (interpret=True)."""

import importlib.util

import keras
import numpy as np
import pytest
from keras import ops

from keras_synann import Synapse
from keras_synann import ops as synann_ops
from keras_synann.testing import value_and_grad

# The interpreters evaluate g / f for floored factors too (f = 0) before the
# kernels' `where` drops them, as the GPU does without a warning.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")

BACKEND = keras.backend.backend()
FUSED = {"triton": "torch", "pallas": "jax"}


def _skip_unless_runs(implementation):
    if FUSED[implementation] != BACKEND:
        pytest.skip(f"{implementation} runs under the {FUSED[implementation]} backend")
    if implementation == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")


def numpy_log_inhibition(x, kernel, floor=synann_ops.FACTOR_FLOOR):
    """s[b, i] = sum_j log(max(1 - W[j, i] x[b, j], floor)) in float64, and the
    closed-form gradients of sum(g * s) (none through floored factors)."""
    x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    f = 1.0 - x[:, :, None] * kernel[None]  # (b, j, i)
    s = np.log(np.maximum(f, floor)).sum(axis=1)

    def grads(g):
        kept = f > floor
        q = np.divide(np.asarray(g, np.float64)[:, None, :], f, where=kept, out=0.0 * f)
        d_x = -np.einsum("bji,ji->bj", q, kernel)
        d_kernel = -np.einsum("bji,bj->ji", q, x)
        return d_x, d_kernel

    return s, grads


def _case(batch, n_in, n_out, case, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 1.0, (batch, n_in)).astype("float32")
    beta_max = {"near_one": 0.999}.get(case, 0.9)
    kernel = rng.uniform(0.0, beta_max, (n_in, n_out)).astype("float32")
    if case == "floored":  # factors at the floor: no gradient through them
        x[0, : min(3, n_in)] = 1.0
        kernel[: min(2, n_in)] = 1.0
    if case == "negative":  # factors above 1
        kernel -= 0.3
    if case == "near_one":  # chunk products underflow to the product floor
        x[:] = 0.999
    g = rng.normal(size=(batch, n_out)).astype("float32")
    return x, kernel, g


def _value_and_grads(implementation, x, kernel, g):
    g_t = ops.convert_to_tensor(g)

    def loss(x, kernel):
        s = synann_ops.log_inhibition(x, kernel, implementation=implementation)
        return ops.sum(s * g_t)

    _, (d_x, d_kernel) = value_and_grad(loss)(x, kernel)
    s = synann_ops.log_inhibition(x, kernel, implementation=implementation)
    return [ops.convert_to_numpy(a) for a in (s, d_x, d_kernel)]


def _assert_close(actual, expected, rtol):
    scale = max(float(np.max(np.abs(expected))), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("implementation", ["triton", "pallas"])
@pytest.mark.parametrize(
    "shape",
    [
        (1, 1, 1),
        (5, 37, 21),  # tails in every tile and chunk
        (70, 20, 130),
        (300, 17, 9),  # > 256 rows: the weight gradient sums two batch slices
    ],
)
@pytest.mark.parametrize("case", ["plain", "floored", "negative"])
def test_fused_matches_numpy(implementation, shape, case):
    _skip_unless_runs(implementation)
    x, kernel, g = _case(*shape, case)
    s, d_x, d_kernel = _value_and_grads(implementation, x, kernel, g)
    exp_s, grads = numpy_log_inhibition(x, kernel)
    exp_dx, exp_dkernel = grads(g)
    _assert_close(s, exp_s, 2e-5)
    _assert_close(d_x, exp_dx, 2e-5)
    _assert_close(d_kernel, exp_dkernel, 2e-5)


@pytest.mark.parametrize("implementation", ["triton", "pallas"])
@pytest.mark.parametrize("case", ["plain", "floored", "near_one"])
def test_fused_matches_keras_ops_path(implementation, case):
    _skip_unless_runs(implementation)
    x, kernel, g = _case(6, 64, 40, case, seed=3)
    fused = _value_and_grads(implementation, x, kernel, g)
    reference = _value_and_grads("ops", x, kernel, g)
    for ours, theirs in zip(fused, reference, strict=True):
        assert np.all(np.isfinite(ours))
        _assert_close(ours, theirs, 2e-5)


@pytest.mark.parametrize("implementation", ["triton", "pallas"])
def test_synapse_layer_trains_the_same_with_fused_kernels(implementation):
    _skip_unless_runs(implementation)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (16, 12)).astype("float32")
    y = (x.sum(axis=1) > 6).astype("int32")
    weights = {}
    for impl in ("ops", implementation):
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((12,)),
                Synapse(implementation=impl, kernel_initializer="random_uniform"),
                keras.layers.Dense(2),
            ]
        )
        model.compile(
            keras.optimizers.SGD(0.5),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        weights[impl] = [np.asarray(w) for w in model.get_weights()]
    assert not np.allclose(weights["ops"][0], 0.0)
    for ours, theirs in zip(weights[implementation], weights["ops"], strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("implementation", ["triton", "pallas"])
def test_fused_kernels_compute_in_float32(implementation):
    _skip_unless_runs(implementation)
    # float16 (jax turns float64 into float32 unless x64 is enabled)
    x = ops.convert_to_tensor(np.full((2, 3), 0.5), dtype="float16")
    kernel = ops.convert_to_tensor(np.full((3, 3), 0.1), dtype="float16")
    with pytest.raises(ValueError, match="float32"):
        synann_ops.log_inhibition(x, kernel, implementation=implementation)


@pytest.mark.parametrize("implementation", ["triton", "pallas"])
def test_fused_kernels_need_their_backend(implementation):
    if FUSED[implementation] == BACKEND:
        pytest.skip(f"{implementation} runs here")
    x, kernel = np.full((2, 3), 0.5, "float32"), np.full((3, 3), 0.1, "float32")
    with pytest.raises(ValueError, match=f"needs the {FUSED[implementation]} backend"):
        synann_ops.log_inhibition(x, kernel, implementation=implementation)


def test_auto_picks_the_measured_path_for_this_device():
    x = ops.convert_to_tensor(np.full((2, 3), 0.5, "float32"))
    kernel = ops.convert_to_tensor(np.full((3, 3), 0.1, "float32"))
    expected = {"jax": "ops", "tensorflow": "ops", "torch": "torch"}[BACKEND]
    if BACKEND == "torch":
        import torch

        if torch.cuda.is_available() and importlib.util.find_spec("triton"):
            expected = "triton"
    if BACKEND == "jax":
        import jax

        if len(jax.devices()) == 1 and jax.devices()[0].platform == "gpu":
            expected = "pallas"
    assert synann_ops.resolve_implementation("auto", x, kernel) == expected
    assert synann_ops.resolve_implementation("ops", x, kernel) == "ops"
