"""Independent float64 NumPy references of the paper's formulas.

They never call keras: they restate the formulas directly, so they can check
the keras.ops implementation and every kernel on every backend.
"""

from __future__ import annotations

import numpy as np


def numpy_log_inhibition(x, kernel) -> np.ndarray:
    """`s_i = sum_j log(1 - beta_ij x_j)` per sample of a 2-D x, in float64."""
    x = np.asarray(x, np.float64)
    kernel = np.asarray(kernel, np.float64)
    # One sample at a time: the straightforward statement of the formula.
    return np.stack([np.log1p(-row[:, None] * kernel).sum(axis=0) for row in x])


def numpy_synapse_graph(x, kernel, alpha=None) -> np.ndarray:
    """`y_i = alpha_i x_i prod_j (1 - beta_ij x_j)` per sample, in float64.

    `x` is (..., n), `kernel` is (n, n) with beta_ij = kernel[j, i]. No clipping:
    call it with x in [0, 1] and beta in [0, 1).
    """
    x = np.asarray(x, np.float64)
    flat = x.reshape(-1, x.shape[-1])
    y = flat * np.exp(numpy_log_inhibition(flat, kernel))
    if alpha is not None:
        y = y * np.asarray(alpha, np.float64)
    return y.reshape(x.shape)


def numpy_synapse_graph_grads(x, kernel, upstream):
    """Closed-form gradients of `sum(upstream * y)` for y = numpy_synapse_graph(x, W).

    dy_i/dbeta_ij = -x_j y_i / (1 - beta_ij x_j)
    dy_i/dx_j     = [i == j] y_i / x_i - beta_ij y_i / (1 - beta_ij x_j)

    Returns (d_x, d_kernel) in float64, for a 2-D x with entries in (0, 1].
    """
    x = np.asarray(x, np.float64)
    kernel = np.asarray(kernel, np.float64)
    g = np.asarray(upstream, np.float64)
    y = numpy_synapse_graph(x, kernel)
    gy = g * y  # (b, i)
    f = 1.0 - x[:, :, None] * kernel[None]  # (b, j, i)
    d_kernel = -np.einsum("bi,bj,bji->ji", gy, x, 1.0 / f)
    d_x = gy / x - np.einsum("bi,ji,bji->bj", gy, kernel, 1.0 / f)
    return d_x, d_kernel


def numpy_series_log_inhibition(x, kernel, order: int) -> np.ndarray:
    """The order-K Taylor series of `s_i = sum_j log(1 - a_ij)`, a_ij = beta_ij x_j:
    `-sum_j sum_{k=1..K} a_ij^k / k` per sample, in float64 (term by term, as
    written, not as the matmuls keras_synann uses)."""
    x = np.asarray(x, np.float64)
    kernel = np.asarray(kernel, np.float64)
    rows = []
    for row in x:
        a = row[:, None] * kernel  # (j, i)
        rows.append(-sum((a**k / k).sum(axis=0) for k in range(1, order + 1)))
    return np.stack(rows)


def numpy_series_log_inhibition_grads(x, kernel, upstream, order: int):
    """Gradients of `sum(upstream * s)` for the order-K series s, in float64:

    ds_i/dx_j     = -sum_k beta_ij^k x_j^(k-1)
    ds_i/dbeta_ij = -sum_k x_j^k beta_ij^(k-1)

    Returns (d_x, d_kernel).
    """
    x = np.asarray(x, np.float64)
    kernel = np.asarray(kernel, np.float64)
    g = np.asarray(upstream, np.float64)
    d_x = np.zeros_like(x)
    d_kernel = np.zeros_like(kernel)
    for k in range(1, order + 1):
        d_x -= np.einsum("bi,ji,bj->bj", g, kernel**k, x ** (k - 1))
        d_kernel -= np.einsum("bi,bj,ji->ji", g, x**k, kernel ** (k - 1))
    return d_x, d_kernel


def numpy_reference_code_synapse(x, kernel) -> np.ndarray:
    """What the reference SynaNN code computes (the batch-mixing defect).

    It sums the log factors over every sample of the batch, so each sample's
    output depends on the whole batch: y_bi = x_bi * prod_{b', j} (1 - beta_ij x_b'j).
    Equal to `numpy_synapse_graph` for a batch of one.
    """
    x = np.asarray(x, np.float64)
    kernel = np.asarray(kernel, np.float64)
    s = np.log1p(-x[:, :, None] * kernel[None]).sum(axis=(0, 1))
    return x * np.exp(s)[None, :]
