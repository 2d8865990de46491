"""The SynaNN math as functions on `keras.ops` tensors (any backend).

Notation (paper): an excitatory input x and inhibitory inputs x_j, both open
probabilities in (0, 1); parameters alpha > 0 and beta in [0, 1). The kernel
follows the reference layout: a matrix W of shape (n_in, n_out) with
beta_ij = W[j, i].

Everything here computes per sample: a sample's output never depends on the
other samples of its batch (the reference code sums over the whole batch; see
docs/layer.md, "Divergence from the reference code").
"""

from __future__ import annotations

import keras
from keras import ops

from keras_synann import kernels
from keras_synann.kernels import DEFAULT_CHUNK_SIZE, FACTOR_FLOOR, PRODUCT_FLOOR

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "FACTOR_FLOOR",
    "IMPLEMENTATIONS",
    "PRODUCT_FLOOR",
    "bose_einstein",
    "check_log_inhibition_args",
    "check_series_order",
    "inhibitory_surprisal",
    "log_inhibition",
    "log_inhibition_series",
    "resolve_implementation",
    "series_error_bound",
    "surprisal",
    "synapse",
    "synapse_graph",
]

#: Ways to compute `log_inhibition` (see its docstring).
IMPLEMENTATIONS = ("auto", *kernels.NAMES)


def synapse(x, y, alpha=1.0, beta=0.5):
    """One synapse: `S(x, y; alpha, beta) = alpha * x * (1 - beta * y)`.

    Args:
        x: excitatory input, a probability in (0, 1).
        y: inhibitory input, a probability in (0, 1).
        alpha: excitation scale, > 0.
        beta: inhibition strength, in [0, 1).
    """
    x = ops.convert_to_tensor(x)
    return alpha * x * (1.0 - beta * ops.convert_to_tensor(y))


def surprisal(p):
    """Surprisal (self-information) `I(p) = -log(p)`."""
    return -ops.log(p)


def inhibitory_surprisal(u):
    """The conjugate of `1 - x` in surprisal space: `G(u) = -log(1 - exp(-u))`.

    If `u = I(x)` then `G(u) = I(1 - x)`. Computed as `-log(-expm1(-u))` so it
    stays accurate for small u.
    """
    return -ops.log(-ops.expm1(-ops.convert_to_tensor(u)))


def bose_einstein(gamma, v):
    """The Bose-Einstein term `1 / (exp(gamma + v) - 1)`.

    With `gamma = -log(beta)` and `v = -log(y)` it is the derivative
    `d/dgamma log(1 - exp(-(gamma + v)))`: the gradient of a synapse's
    log inhibition with respect to its surprisal-space parameter.
    """
    return 1.0 / ops.expm1(ops.convert_to_tensor(gamma) + v)


def log_inhibition(
    x, kernel, chunk_size: int = DEFAULT_CHUNK_SIZE, implementation: str = "auto"
):
    """Per-sample log inhibition `s_i = sum_j log(1 - beta_ij * x_j)`.

    Args:
        x: a (batch, n_in) float tensor (the inhibitory inputs x_j).
        kernel: an (n_in, n_out) float tensor W with beta_ij = W[j, i].
        chunk_size: input units per chunk; memory is O(chunk * batch * n_out).
        implementation: one of
            "ops": keras.ops; every backend, device, tracer and exporter.
            "cpu": fused C loops, compiled on first use; float32 on the CPU,
                a C compiler; every backend; not under torch's tracers, nor
                in tensorflow graphs that XLA compiles or a SavedModel holds.
            "torch": eager torch with reused buffers (torch; not traced).
            "triton": fused Triton kernels (torch, float32, CUDA tensors or
                Triton's interpreter; not traced).
            "pallas": fused Pallas kernels (jax, float32, GPU; Pallas's
                interpreter on a CPU).
            "auto" (default): the first that applies of
                torch: "triton" (float32 CUDA tensors, Triton installed),
                    "cpu", "torch", and "ops" under a tracer
                    (torch.jit.trace, torch.compile, torch.export,
                    torch.onnx);
                jax: "pallas" (float32, a single GPU), "cpu" (float32, a
                    single CPU device), "ops";
                tensorflow: "cpu" in eager calls, in graphs that a
                    gradient tape records (training steps) and in Keras's
                    predict and evaluate steps; "ops" in every other graph
                    (exports, converters, XLA).
            Under jax the fused kernels export as "ops" (`jax.export`,
            jax2tf, `model.export`), so every exported or traced model
            computes the same numbers. All implementations give the same
            values and gradients (to float32 rounding). An explicit choice
            that does not apply raises ValueError with the reason.

    Returns:
        A (batch, n_out) tensor. Each factor is floored at `FACTOR_FLOOR`.

    The forward multiplies the factors of a chunk and takes one log per chunk
    (instead of one log per factor); the gradient is the closed form

        ds_i/dbeta_ij = -x_j / (1 - beta_ij x_j)
        ds_i/dx_j     = -beta_ij / (1 - beta_ij x_j)

    evaluated chunk by chunk, so no (batch, n_in, n_out) tensor ever exists.
    """
    check_log_inhibition_args(chunk_size, implementation)
    x, kernel = ops.convert_to_tensor(x), ops.convert_to_tensor(kernel)
    return kernels.log_inhibition(x, kernel, chunk_size, implementation)


