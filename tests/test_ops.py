"""keras_synann.ops against independent float64 NumPy formulas, on the active backend."""

import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from keras import ops

from keras_synann import ops as synann_ops
from keras_synann.testing import (
    numpy_synapse_graph,
    numpy_synapse_graph_grads,
    value_and_grad,
)


def _data(batch, n, beta_max=0.9, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.01, 0.99, (batch, n)).astype("float32")
    kernel = rng.uniform(0.0, beta_max, (n, n)).astype("float32")
    return x, kernel


def test_synapse_function():
    x, y = np.array([0.2, 0.7]), np.array([0.5, 0.9])
    out = ops.convert_to_numpy(synann_ops.synapse(x, y, alpha=2.0, beta=0.3))
    np.testing.assert_allclose(out, 2.0 * x * (1 - 0.3 * y), rtol=1e-6)


def test_surprisal_helpers():
    p = np.array([0.01, 0.3, 0.5, 0.99], "float32")
    u = -np.log(p.astype(np.float64))
    np.testing.assert_allclose(
        ops.convert_to_numpy(synann_ops.surprisal(p)), u, rtol=1e-6
    )
    # G is the conjugate of 1 - x: G(I(x)) = I(1 - x).
    g = ops.convert_to_numpy(synann_ops.inhibitory_surprisal(u.astype("float32")))
    np.testing.assert_allclose(g, -np.log1p(-p.astype(np.float64)), rtol=1e-5)
    gamma, v = np.float32(0.7), u.astype("float32")
    be = ops.convert_to_numpy(synann_ops.bose_einstein(gamma, v))
    np.testing.assert_allclose(be, 1.0 / np.expm1(0.7 + u), rtol=1e-5)
    # It is the derivative of log(1 - exp(-(gamma + v))) with respect to gamma.
    h = 1e-6
    fd = (np.log1p(-np.exp(-(0.7 + h + u))) - np.log1p(-np.exp(-(0.7 - h + u)))) / (
        2 * h
    )
    np.testing.assert_allclose(be, fd, rtol=1e-4)


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64])
@pytest.mark.parametrize("n", [1, 7, 33])
def test_synapse_graph_matches_numpy(n, chunk_size):
    x, kernel = _data(6, n)
    out = synann_ops.synapse_graph(x, kernel, chunk_size=chunk_size)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    expected = numpy_synapse_graph(x, kernel)
    np.testing.assert_allclose(
        ops.convert_to_numpy(out), expected, rtol=1e-5, atol=1e-7
    )


def test_synapse_graph_leading_axes_and_alpha():
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 1, (2, 3, 4, 9)).astype("float32")
    kernel = rng.uniform(0, 0.5, (9, 9)).astype("float32")
    alpha = rng.uniform(1, 3, (9,)).astype("float32")
    out = ops.convert_to_numpy(synann_ops.synapse_graph(x, kernel, alpha=alpha))
    assert out.shape == x.shape
    np.testing.assert_allclose(out, numpy_synapse_graph(x, kernel, alpha), rtol=1e-5)


def test_samples_are_independent_of_their_batch():
    x, kernel = _data(8, 20)
    whole = ops.convert_to_numpy(synann_ops.synapse_graph(x, kernel))
    for b in range(len(x)):
        alone = ops.convert_to_numpy(synann_ops.synapse_graph(x[b : b + 1], kernel))
        # A lone sample may take another tile of the compiled CPU loops: its
        # float32 rounding can differ by an ulp of s.
        np.testing.assert_allclose(whole[b : b + 1], alone, rtol=4e-6)
    # Changing the other samples leaves sample 0 untouched.
    other = x.copy()
    other[1:] = np.random.default_rng(9).uniform(0, 1, other[1:].shape)
    changed = ops.convert_to_numpy(synann_ops.synapse_graph(other, kernel))
    np.testing.assert_array_equal(changed[0], whole[0])


@pytest.mark.parametrize("implementation", ["auto", "ops"])
@pytest.mark.parametrize("chunk_size", [4, 16])  # ops, 16: 8 in the backward on a CPU
@pytest.mark.parametrize("jit", [False, True])
def test_gradients_match_closed_form(jit, chunk_size, implementation):
    x, kernel = _data(5, 13, beta_max=0.95)
    upstream = np.random.default_rng(1).normal(size=(5, 13)).astype("float32")

    def loss(x, kernel):
        return ops.sum(
            synann_ops.synapse_graph(
                x, kernel, chunk_size=chunk_size, implementation=implementation
            )
            * ops.convert_to_tensor(upstream)
        )

    _, (d_x, d_kernel) = value_and_grad(loss, jit=jit)(x, kernel)
    expected_dx, expected_dk = numpy_synapse_graph_grads(x, kernel, upstream)
    np.testing.assert_allclose(
        ops.convert_to_numpy(d_kernel), expected_dk, rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        ops.convert_to_numpy(d_x), expected_dx, rtol=1e-4, atol=1e-5
    )


