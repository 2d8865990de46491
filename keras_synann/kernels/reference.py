"""The keras.ops implementation ("ops"): every backend, every device, every tracer.

    s[b, i] = sum over chunks c of log(max(prod_{j in c} max(1 - W[j, i] x[b, j], floor),
                                           product_floor))

The forward multiplies the factors of a chunk of input units and takes one
log per chunk; the gradient is the closed form

    ds_i/dW[j, i] = -x_j / f,   ds_i/dx_j = -W[j, i] / f,   f = 1 - W[j, i] x_j

(0 where f was floored), evaluated chunk by chunk, so no (batch, n_in, n_out)
tensor ever exists. This is the reference the other implementations are
tested against, and the computation the fused kernels export as.

Forms, chosen by what records the computation (`kernels.devices`):

- the differentiable form: the chunked forward with the closed-form gradient
  (`keras.ops.custom_gradient`); under tensorflow the two halves are
  compiled with XLA on their own (Keras leaves tensorflow train steps
  uncompiled on CPU-only machines);
- the portable form, plain keras.ops with no custom gradient and no nested
  compiled function, where a tracer reads the graph for another runtime:
  torch.jit.trace (which would keep a custom gradient as a Python op) and
  tensorflow graphs that no gradient tape records (inference graphs, which
  tf2onnx and TFLite convert). Its gradient, where one is taken, is the
  autodiff of the same ops (equal to the closed form except through a
  floored product).
"""

from __future__ import annotations

import functools
import math

from keras import ops

from keras_synann.kernels import devices
from keras_synann.kernels._numerics import FACTOR_FLOOR, PRODUCT_FLOOR

#: On a CPU the backward materialises q for at most this many input units at a
#: time (with the whole batch), so that less of it spills out of L2 while two
#: contractions read it (XLA: 20 ms instead of 30 at batch 128, n 784, on an
#: Intel Xeon; tiling the batch as well measured no faster).
CPU_BACKWARD_CHUNK = 8


def why_not(x, kernel, auto: bool = False) -> str | None:
    """Never: keras.ops runs everywhere."""
    del x, kernel, auto
    return None


def log_inhibition(x, kernel, chunk: int):
    """s (batch, n_out) for x (batch, n_in) and W (n_in, n_out), `chunk` inputs
    at a time (chunk <= n_in)."""
    if _portable(x, kernel):
        return forward(x, kernel, chunk)
    forward_fn = functools.partial(forward, chunk=chunk)
    backward_fn = functools.partial(backward, chunk=chunk)
    if devices.backend() == "tensorflow":
        n_in, n_out = kernel.shape
        forward_fn, backward_fn = _tensorflow_xla(n_in, n_out, chunk, x.dtype.name)

    @ops.custom_gradient
    def _log_inhibition(x, kernel):
        # The gradient is `grad` below: stop_gradient keeps tensorflow's eager
        # tape from also recording (and holding on to) every chunk's factors.
        # `grad` uses the arguments themselves, not tensors made here: torch's
        # compiler refuses a backward that captures the forward's aliases.
        total = forward_fn(ops.stop_gradient(x), ops.stop_gradient(kernel))

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            return backward_fn(x, kernel, upstream)

        return total, grad

    return _log_inhibition(x, kernel)


def _portable(x, kernel) -> bool:
    """Whether a tracer reads this graph for another runtime (see the module)."""
    backend = devices.backend()
    if backend == "torch":
        import torch

        return torch.jit.is_tracing()
    if backend == "tensorflow":
        return devices.tensorflow_context(x, kernel) in (
            devices.TF_INFERENCE,
            devices.TF_SAVING,
        )
    return False


def _chunks(x, kernel, chunk: int):
    """x transposed and W, zero-padded and split into chunks of input units:
    (num_chunks, chunk, batch) and (num_chunks, chunk, n_out). x_j = 0 and a
    zero kernel row contribute a factor of exactly 1."""
    n_in, n_out = kernel.shape
    batch = ops.shape(x)[0]
    num_chunks = math.ceil(n_in / chunk)
    pad = num_chunks * chunk - n_in
    xt, w = ops.transpose(x), kernel
    if pad:
        # (concatenate, not ops.pad: Keras's pad builds an Operation, whose
        # naming counter torch's compiler sees as a side effect)
        xt = ops.concatenate([xt, ops.zeros((pad, batch), dtype=xt.dtype)], axis=0)
        w = ops.concatenate([w, ops.zeros((pad, n_out), dtype=w.dtype)], axis=0)
    xc = ops.reshape(xt, (num_chunks, chunk, batch))
    return xc, ops.reshape(w, (num_chunks, chunk, n_out))


def _factors(xk, wk):
    """(chunk, batch, n_out): 1 - beta_ij * x_bj for the chunk's j."""
    return 1.0 - ops.expand_dims(xk, -1) * ops.expand_dims(wk, 1)


def forward(x, kernel, chunk: int):
    """s (batch, n_out): one log per chunk's product of floored factors."""

    def step(k, total, xk, wk):
        f = ops.maximum(_factors(xk, wk), FACTOR_FLOOR)
        partial = ops.maximum(ops.prod(f, axis=0), PRODUCT_FLOOR)
        return total + ops.log(partial)

    xc, wc = _chunks(x, kernel, chunk)
    zeros = ops.zeros((ops.shape(x)[0], kernel.shape[1]), dtype=x.dtype)
    return _over_chunks(step, zeros, xc, wc)


def backward(x, kernel, upstream, chunk: int):
    """(d x, d W) of sum(upstream * s), chunk by chunk, in closed form.

        q = upstream / f  (0 where f is floored),
        d W[j, i] = -sum_b x[b, j] q[j, b, i],  d x[b, j] = -sum_i q[j, b, i] W[j, i]

    Each chunk's gradients are written into whole-size accumulators rather
    than stacked as per-chunk outputs (see `_over_chunks`).
    """
    if devices.backend() != "torch" and devices.on_cpu(x):
        # (eager torch would make more, smaller passes)
        chunk = min(chunk, CPU_BACKWARD_CHUNK)

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


def _over_chunks(step, init, xc, wc):
    """`carry = step(k, carry, xc[k], wc[k])` for every chunk k; the last carry.

    jax scans over the stacked chunks. torch runs a Python loop (what Keras's
    torch scan does too, in a form that torch's tracers and compiler follow).
    Under tensorflow a while loop indexes the chunks: XLA (a train step with
    jit_compile, TPUs) cannot compile tensorflow's scan, whose lists of chunks
    have the batch size in their shape, when that size is unknown while
    tracing.
    """
    backend = devices.backend()
    if backend == "torch":
        carry = init
        for k in range(xc.shape[0]):
            carry = step(k, carry, xc[k], wc[k])
        return carry
    if backend == "tensorflow":

        def body(k, carry):
            return step(k, carry, ops.take(xc, k, axis=0), ops.take(wc, k, axis=0))

        return ops.fori_loop(0, xc.shape[0], body, init)

    def scan_step(carry, inputs):
        k, inner = carry
        return (k + 1, step(k, inner, *inputs)), None

    (_, carry), _ = ops.scan(scan_step, (0, init), (xc, wc))
    return carry


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
    forward_fn = tf.function(
        functools.partial(forward, chunk=chunk),
        input_signature=[x, w],
        jit_compile=True,
    )
    backward_fn = tf.function(
        functools.partial(backward, chunk=chunk),
        input_signature=[x, w, g],
        jit_compile=True,
    )
    return forward_fn, backward_fn