def check_log_inhibition_args(chunk_size, implementation) -> None:
    """Raises ValueError unless `chunk_size` is a positive int and
    `implementation` one of `IMPLEMENTATIONS` (the layer checks with this too)."""
    if not _is_positive_int(chunk_size):
        raise ValueError(
            "`chunk_size` must be a positive integer. "
            f"Received: chunk_size={chunk_size!r}"
        )
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"`implementation` must be one of {', '.join(map(repr, IMPLEMENTATIONS))}. "
            f"Received: implementation={implementation!r}"
        )


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def resolve_implementation(implementation: str, x, kernel) -> str:
    """The implementation `log_inhibition` runs for these tensors ("auto" resolved).

    Raises ValueError, with the reason, where an explicit `implementation`
    does not apply to them.
    """
    check_log_inhibition_args(DEFAULT_CHUNK_SIZE, implementation)
    x, kernel = ops.convert_to_tensor(x), ops.convert_to_tensor(kernel)
    return kernels.resolve(implementation, x, kernel).name


def log_inhibition_series(x, kernel, order: int):
    """An approximation of `log_inhibition` by matmuls: its Taylor series.

        s_i = sum_j log(1 - a_ij)  ~  -sum_{k=1..K} (x^k @ W^k)_i / k,
        a_ij = beta_ij x_j,  x^k and W^k elementwise powers,  K = order

    computed as one matmul of (batch, K n_in) by (K n_in, n_out), so it costs
    about K matmuls of a Dense layer's size forward and backward (the
    gradient is the matmuls' own). Not exact: an explicit opt-in.

    Error: for |a_ij| < 1 the truncation error of each term is at most
    |a|^(K+1) / ((K+1) (1 - |a|)), and for a >= 0 the series overestimates
    (the approximate s is never below the exact one, so y is never below
    the exact y). `series_error_bound` sums that bound over j. The series
    diverges for |a| >= 1 and is poor as a approaches 1: use it where beta x
    stays well below 1 (for example with `ValueRange(0, 0.5)` on the kernel).

    Args:
        x: a (batch, n_in) float tensor.
        kernel: an (n_in, n_out) float tensor W with beta_ij = W[j, i].
        order: K, the number of series terms (a positive int).

    Returns:
        A (batch, n_out) tensor.
    """
    check_series_order(order)
    x, kernel = ops.convert_to_tensor(x), ops.convert_to_tensor(kernel)
    x_powers, w_powers = [x], [kernel]
    for _ in range(order - 1):
        x_powers.append(x_powers[-1] * x)
        w_powers.append(w_powers[-1] * kernel)
    w_terms = [w / float(k) for k, w in enumerate(w_powers, start=1)]
    stacked_x = ops.concatenate(x_powers, axis=-1)
    stacked_w = ops.concatenate(w_terms, axis=0)
    return -ops.matmul(stacked_x, stacked_w)