def test_gradients_match_finite_differences():
    x, kernel = _data(3, 6, beta_max=0.8)
    x, kernel = x.astype("float64"), kernel.astype("float64")
    upstream = np.random.default_rng(2).normal(size=(3, 6))

    def loss(x, kernel):
        return ops.sum(
            synann_ops.synapse_graph(x, kernel, chunk_size=4)
            * ops.convert_to_tensor(upstream)
        )

    def numeric(x, kernel):
        return float((numpy_synapse_graph(x, kernel) * upstream).sum())

    _, (d_x, d_kernel) = value_and_grad(loss)(x, kernel)
    d_x, d_kernel = ops.convert_to_numpy(d_x), ops.convert_to_numpy(d_kernel)
    h = 1e-6
    for arg, grad in ((0, d_x), (1, d_kernel)):
        args = [x, kernel]
        for index in np.ndindex(args[arg].shape):
            plus = [a.copy() for a in args]
            minus = [a.copy() for a in args]
            plus[arg][index] += h
            minus[arg][index] -= h
            fd = (numeric(*plus) - numeric(*minus)) / (2 * h)
            np.testing.assert_allclose(grad[index], fd, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("value", [0.0, -1.0, -1e30, 1.0, 1.5, 1e30])
def test_out_of_domain_inputs_stay_finite(value):
    x, kernel = _data(4, 10)
    x[:, ::2] = value
    kernel[0, :] = 1.0  # a factor that reaches 0 at x_0 = 1
    upstream = np.ones((4, 10), "float32")

    def loss(x, kernel):
        return ops.sum(
            synann_ops.synapse_graph(x, kernel) * ops.convert_to_tensor(upstream)
        )

    value_out, (d_x, d_kernel) = value_and_grad(loss)(x, kernel)
    out = ops.convert_to_numpy(synann_ops.synapse_graph(x, kernel))
    for array in (out, ops.convert_to_numpy(d_x), ops.convert_to_numpy(d_kernel)):
        assert np.all(np.isfinite(array))
    # Documented behaviour: inputs are clipped to [0, 1].
    np.testing.assert_allclose(
        out,
        ops.convert_to_numpy(synann_ops.synapse_graph(np.clip(x, 0, 1), kernel)),
        rtol=1e-6,
    )
    assert np.isfinite(float(ops.convert_to_numpy(value_out)))


def test_underflowing_product_gives_zero_output_and_finite_gradient():
    n = 64
    x = np.full((2, n), 0.999, "float32")
    kernel = np.full((n, n), 0.999, "float32")  # every factor ~1e-3: product 1e-192

    def loss(x, kernel):
        return ops.sum(synann_ops.synapse_graph(x, kernel))

    value, (d_x, d_kernel) = value_and_grad(loss)(x, kernel)
    assert float(ops.convert_to_numpy(value)) == pytest.approx(0.0, abs=1e-30)
    assert np.all(np.isfinite(ops.convert_to_numpy(d_x)))
    assert np.all(np.isfinite(ops.convert_to_numpy(d_kernel)))


def test_implementation_argument():
    x, kernel = _data(2, 3)
    with pytest.raises(ValueError, match="implementation='fused'"):
        synann_ops.log_inhibition(x, kernel, implementation="fused")
    if keras.backend.backend() != "torch":
        with pytest.raises(ValueError, match="needs the torch backend"):
            synann_ops.log_inhibition(x, kernel, implementation="torch")


def test_bad_chunk_size():
    x, kernel = _data(2, 3)
    with pytest.raises(ValueError, match="chunk_size"):
        synann_ops.log_inhibition(x, kernel, chunk_size=0)


def test_memory_stays_linear_in_batch(tmp_path):
    """batch 512, n = 1024: a (batch, n, n) float32 tensor would be 2 GiB."""
    script = textwrap.dedent(
        """
        import resource
        import numpy as np
        from keras import ops
        from keras_synann import ops as synann_ops
        from keras_synann.testing import value_and_grad

        rng = np.random.default_rng(0)
        x = rng.uniform(0, 1, (512, 1024)).astype("float32")
        kernel = rng.uniform(0, 0.01, (1024, 1024)).astype("float32")
        step = value_and_grad(lambda x, k: ops.sum(synann_ops.synapse_graph(x, k)))
        tiny = value_and_grad(lambda x, k: ops.sum(synann_ops.synapse_graph(x, k)))
        tiny(x[:2, :8], kernel[:8, :8])  # warm up the runtime itself
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        value, grads = step(x, kernel)
        [ops.convert_to_numpy(g) for g in grads]
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) / 1024)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    grown_mb = float(result.stdout.strip().splitlines()[-1])
    assert grown_mb < 600, f"peak RSS grew by {grown_mb:.0f} MB"


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="tensorflow's XLA tracing"
)
def test_compiles_with_xla_when_the_batch_size_is_unknown():
    # A tensorflow train step with jit_compile (and TPUStrategy) traces with an
    # unknown batch size; tensorflow's scan cannot be compiled then.
    import tensorflow as tf

    x, kernel = _data(6, 40, beta_max=0.5)
    kernel_t = tf.constant(kernel)

    @tf.function(jit_compile=True, input_signature=[tf.TensorSpec((None, 40))])
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch([x, kernel_t])
            value = tf.reduce_sum(synann_ops.synapse_graph(x, kernel_t))
        return value, tape.gradient(value, [x, kernel_t])

    value, (d_x, d_kernel) = step(tf.constant(x))
    exp_dx, exp_dkernel = numpy_synapse_graph_grads(x, kernel, np.ones((6, 40)))
    np.testing.assert_allclose(
        float(value), numpy_synapse_graph(x, kernel).sum(), rtol=1e-5
    )
    np.testing.assert_allclose(d_x.numpy(), exp_dx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(d_kernel.numpy(), exp_dkernel, rtol=1e-4, atol=1e-5)
