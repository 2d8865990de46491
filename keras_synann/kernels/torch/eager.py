"""Eager torch ("torch"): the chunked path with reused buffers (torch backend).

Same math and chunking as the keras.ops path, written with preallocated
buffers and in-place torch ops: eager torch cannot fuse the keras.ops
formulation, so each chunk there allocates several fresh (chunk, batch, n)
temporaries; here one buffer per role is reused across chunks. That makes it
faster and keeps memory at O(chunk * batch * n_out), without the heap
fragmentation that many same-sized short-lived tensors cause under glibc.

    s[b, i] = sum_j log(max(1 - W[j, i] x[b, j], floor))
    ds/dW[j, i] = -x[b, j] / f[b, j, i],  ds/dx[b, j] = -W[j, i] / f[b, j, i]
    (0 where the factor f was floored)

Tests check it against the keras.ops path. "auto" takes it under torch
where neither the Triton kernels nor the C loops apply (float64, or no C
compiler). It reads the ranges of x and W into Python (`.item()`) to size
its passes, so a tracer cannot record it (its row in `kernels.REGISTRY`
refuses them), and "auto" then takes the keras.ops path. Its contractions
(higher derivatives) are the reference's.
"""

from __future__ import annotations

import math

import torch

from keras_synann.kernels import reference
from keras_synann.kernels._numerics import FACTOR_FLOOR, PRODUCT_FLOOR
from keras_synann.kernels.rules import Kernel


def _factors(neg_xt, kernel, start, stop, out):
    """out[:c] = 1 - x[:, j] * W[j, :] for j in [start, stop), shape (c, batch, n_out).

    `neg_xt` is -x transposed: negating the (n_in, batch) input once saves a
    pass over every (c, batch, n_out) chunk.
    """
    f = out[: stop - start]
    torch.mul(neg_xt[start:stop, :, None], kernel[start:stop, None, :], out=f)
    return f.add_(1.0)


#: Running products are kept within [1e-30, 1e30]: far from float32's limits.
_SAFE_LOG = math.log(1e30)


def _bounds(x, kernel, floor, chunk) -> tuple[bool, int]:
    """(may_floor, chunks_per_log) from the ranges of x and the kernel.

    Inputs are in [0, 1] (synapse_graph clips them), so every factor lies
    between 1 - max(W) max(x) and 1 - min(W, 0) max(x). `may_floor` says whether
    any factor can reach the floor (else the floor's passes are skipped: the
    usual case, betas being small); `chunks_per_log` how many chunk products
    can be multiplied before one log without any risk of under- or overflow
    (logs are the costly op of eager torch on CPU).
    """
    if x.numel() == 0 or kernel.numel() == 0:
        return False, 1
    x_max, x_min = x.max().item(), x.min().item()
    w_max, w_min = kernel.max().item(), kernel.min().item()
    if x_min < 0.0:
        return True, 1
    t_max, t_min = w_max * x_max, min(w_min, 0.0) * x_max
    may_floor = t_max >= 1.0 - floor
    if may_floor or not math.isfinite(t_max + t_min):
        return may_floor, 1
    factors = x.shape[1]
    if t_max > 0.0:
        factors = min(factors, int(_SAFE_LOG / -math.log1p(-t_max)))
    if t_min < 0.0:
        factors = min(factors, int(_SAFE_LOG / math.log1p(-t_min)))
    return False, max(1, factors // chunk)


def forward(x, kernel, chunk: int):
    """s (batch, n_out) with reused buffers (plain tensors, no autograd)."""
    floor, product_floor = FACTOR_FLOOR, PRODUCT_FLOOR
    n_in = x.shape[1]
    neg_xt = x.detach().t().neg()
    kernel_d = kernel.detach()
    total = x.new_zeros((x.shape[0], kernel.shape[1]))
    buffer = x.new_empty((chunk, x.shape[0], kernel.shape[1]))
    partial = torch.empty_like(total)
    running = torch.empty_like(total)
    may_floor, chunks_per_log = _bounds(x.detach(), kernel_d, floor, chunk)
    pending = 0  # chunk products multiplied into `running`, not yet logged
    for start in range(0, n_in, chunk):
        stop = min(start + chunk, n_in)
        f = _factors(neg_xt, kernel_d, start, stop, buffer)
        if may_floor:
            f.clamp_min_(floor)
        torch.prod(f, dim=0, out=partial)
        if chunks_per_log == 1:
            total.add_(partial.clamp_min_(product_floor).log_())
            continue
        if pending:
            running.mul_(partial)
        else:
            running.copy_(partial)
        pending += 1
        if pending == chunks_per_log:
            total.add_(running.log_())
            pending = 0
    if pending:
        total.add_(running.log_())
    return total


def adjoint(x, kernel, upstream, chunk: int):
    """(dx, dW) of sum(upstream * s), chunk by chunk with reused buffers."""
    floor = FACTOR_FLOOR
    may_floor, _ = _bounds(x, kernel, floor, chunk)
    batch, n_in = x.shape
    n_out = kernel.shape[1]
    xt = x.t().contiguous()  # bmm copies a strided operand on every call
    neg_xt = xt.neg()
    d_w = torch.empty_like(kernel)
    d_xt = x.new_empty((n_in, batch))
    # One buffer, updated in place: factors f, then q = upstream / f, then
    # q * W (each in-place pass is cheaper than writing a second buffer).
    buffer = x.new_empty((chunk, batch, n_out))
    if may_floor:
        floored = torch.empty(buffer.shape, dtype=torch.bool, device=x.device)
    for start in range(0, n_in, chunk):
        stop = min(start + chunk, n_in)
        c = stop - start
        f = _factors(neg_xt, kernel, start, stop, buffer)
        if may_floor:
            torch.le(f, floor, out=floored[:c])
        q = torch.div(upstream, f, out=f)
        if may_floor:
            q.masked_fill_(floored[:c], 0.0)
        # d_w[j, i] = -sum_b x[b, j] q[j, b, i]
        torch.bmm(xt[start:stop, None, :], q, out=d_w[start:stop, None, :])
        # d_x[b, j] = -sum_i q[j, b, i] W[j, i]
        torch.sum(q.mul_(kernel[start:stop, None, :]), dim=-1, out=d_xt[start:stop])
    return d_xt.t().neg_(), d_w.neg_()


KERNEL = Kernel(forward, adjoint, reference.contract)