def series_error_bound(x, kernel, order: int):
    """An upper bound on `|log_inhibition_series - log_inhibition|`, per output.

        bound_bi = (|x_b|^(K+1) @ |W|^(K+1))_i / ((K+1) (1 - m_b)),
        m_b = max_j |x_bj| * max |W|

    (the per-term bound |a|^(K+1) / ((K+1) (1 - |a|)) with 1 - |a| bounded
    below by 1 - m_b). Infinite where m_b >= 1, where the series may diverge.

    Args:
        x, kernel, order: as for `log_inhibition_series`.

    Returns:
        A (batch, n_out) tensor: a bound on the error of s, hence of log y.
    """
    check_series_order(order)
    x, kernel = ops.convert_to_tensor(x), ops.convert_to_tensor(kernel)
    power = float(order + 1)
    numerator = ops.matmul(
        ops.power(ops.abs(x), power), ops.power(ops.abs(kernel), power)
    )
    largest = ops.max(ops.abs(x), axis=-1, keepdims=True) * ops.max(ops.abs(kernel))
    bound = numerator / (power * (1.0 - largest))
    return ops.where(largest < 1.0, bound, float("inf"))


def check_series_order(order, name: str = "order", allow_none: bool = False) -> None:
    """Raises ValueError unless `order` is a positive int (a series order).

    `name` is the argument as the caller spelled it (`order` here,
    `series_order` in `synapse_graph` and the layer, which allow None).
    """
    if allow_none and order is None:
        return
    if not _is_positive_int(order):
        expected = "a positive integer or None" if allow_none else "a positive integer"
        raise ValueError(f"`{name}` must be {expected}. Received: {name}={order!r}")


def synapse_graph(
    x,
    kernel,
    alpha=None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    implementation: str = "auto",
    series_order: int | None = None,
):
    """The fully connected synapse graph, per sample over the last axis.

        y_i = alpha_i * x_i * prod_j (1 - beta_ij * x_j),   beta_ij = W[j, i]

    computed as `alpha_i * x_i * exp(s_i)` with `s = log_inhibition(x, W)`.

    Args:
        x: a (..., n) tensor of probabilities. Values are clipped to [0, 1]
            (the gradient is zero outside), so any finite input gives a
            finite output.
        kernel: an (n, n) tensor W (beta in [0, 1) for the paper's domain).
        alpha: optional (n,) tensor of per-output excitation scales.
        chunk_size, implementation: see `log_inhibition`.
        series_order: None (default) for the exact layer; a positive int K to
            compute s with `log_inhibition_series` of order K instead (an
            approximation by matmuls; `chunk_size` and `implementation` then
            do not apply).

    Returns:
        A (..., n) tensor of the dtype of the computation (float32 or wider;
        cast the result for mixed precision).
    """
    check_series_order(series_order, "series_order", allow_none=True)
    x = ops.convert_to_tensor(x)
    kernel = ops.convert_to_tensor(kernel)
    n = kernel.shape[0]
    dtype = _accumulation_dtype(x.dtype)
    flat = ops.reshape(ops.cast(x, dtype), (-1, n))
    flat = ops.clip(flat, 0.0, 1.0)
    kernel = ops.cast(kernel, dtype)
    if series_order is None:
        s = log_inhibition(
            flat, kernel, chunk_size=chunk_size, implementation=implementation
        )
    else:
        s = log_inhibition_series(flat, kernel, series_order)
    y = flat * ops.exp(s)
    if alpha is not None:
        y = y * ops.cast(alpha, dtype)
    # -1 for the leading axis: it keeps a symbolic batch (jax.export, jax2onnx)
    # from having to be split out of a product.
    return ops.reshape(y, (-1, *ops.shape(x)[1:]))


def _accumulation_dtype(dtype) -> str:
    """float32 for half-precision inputs, the input's float dtype otherwise."""
    dtype = keras.backend.standardize_dtype(dtype)
    return "float64" if dtype == "float64" else "float32"
