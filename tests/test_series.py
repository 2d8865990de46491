"""The opt-in Taylor-series approximation against float64 NumPy, on the active backend."""

import re

import numpy as np
import pytest
from keras import ops

from keras_synann import Synapse
from keras_synann import ops as synann_ops
from keras_synann.testing import (
    numpy_log_inhibition,
    numpy_series_log_inhibition,
    numpy_series_log_inhibition_grads,
    numpy_synapse_graph,
    value_and_grad,
)


def _data(batch, n, beta_max, x_max=0.99, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.01, x_max, (batch, n)).astype("float32")
    kernel = rng.uniform(0.0, beta_max, (n, n)).astype("float32")
    return x, kernel


@pytest.mark.parametrize("order", [1, 2, 5])
@pytest.mark.parametrize("n", [1, 7, 33])
def test_series_matches_numpy(n, order):
    x, kernel = _data(5, n, beta_max=0.5)
    s = synann_ops.log_inhibition_series(x, kernel, order)
    expected = numpy_series_log_inhibition(x, kernel, order)
    np.testing.assert_allclose(ops.convert_to_numpy(s), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("order", [1, 3])
def test_series_gradients_match_numpy(order):
    x, kernel = _data(4, 9, beta_max=0.6, seed=1)
    g = np.random.default_rng(2).normal(size=(4, 9)).astype("float32")
    step = value_and_grad(
        lambda x, k: ops.sum(
            synann_ops.log_inhibition_series(x, k, order) * ops.convert_to_tensor(g)
        )
    )
    _, (d_x, d_kernel) = step(x, kernel)
    e_x, e_kernel = numpy_series_log_inhibition_grads(x, kernel, g, order)
    np.testing.assert_allclose(ops.convert_to_numpy(d_x), e_x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        ops.convert_to_numpy(d_kernel), e_kernel, rtol=1e-5, atol=1e-5
    )


# Orders whose truncation error stays at least 10x the float32 rounding slack
# below at every output (checked first), so each check tests the series: at
# beta_max 0.05 and order 4 the error (~1e-8) would be rounding noise.
@pytest.mark.parametrize(
    "beta_max, orders", [(0.05, (1, 2)), (0.3, (1, 2, 4)), (0.6, (1, 2, 4, 6))]
)
def test_error_within_bound_and_shrinking_with_order(beta_max, orders):
    x, kernel = _data(8, 40, beta_max=beta_max, seed=3)
    exact = numpy_log_inhibition(x, kernel)
    # float32 rounding of s, a sum of 40 K terms (measured: below this).
    slack = 1e-6 * (1 + np.abs(exact))
    # Every a = beta x is at most m, so the error of order K + d is at most
    # m^d times that of order K, output by output.
    m = float(x.max()) * float(kernel.max())
    previous = None
    for order in orders:
        s = np.float64(
            ops.convert_to_numpy(synann_ops.log_inhibition_series(x, kernel, order))
        )
        bound = np.float64(
            ops.convert_to_numpy(synann_ops.series_error_bound(x, kernel, order))
        )
        error = s - exact
        assert np.all(np.abs(error) >= 10 * slack), f"order {order}: error is noise"
        # With beta x >= 0 the truncated series never falls below the exact sum.
        assert np.all(error >= 0), (order, error.min())
        assert np.all(error <= bound + slack), (order, (error - bound).max())
        # The bound is not vacuous: within 3x of the error at every output.
        assert np.all(bound <= 3 * error), (order, (bound / error).max())
        if previous is not None:
            last_order, last_error = previous
            shrunk = m ** (order - last_order) * last_error + slack
            assert np.all(error <= shrunk), (order, (error - shrunk).max())
        previous = order, error


def test_bound_is_infinite_where_the_series_may_diverge():
    x = np.array([[0.5, 1.0], [0.5, 0.5]], "float32")
    kernel = np.array([[0.2, 0.99], [1.0, 0.1]], "float32")
    bound = ops.convert_to_numpy(synann_ops.series_error_bound(x, kernel, 3))
    assert np.all(np.isinf(bound[0])), bound
    assert np.all(np.isfinite(bound[1])), bound


@pytest.mark.parametrize("order", [0, -1, 2.0, True, "3"])
def test_bad_order_names_the_argument_given(order):
    x, kernel = _data(2, 3, beta_max=0.1)
    as_order = f"`order` must be a positive integer. Received: order={order!r}"
    as_series_order = (
        "`series_order` must be a positive integer or None. "
        f"Received: series_order={order!r}"
    )
    for call, message in [
        (lambda: synann_ops.log_inhibition_series(x, kernel, order), as_order),
        (lambda: synann_ops.series_error_bound(x, kernel, order), as_order),
        (
            lambda: synann_ops.synapse_graph(x, kernel, series_order=order),
            as_series_order,
        ),
        (lambda: Synapse(series_order=order), as_series_order),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            call()


def test_layer_with_series_is_close_to_exact_for_small_beta():
    x, kernel = _data(6, 20, beta_max=0.05, seed=4)
    layer = Synapse(series_order=3)
    layer.build(x.shape)
    layer.kernel.assign(kernel)
    out = ops.convert_to_numpy(layer(x))
    # Per term the error is below 0.05^4 / (4 * 0.95), about 2e-6.
    np.testing.assert_allclose(out, numpy_synapse_graph(x, kernel), rtol=1e-4)


def test_series_does_not_combine_with_an_implementation():
    with pytest.raises(
        ValueError, match="Received: implementation='ops', series_order=2"
    ):
        Synapse(series_order=2, implementation="ops")
