"""The keras.ops reference ("ops"): the math every implementation is tested against.

    s[b, i] = sum over chunks c of log(max(prod_{j in c} max(1 - W[j, i] x[b, j], floor),
                                           product_floor))

`forward` multiplies the factors of a chunk of input units and takes one
log per chunk; `adjoint` is the closed form

    ds_i/dW[j, i] = -x_j / f,   ds_i/dx_j = -W[j, i] / f,   f = 1 - W[j, i] x_j

(0 where f was floored); `contract` is the family every other derivative is
made of (`kernels.rules`). Each runs chunk by chunk, so no (batch, n_in,
n_out) tensor ever exists. These are plain functions of tensors, with no
autodiff of their own (`KERNEL`, the "ops" implementation's): each backend
makes them differentiable (`kernels.jax`, `kernels.torch`,
`kernels.tensorflow`), and a tracer that must read a plain graph (for
another runtime) traces `forward` alone.

The chunk loops run as `lax.scan` under jax, a Python loop under torch (what
Keras's torch scan does too, in a form torch's tracers and compiler follow)
and a while loop indexing the chunks under tensorflow: XLA (a train step with
jit_compile, TPUs) cannot compile tensorflow's scan, whose lists of chunks
have the batch size in their shape, when that size is unknown while tracing.
"""

from __future__ import annotations

import math

from keras import ops

from keras_synann.kernels import devices
from keras_synann.kernels._numerics import FACTOR_FLOOR, PRODUCT_FLOOR
from keras_synann.kernels.rules import Kernel

#: On a CPU the backward materialises q for at most this many input units at a
#: time (with the whole batch), so that less of it spills out of L2 while two
#: contractions read it (XLA: 20 ms instead of 30 at batch 128, n 784, on an
#: Intel Xeon; tiling the batch as well measured no faster).
CPU_BACKWARD_CHUNK = 8


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


def forward(x, kernel, chunk: int, unroll: bool = False):
    """s (batch, n_out): one log per chunk's product of floored factors.

    `unroll` runs the chunks as a Python loop on every backend (a graph with
    one copy of the step per chunk: tensorflow's while loop cannot be
    differentiated in forward mode inside a gradient tape in a graph)."""

    def step(k, total, xk, wk):
        f = ops.maximum(_factors(xk, wk), FACTOR_FLOOR)
        partial = ops.maximum(ops.prod(f, axis=0), PRODUCT_FLOOR)
        return total + ops.log(partial)

    xc, wc = _chunks(x, kernel, chunk)
    zeros = ops.zeros((ops.shape(x)[0], kernel.shape[1]), dtype=x.dtype)
    if unroll:
        total = zeros
        for k in range(xc.shape[0]):
            total = step(k, total, xc[k], wc[k])
        return total
    return _over_chunks(step, zeros, xc, wc)


def adjoint(x, kernel, upstream, chunk: int):
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


def _reciprocal_power(f, power: int):
    """m / f ** power, m = 0 where the factor f is floored (passes no gradient)."""
    kept = f > FACTOR_FLOOR
    r = 1.0 / ops.where(kept, f, 1.0)
    out = r
    for _ in range(power - 1):
        out = out * r
    return ops.where(kept, out, 0.0)


def _rows(t, chunk: int):
    """A (n_in, m) tensor zero-padded and split into (num_chunks, chunk, m)."""
    n_in, m = t.shape[0], ops.shape(t)[1]
    num_chunks = math.ceil(n_in / chunk)
    pad = num_chunks * chunk - n_in
    if pad:
        t = ops.concatenate([t, ops.zeros((pad, m), dtype=t.dtype)], axis=0)
    return ops.reshape(t, (num_chunks, chunk, m))


def contract(slot: str, power: int, a, b, c, x, kernel, chunk: int):
    """One partial derivative of the trilinear form behind every derivative:

        T_p(A, B, C) = sum_{b, j, i} A[b, j] B[j, i] C[b, i] R_p[b, j, i],
        R_p = 1 / f ** p  (0 where f = 1 - W[j, i] x[b, j] is floored)

    `slot` names the operand left out (None), and the result is T_p's
    gradient with respect to it:

        "a": (batch, n_in)   sum_i B[j, i] C[b, i] R_p[b, j, i]
        "b": (n_in, n_out)   sum_b A[b, j] C[b, i] R_p[b, j, i]
        "c": (batch, n_out)  sum_j A[b, j] B[j, i] R_p[b, j, i]

    Every derivative of `log_inhibition` beyond the fused first-order pair is
    a sum of these (`kernels.rules`), since dR_p = p R_{p+1} (x dW + W dx).
    Chunk by chunk over j, like `adjoint`: no (batch, n_in, n_out) tensor.
    """
    n_in, n_out = kernel.shape
    batch = ops.shape(x)[0]
    xc, wc = _chunks(x, kernel, chunk)
    num_chunks = xc.shape[0]
    ac = None if a is None else _rows(ops.transpose(a), chunk)
    bc = None if b is None else _rows(b, chunk)
    dtype = x.dtype

    def factors_r(xk, wk):
        return _reciprocal_power(_factors(xk, wk), power)

    if slot == "c":

        def step_c(k, total, inputs):
            xk, wk, ak, bk = inputs
            r = factors_r(xk, wk) * ops.expand_dims(ak, -1) * ops.expand_dims(bk, 1)
            return total + ops.sum(r, axis=0)

        init = ops.zeros((batch, n_out), dtype=dtype)
        return _over_chunks_of(step_c, init, (xc, wc, ac, bc))

    # "a" and "b": one (chunk, m) block of the result per chunk of j.
    spec, given, m = {
        "a": ("jbi,ji,bi->jb", bc, batch),
        "b": ("jbi,jb,bi->ji", ac, n_out),
    }[slot]

    def step(k, out, inputs):
        xk, wk, gk = inputs
        part = ops.einsum(spec, factors_r(xk, wk), gk, c)
        return ops.slice_update(out, (k, 0, 0), part[None])

    init = ops.zeros((num_chunks, chunk, m), dtype=dtype)
    out = _over_chunks_of(step, init, (xc, wc, given))
    out = ops.reshape(out, (num_chunks * chunk, m))[:n_in]
    return ops.transpose(out) if slot == "a" else out


def _over_chunks_of(step, init, stacked):
    """`carry = step(k, carry, [s[k] for s in stacked])` for every chunk k
    (see the module for the loop each backend runs)."""
    backend = devices.backend()
    count = stacked[0].shape[0]
    if backend == "torch":
        carry = init
        for k in range(count):
            carry = step(k, carry, [s[k] for s in stacked])
        return carry
    if backend == "tensorflow":

        def body(k, carry):
            return step(k, carry, [ops.take(s, k, axis=0) for s in stacked])

        return ops.fori_loop(0, count, body, init)

    def scan_step(carry, inputs):
        k, inner = carry
        return (k + 1, step(k, inner, inputs)), None

    (_, carry), _ = ops.scan(scan_step, (0, init), list(stacked))
    return carry


def _over_chunks(step, init, xc, wc):
    """`carry = step(k, carry, xc[k], wc[k])` for every chunk k; the last carry."""
    return _over_chunks_of(
        lambda k, carry, inputs: step(k, carry, *inputs), init, (xc, wc)
    )


#: The reference as a kernel: every backend, device and tracer.
KERNEL = Kernel(forward, adjoint, contract)
