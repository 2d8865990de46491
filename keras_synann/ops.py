"""The SynaNN math as functions on `keras.ops` tensors (any backend).

Notation (paper): an excitatory input x and inhibitory inputs x_j, both open
probabilities in (0, 1); parameters alpha > 0 and beta in [0, 1). The kernel
follows the reference layout: a matrix W of shape (n_in, n_out) with
beta_ij = W[j, i].

Everything here computes per sample: a sample's output never depends on the
other samples of its batch (the reference code sums over the whole batch; see
README.md, "Divergence from the reference code").
"""

from __future__ import annotations

import functools
import math

import keras
from keras import ops

#: Smallest value a factor (1 - beta_ij * x_j) may take. Factors below it are
#: raised to it (and pass no gradient), so logs and reciprocals stay finite.
FACTOR_FLOOR = 1e-6
#: Smallest partial product kept before its log is taken (float32's smallest
#: normal number). Below it the output is 0 to float32 precision anyway.
_PRODUCT_FLOOR = 1.1754944e-38
#: Ways to compute `log_inhibition` (see its docstring).
IMPLEMENTATIONS = ("auto", "ops", "torch", "triton", "pallas", "cpu")
#: The backend each backend-specific implementation needs.
_BACKEND_OF = {"torch": "torch", "triton": "torch", "pallas": "jax"}
#: Inputs are processed in chunks of this many input units: memory is
#: O(chunk * batch * n_out), never batch * n_in * n_out.
DEFAULT_CHUNK_SIZE = 16


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
        implementation: "ops" (keras.ops, every backend), "torch" (a torch
            kernel with reused buffers, torch backend only), "triton" (fused
            GPU kernels, torch backend, float32, CUDA tensors or Triton's
            interpreter), "pallas" (the same fused kernels in Pallas, jax
            backend, float32, GPUs; Pallas's interpreter on CPU), "cpu"
            (fused C loops compiled on first use: float32 on the CPU with a
            C compiler; under tensorflow only in graphs that XLA does not
            compile) or "auto": under torch, "triton" for float32 CUDA
            tensors when Triton is installed, else "cpu" where it applies,
            else "torch"; under jax, "pallas" for float32 on a single GPU,
            "cpu" for float32 on a single CPU device where it applies, else
            "ops"; under tensorflow, "cpu" where it applies, else "ops".
            All give the same values and gradients (to float32 rounding).

    Returns:
        A (batch, n_out) tensor. Each factor is floored at `FACTOR_FLOOR`.

    The forward multiplies the factors of a chunk and takes one log per chunk
    (instead of one log per factor); the gradient is the closed form

        ds_i/dbeta_ij = -x_j / (1 - beta_ij x_j)
        ds_i/dx_j     = -beta_ij / (1 - beta_ij x_j)

    evaluated chunk by chunk, so no (batch, n_in, n_out) tensor ever exists.
    """
    check_log_inhibition_args(chunk_size, implementation)
    _check_backend(implementation)
    x, kernel = ops.convert_to_tensor(x), ops.convert_to_tensor(kernel)
    chunk = min(chunk_size, int(kernel.shape[0]))
    path = _PATHS[resolve_implementation(implementation, x, kernel)]
    return path(x, kernel, chunk)


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


def _check_backend(implementation: str) -> None:
    """Raises ValueError if `implementation` needs a backend other than Keras's."""
    needs = _BACKEND_OF.get(implementation)
    backend = keras.backend.backend()
    if needs is not None and backend != needs:
        raise ValueError(
            f"implementation={implementation!r} needs the {needs} backend. "
            f"Received: implementation={implementation!r} with backend {backend!r}"
        )


def _ops_path(x, kernel, chunk):
    """The keras.ops path: the chunked forward with its closed-form gradient."""
    forward = functools.partial(_chunked_forward, chunk=chunk)
    backward = functools.partial(_chunked_backward, chunk=chunk)
    if keras.backend.backend() == "tensorflow":
        n_in, n_out = kernel.shape
        forward, backward = _tensorflow_xla(n_in, n_out, chunk, str(x.dtype.name))

    @ops.custom_gradient
    def _log_inhibition(x, kernel):
        # The gradient is `grad` below; stop_gradient keeps tensorflow's eager
        # tape from also recording (and holding on to) every chunk's factors.
        x, kernel = ops.stop_gradient(x), ops.stop_gradient(kernel)
        total = forward(x, kernel)

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            return backward(x, kernel, upstream)

        return total, grad

    return _log_inhibition(x, kernel)


def _torch_path(x, kernel, chunk):
    from keras_synann import _torch_kernel

    return _torch_kernel.log_inhibition(x, kernel, chunk, FACTOR_FLOOR, _PRODUCT_FLOOR)


def _cpu_path(x, kernel, chunk):
    from keras_synann import _cpu_kernel

    return _cpu_kernel.log_inhibition(x, kernel, chunk, FACTOR_FLOOR, _PRODUCT_FLOOR)


def _triton_path(x, kernel, chunk):
    del chunk  # the fused kernels tile with their own `config`
    from keras_synann import _triton_kernel

    return _triton_kernel.log_inhibition(x, kernel, FACTOR_FLOOR, _PRODUCT_FLOOR)


def _pallas_path(x, kernel, chunk):
    del chunk  # the fused kernels tile with their own `config`
    from keras_synann import _pallas_kernel

    return _pallas_kernel.log_inhibition(x, kernel, FACTOR_FLOOR, _PRODUCT_FLOOR)


#: What `log_inhibition` runs for each resolved implementation: f(x, W, chunk).
_PATHS = {
    "ops": _ops_path,
    "cpu": _cpu_path,
    "torch": _torch_path,
    "triton": _triton_path,
    "pallas": _pallas_path,
}


def _chunks(x, kernel, chunk):
    """x transposed and W, zero-padded and split into chunks of input units:
    (num_chunks, chunk, batch) and (num_chunks, chunk, n_out). x_j = 0 and a
    zero kernel row contribute a factor of exactly 1."""
    n_in, n_out = kernel.shape
    batch = ops.shape(x)[0]
    num_chunks = math.ceil(n_in / chunk)
    pad = num_chunks * chunk - n_in
    xt, w = ops.transpose(x), kernel
    if pad:
        xt = ops.pad(xt, ((0, pad), (0, 0)))
        w = ops.pad(w, ((0, pad), (0, 0)))
    xc = ops.reshape(xt, (num_chunks, chunk, batch))
    return xc, ops.reshape(w, (num_chunks, chunk, n_out))


def _factors(xk, wk):
    """(chunk, batch, n_out): 1 - beta_ij * x_bj for the chunk's j."""
    return 1.0 - ops.expand_dims(xk, -1) * ops.expand_dims(wk, 1)


def _chunked_forward(x, kernel, chunk):
    """s (batch, n_out): one log per chunk's product of floored factors."""

    def step(k, total, xk, wk):
        f = ops.maximum(_factors(xk, wk), FACTOR_FLOOR)
        partial = ops.maximum(ops.prod(f, axis=0), _PRODUCT_FLOOR)
        return total + ops.log(partial)

    xc, wc = _chunks(x, kernel, chunk)
    zeros = ops.zeros((ops.shape(x)[0], kernel.shape[1]), dtype=x.dtype)
    return _over_chunks(step, zeros, xc, wc)


#: On a CPU the backward materialises q for at most this many input units at a
#: time (with the whole batch), so that less of it spills out of L2 while two
#: contractions read it (XLA: 20 ms instead of 30 at batch 128, n 784, on an
#: Intel Xeon; tiling the batch as well measured no faster).
_CPU_BACKWARD_CHUNK = 8


def _chunked_backward(x, kernel, upstream, chunk):
    """(d x, d W) of sum(upstream * s), chunk by chunk, in closed form.

        q = upstream / f  (0 where f is floored),
        d W[j, i] = -sum_b x[b, j] q[j, b, i],  d x[b, j] = -sum_i q[j, b, i] W[j, i]

    Each chunk's gradients are written into whole-size accumulators rather
    than stacked as per-chunk outputs (see `_over_chunks`).
    """
    if keras.backend.backend() != "torch" and _on_cpu(x):
        # (eager torch would make more, smaller passes)
        chunk = min(chunk, _CPU_BACKWARD_CHUNK)

    def step(k, grads, xk, wk):
        d_w_all, d_x_all = grads
        f = _factors(xk, wk)
        # q = upstream / f, except where the factor was floored: there the
        # factor is a constant and passes no gradient.
        q = ops.where(f > FACTOR_FLOOR, upstream / f, 0.0)
        d_w = -ops.einsum("jb,jbi->ji", xk, q)
        d_x = -ops.einsum("jbi,ji->jb", q, wk)
        return (
            ops.slice_update(d_w_all, (k, 0, 0), d_w[None]),
            ops.slice_update(d_x_all, (k, 0, 0), d_x[None]),
        )

    n_in, n_out = kernel.shape
    batch = ops.shape(x)[0]
    xc, wc = _chunks(x, kernel, chunk)
    num_chunks = xc.shape[0]
    init = (
        ops.zeros((num_chunks, chunk, n_out), dtype=x.dtype),
        ops.zeros((num_chunks, chunk, batch), dtype=x.dtype),
    )
    d_w, d_x = _over_chunks(step, init, xc, wc)
    d_w = ops.reshape(d_w, (num_chunks * chunk, n_out))[:n_in]
    d_x = ops.transpose(ops.reshape(d_x, (num_chunks * chunk, batch))[:n_in])
    return d_x, d_w


def _on_cpu(x) -> bool:
    """Whether the computation runs on the host CPU (for the backward's chunk)."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.default_backend() == "cpu"
    if backend == "tensorflow":
        return _tensorflow_on_cpu()
    return backend != "torch" or x.device.type == "cpu"


def _tensorflow_on_cpu() -> bool:
    """Whether tensorflow sees no GPU or TPU (so computes on the host CPU)."""
    import tensorflow as tf

    return not (
        tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU")
    )


@functools.cache
def _tensorflow_xla(n_in: int, n_out: int, chunk: int, dtype: str):
    """The chunked forward and backward, compiled with XLA by tensorflow.

    Keras leaves a tensorflow train step uncompiled on CPU-only machines and
    under tf.distribute; the chunk loops would then run op by op. Compiled on
    their own they run as fused loops wherever the step runs (inside an
    XLA-compiled step they are inlined). One pair per layer shape, any batch.
    """
    import tensorflow as tf

    x = tf.TensorSpec((None, n_in), dtype)
    w = tf.TensorSpec((n_in, n_out), dtype)
    g = tf.TensorSpec((None, n_out), dtype)
    forward = tf.function(
        functools.partial(_chunked_forward, chunk=chunk),
        input_signature=[x, w],
        jit_compile=True,
    )
    backward = tf.function(
        functools.partial(_chunked_backward, chunk=chunk),
        input_signature=[x, w, g],
        jit_compile=True,
    )
    return forward, backward


def _over_chunks(step, init, xc, wc):
    """`carry = step(k, carry, xc[k], wc[k])` for every chunk k; the last carry.

    jax and torch scan over the stacked chunks. Under tensorflow a while loop
    indexes them instead: XLA (a train step with jit_compile, TPUs) cannot
    compile tensorflow's scan, whose lists of chunks have the batch size in
    their shape, when that size is unknown while tracing.
    """
    if keras.backend.backend() == "tensorflow":

        def body(k, carry):
            return step(k, carry, ops.take(xc, k, axis=0), ops.take(wc, k, axis=0))

        return ops.fori_loop(0, xc.shape[0], body, init)

    def scan_step(carry, inputs):
        k, inner = carry
        return (k + 1, step(k, inner, *inputs)), None

    (_, carry), _ = ops.scan(scan_step, (0, init), (xc, wc))
    return carry


def resolve_implementation(implementation: str, x, kernel) -> str:
    """The implementation `log_inhibition` runs for these tensors ("auto" resolved)."""
    if implementation != "auto":
        return implementation
    backend = keras.backend.backend()
    if backend == "jax":
        if _pallas_applies(x, kernel):
            return "pallas"
        from keras_synann import _cpu_kernel

        return "cpu" if _cpu_kernel.jax_applies(x, kernel) else "ops"
    if backend == "torch":
        if _triton_applies(x, kernel):
            return "triton"
        from keras_synann import _torch_kernel

        return "cpu" if _torch_kernel.fused_cpu_applies(x, kernel) else "torch"
    from keras_synann import _cpu_kernel

    return "cpu" if _cpu_kernel.tf_applies(x, kernel) else "ops"


def _pallas_applies(x, kernel) -> bool:
    """Whether "auto" takes the Pallas kernels: float32 on a single GPU.

    With several devices the keras.ops path stays, since XLA can partition
    it across a sharded batch but not a Pallas call.
    """
    import jax

    if x.dtype != "float32" or kernel.dtype != "float32":
        return False
    devices = jax.devices()
    return len(devices) == 1 and devices[0].platform == "gpu"


def _triton_applies(x, kernel) -> bool:
    """Whether "auto" takes the Triton kernels: float32 CUDA tensors, Triton installed."""
    if not (x.is_cuda and str(x.dtype) == "torch.float32"):
        return False
    if str(kernel.dtype) != "torch.float32":
        return False
    import importlib.util

    return importlib.util.find_spec("triton") is not None


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
    return ops.reshape(y, ops.shape(x))


def _accumulation_dtype(dtype) -> str:
    """float32 for half-precision inputs, the input's float dtype otherwise."""
    dtype = keras.backend.standardize_dtype(dtype)
    return "float64" if dtype == "float64" else "float32"
